"""A checkpoint of an ``hf_prune_<family>`` class carries exactly the remote code its classes need.

transformers' ``save_pretrained`` (``custom_object_save``, for classes registered with
``register_for_auto_class``) copies the module file of the config class and of the model class next to the
weights, with every file they import relatively, transitively. For every family of every modeling file in
``model_patches/``, a tiny model is swapped to its hf_prune class the way the methods do it
(``swap_config_and_class``) and saved; then:

- the ``.py`` files in the folder are exactly the transitive closure of the relative imports of the modules
  that ``auto_map`` names, computed here independently with ``ast`` from the ``model_patches/`` sources;
- every class name the checkpoint names (``auto_map``, ``architectures``) is a ``class <Name>(`` statement at
  the top level of the carried file that ``auto_map`` names (not a name given by a factory at run time).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import hf_prune.model_patches
import pytest
import torch
import transformers
from hf_prune.model_patches import (
    nonuniform_moe,
    prompt_token_pruning,
    qwen2_vl_token_pruning,
    text_token_pruning,
    token_selection,
    visual_token_pruning,
)
from tiny_models import NUM_EXPERTS, TOP_K, build_tiny_model, build_tokenizer

from hf_prune.methods.class_swap import swap_config_and_class

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL_PATCHES = Path(hf_prune.model_patches.__file__).parent
MODELING_MODULES = (
    nonuniform_moe,
    prompt_token_pruning,
    text_token_pruning,
    visual_token_pruning,
    qwen2_vl_token_pruning,
)
#: (modeling module, family) for every family of every modeling file.
CASES = [(module, family) for module in MODELING_MODULES for family in module.FAMILIES]


def relative_imports(path: Path) -> set[str]:
    """File names of the sibling modules ``path`` imports relatively (``from .x import y``,
    ``from . import x``), anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            assert node.level == 1, f"{path.name}: imports from a parent package"
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found |= {f"{name.split('.')[0]}.py" for name in names}
    return found


def closure(names: set[str]) -> set[str]:
    """``names`` and every module file they import relatively, transitively."""
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(relative_imports(MODEL_PATCHES / name) - seen)
    return seen


def top_level_classes(path: Path) -> set[str]:
    return {
        node.name
        for node in ast.parse(path.read_text(encoding="utf-8")).body
        if isinstance(node, ast.ClassDef)
    }


# ---- tiny models of every family, swapped the way the methods swap them ------------------------------


def tiny_encoder(family: str):
    """A 2-layer classifier of ``family`` (BERT, RoBERTa, DistilBERT)."""
    shared = {"vocab_size": 64, "num_labels": 2, "max_position_embeddings": 32, "pad_token_id": 0}
    if family == "distilbert":
        config = transformers.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=32, **shared)
    else:
        stock_config = getattr(transformers, text_token_pruning.FAMILIES[family][0])
        config = stock_config(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **shared
        )
    return getattr(transformers, text_token_pruning.FAMILIES[family][1])(config)


def tiny_qwen2_vl(family: str):
    config_name, model_name = qwen2_vl_token_pruning.FAMILIES[family]
    vision = dict(depth=1, hidden_size=16, num_heads=2, patch_size=4, spatial_merge_size=2, in_channels=3)
    vision.update(
        dict(embed_dim=16, mlp_ratio=2)
        if family == "qwen2_vl"
        else dict(intermediate_size=32, out_hidden_size=16, window_size=16, fullatt_block_indexes=[0])
    )
    config = getattr(transformers, config_name)(
        text_config=dict(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        ),
        vision_config=vision,
        image_token_id=60,
        video_token_id=61,
        vision_start_token_id=62,
        vision_end_token_id=63,
    )
    return getattr(transformers, model_name)(config)


def hf_prune_model(module, family: str):
    """A tiny model of ``family`` as its ``hf_prune_<family>`` class of ``module``."""
    config_class, model_class = module.CLASSES[family]
    if module is nonuniform_moe:
        model = build_tiny_model(family, build_tokenizer(), damped_layer=None)
        layers = model.model.layers
        moe = nonuniform_moe.moe_layer_flags(model.config)
        # MoE layers alternate between all experts and one fewer (never below top-k); dense layers hold 0.
        counts = [0] * len(moe)
        for n, index in enumerate(i for i, flag in enumerate(moe) if flag):
            counts[index] = max(NUM_EXPERTS - n % 2, TOP_K)
        for layer, count in zip(layers, counts, strict=True):
            if count:
                nonuniform_moe.select_experts(layer.mlp.experts, layer.mlp.gate, range(count))
        count_key = nonuniform_moe.FAMILIES[family][2]
        updates = {count_key: max(counts), "experts_per_layer": counts}
    elif module is prompt_token_pruning:
        model = build_tiny_model(family, build_tokenizer(), damped_layer=None)
        settings = {"algorithm": "attention", "keep_ratio": 0.5, "layer": 1}
        updates = {"token_pruning": module.check_settings(settings, model.config.num_hidden_layers)}
    elif module is text_token_pruning:
        model = tiny_encoder(family)
        settings = {"algorithm": "random", "keep_ratio": 0.5, "layer": 1}
        updates = {"token_pruning": module.check_settings(settings, model.config.num_hidden_layers)}
    elif module is visual_token_pruning:
        model = build_tiny_model(family, build_tokenizer(image_token=True), damped_layer=None)
        updates = {"token_pruning": token_selection.check_settings({"budget": 4})}
    else:
        model = tiny_qwen2_vl(family)
        updates = {"token_pruning": token_selection.check_settings({"budget": 2})}
    swap_config_and_class(model, config_class, model_class, updates)
    if module is text_token_pruning:  # as the method does: the retainer comes with the swap
        settings = model.config.token_pruning
        model.retainer = module.TokenRetainer(
            model.config.hidden_size, len(settings["candidate_ratios"]), settings["retainer_size"]
        )
    return model


@pytest.mark.parametrize(
    ("module", "family"), CASES, ids=[f"{m.__name__.split('.')[-1]}-{f}" for m, f in CASES]
)
def test_checkpoint_carries_exactly_its_classes_modules(tmp_path, module, family):
    torch.manual_seed(0)
    model = hf_prune_model(module, family)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    auto_map = saved["auto_map"]
    assert saved["model_type"] == f"hf_prune_{family}"
    assert set(auto_map) == {"AutoConfig", model.__class__._auto_class}

    # The files: exactly the auto_map modules and what they import, transitively.
    named = {ref.split(".")[0] + ".py" for ref in auto_map.values()}
    assert named == {module.__name__.split(".")[-1] + ".py"}
    carried = {p.name for p in tmp_path.glob("*.py")}
    assert carried == closure(named), f"carried {sorted(carried)}, imports need {sorted(closure(named))}"
    for name in carried:  # the copies are today's sources
        assert (tmp_path / name).read_text() == (MODEL_PATCHES / name).read_text()

    # The names: class statements in the carried file that auto_map names.
    config_class, model_class = module.CLASSES[family]
    assert auto_map["AutoConfig"].split(".")[-1] == config_class.__name__
    assert saved["architectures"] == [model_class.__name__]
    model_file = auto_map[model_class._auto_class].split(".")[0]
    for ref in {*auto_map.values(), *(f"{model_file}.{name}" for name in saved["architectures"])}:
        file_name, class_name = ref.split(".")
        source = (tmp_path / f"{file_name}.py").read_text()
        assert re.search(rf"^class {re.escape(class_name)}\(", source, flags=re.MULTILINE), (
            f"{ref}: no `class {class_name}(` statement in {file_name}.py"
        )
        assert class_name in top_level_classes(tmp_path / f"{file_name}.py")
    assert (
        model_class.__qualname__ == model_class.__name__
        and config_class.__qualname__ == config_class.__name__
    )


def test_every_modeling_file_defines_its_classes_by_name():
    """``CLASSES`` holds, for every family of ``FAMILIES``, the classes written in that module's source, with
    the family's ``model_type`` and config class."""
    for module in MODELING_MODULES:
        assert set(module.CLASSES) == set(module.FAMILIES), module.__name__
        defined = top_level_classes(Path(module.__file__))
        for family, (config_class, model_class) in module.CLASSES.items():
            for cls in (config_class, model_class):
                assert cls.__module__ == module.__name__ and cls.__name__ in defined, cls
            assert config_class.model_type == f"hf_prune_{family}"
            assert model_class.config_class is config_class
            stock_config, stock_model = module.FAMILIES[family][:2]
            assert config_class.__name__ == "HfPrune" + stock_config
            assert issubclass(model_class, getattr(transformers, stock_model))
            assert issubclass(config_class, getattr(transformers, stock_config))
