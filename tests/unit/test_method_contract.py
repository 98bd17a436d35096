"""The one-shot method contract (``hf_prune/methods/base.py``) and the registry built on it: every registered
method declares its base and documents its fields, the name is written once, ``check_model`` runs once per
stage (the preflight), ``finalize`` merges into the stage report, and adding a module is all it takes."""

from __future__ import annotations

import dataclasses
import pkgutil
import sys
from dataclasses import dataclass
from typing import Any

import pytest
from tiny_models import build_tiny_model, build_tokenizer

import hf_prune
from hf_prune import registry
from hf_prune.adapters import get_adapter
from hf_prune.errors import RecipeError, UnsupportedModelError
from hf_prune.methods.base import MethodConfig, OneShotMethod, TrainingMethod, config_field
from hf_prune.methods.depth.layer_drop import LayerDropConfig


def test_every_registered_method_declares_its_base_and_documents_its_fields():
    methods = registry.registered_methods()
    assert {"replaceme", "layer_drop", "expert_pruning", "visual_token_pruning", "text_token_pruning"} <= set(
        methods
    )
    for name, spec in methods.items():
        assert issubclass(spec.config_cls, (OneShotMethod, TrainingMethod)), name
        assert dataclasses.is_dataclass(spec.config_cls), name
        assert spec.summary, f"{name}: the config class needs a docstring (its first line is the summary)"
        rows = spec.fields()
        assert rows, name
        for field_name, _, _, help_text in rows:
            assert help_text.strip(), f"{name}.{field_name} has no help"
    # The training-time methods (methods/sparsity/ and methods/robust/) are the only ones that are not one-shot.
    training = ["cards", "gmp", "granet", "lottery"]
    assert sorted(name for name, spec in methods.items() if not spec.one_shot) == training


def test_every_module_under_methods_is_imported():
    registry.registered_methods()
    import hf_prune.methods as package

    names = [m.name for m in pkgutil.walk_packages(package.__path__, prefix="hf_prune.methods.")]
    assert "hf_prune.methods.depth.layer_drop" in names
    assert [n for n in names if n not in sys.modules] == []


def test_the_base_declares_each_hook_once():
    class Plain(OneShotMethod):
        pass

    plain = dataclass(Plain)()
    llama = get_adapter(build_tiny_model("llama").config)
    assert MethodConfig.unsupported_reason(llama) is None and plain.needs_calibration is False
    plain.check_model(None, llama)  # nothing to refuse
    assert plain.predict_config("config", llama) == "config" and plain.min_calibration_tokens(None) == 0
    assert plain.finalize(None, None) is None
    with pytest.raises(NotImplementedError):
        plain.apply(None, None)
    # needs_calibration is a property everywhere, never a class attribute.
    for spec in registry.registered_methods().values():
        assert isinstance(spec.config_cls.needs_calibration, property), spec.name


def test_check_model_raises_the_unsupported_reason():
    @dataclass
    class MoeOnly(OneShotMethod):
        """Applies to MoE models only."""

        @classmethod
        def unsupported_reason(cls, adapter) -> str | None:
            return None if adapter.spec.is_moe else f"{adapter.model_type} has no experts"

    llama = build_tiny_model("llama").config
    with pytest.raises(UnsupportedModelError, match="llama has no experts"):
        MoeOnly().check_model(llama, get_adapter(llama))
    mixtral = build_tiny_model("mixtral").config
    MoeOnly().check_model(mixtral, get_adapter(mixtral))


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry as loaded, in a copy the test may add to (restored afterwards)."""
    registry.registered_methods()
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    return registry


def test_registration_refuses_what_breaks_the_contract(scratch_registry):
    @dataclass
    class NotAMethod:
        """Not derived from a declared base."""

    with pytest.raises(TypeError, match="must subclass OneShotMethod or TrainingMethod"):
        scratch_registry.register_method("not_a_method", NotAMethod)
    with pytest.raises(ValueError, match="already registered"):
        scratch_registry.register_method("layer_drop", LayerDropConfig)


@dataclass
class Recorder(OneShotMethod):
    """Test method: records its hooks; finalize replaces the pending entry apply wrote."""

    size: int = config_field(1, help="a field")

    def apply(self, model: Any, context: Any) -> dict[str, Any]:
        return {"size": self.size, "training": "pending", "after": 1}

    def finalize(self, model: Any, context: Any) -> dict[str, Any] | None:
        return {"training": {"steps": 3}, "extra": True}


def test_run_stage_names_the_report_and_merges_finalize(scratch_registry):
    scratch_registry.register_method("recorder", Recorder)
    model = build_tiny_model("llama", build_tokenizer())
    result = hf_prune.prune(model, {"stages": [{"method": "recorder", "size": 7}]}, progress=False)
    (stage,) = result.stages
    assert list(stage) == [
        "method",
        "size",
        "training",
        "after",
        "extra",
        "seconds",
        "params_before",
        "params_after",
        "engine",
    ]
    assert stage["engine"] == "in_memory"
    assert stage["method"] == "recorder" and stage["training"] == {"steps": 3} and stage["extra"] is True


def test_check_model_runs_once_per_stage(monkeypatch):
    calls = []
    original = LayerDropConfig.check_model

    def counted(self, model_config, adapter):
        calls.append(model_config.num_hidden_layers)
        return original(self, model_config, adapter)

    monkeypatch.setattr(LayerDropConfig, "check_model", counted)
    model = build_tiny_model("llama", build_tokenizer())
    stages = [{"method": "layer_drop", "layers": [1, 1]}, {"method": "layer_drop", "layers": [2, 2]}]
    result = hf_prune.prune(model, {"stages": stages}, progress=False)
    assert calls == [4, 3]  # preflight only: the second stage sees the config the first will leave
    assert [s["layers_after"] for s in result.stages] == [3, 2]


def test_a_prune_recipe_refuses_a_training_time_method(scratch_registry):
    @dataclass
    class DuringTraining(TrainingMethod):
        """Test method that prunes during training."""

    scratch_registry.register_method("during_training", DuringTraining)
    model = build_tiny_model("llama", build_tokenizer())
    with pytest.raises(RecipeError, match=r"stages\[0\].method: during_training is a training-time method"):
        hf_prune.prune(model, {"stages": [{"method": "during_training"}]}, progress=False)
    with pytest.raises(TypeError, match="training-time method"):
        registry.run_stage(registry.get_method("during_training"), model, DuringTraining(), None)
