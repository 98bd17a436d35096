"""The architecture table (hf_prune/adapters/): the hf_prune_<family> types come from model_patches' own
tables, the sparse-layer rule of Qwen-MoE is answered in one place, and a vision-language model's parts
are found through the adapter."""

from __future__ import annotations

import importlib
import pkgutil

import hf_prune.model_patches as model_patches
import pytest
import torch
import transformers
from hf_prune.evals.flops import _layer_costs
from hf_prune.model_patches import nonuniform_moe

from hf_prune.adapters import (
    TEXT_ARCHITECTURES,
    VISION_LANGUAGE_ARCHITECTURES,
    get_adapter,
    set_moe_layer_flags,
    supported_model_types,
)
from hf_prune.errors import UnsupportedModelError


def _family_tables() -> dict[str, dict]:
    """Every ``FAMILIES`` table in model_patches/, found by reading the modules (not the adapter's list)."""
    tables = {}
    for info in pkgutil.iter_modules(model_patches.__path__):
        module = importlib.import_module(f"hf_prune.model_patches.{info.name}")
        families = getattr(module, "FAMILIES", None)
        if isinstance(families, dict):
            tables[info.name] = families
    return tables


def _spec(model_type: str):
    return TEXT_ARCHITECTURES.get(model_type) or VISION_LANGUAGE_ARCHITECTURES[model_type]


def test_every_patched_family_has_its_stock_familys_spec():
    tables = _family_tables()
    assert {
        "nonuniform_moe",
        "prompt_token_pruning",
        "text_token_pruning",
        "visual_token_pruning",
        "qwen2_vl_token_pruning",
    } <= set(tables)
    supported = set(supported_model_types())
    expected = set()
    for module, families in tables.items():
        for family in families:
            patched = f"hf_prune_{family}"
            expected.add(patched)
            assert family in supported, f"{module}.FAMILIES names {family}, which the adapter lacks"
            assert patched in supported, f"{module}.FAMILIES: {patched} is not supported"
            assert _spec(patched) == _spec(family), patched
            assert (patched in TEXT_ARCHITECTURES) == (family in TEXT_ARCHITECTURES)
    assert {t for t in supported if t.startswith("hf_prune_")} == expected


def test_patched_classes_use_the_prefixed_model_type():
    for name, families in _family_tables().items():
        classes = getattr(importlib.import_module(f"hf_prune.model_patches.{name}"), "CLASSES", {})
        for family in families:
            if family in classes:
                assert classes[family][0].model_type == f"hf_prune_{family}"


def _qwen2_moe(**overrides) -> transformers.Qwen2MoeConfig:
    settings = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=8,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return transformers.Qwen2MoeConfig(**{**settings, **overrides})


@pytest.mark.parametrize(
    ("step", "mlp_only", "expected"),
    [
        # written out by hand: layer i is MoE when i is not in mlp_only_layers and (i + 1) % step == 0
        (1, [], [True, True, True, True, True, True]),
        (2, [], [False, True, False, True, False, True]),
        (2, [3], [False, True, False, False, False, True]),
        (1, [0, 4], [False, True, True, True, False, True]),
        (3, [5], [False, False, True, False, False, False]),
    ],
)
def test_qwen2_moe_sparse_layers(step, mlp_only, expected):
    config = _qwen2_moe(decoder_sparse_step=step, mlp_only_layers=mlp_only)
    adapter = get_adapter(config)
    assert adapter.moe_layer_flags(config) == expected
    assert nonuniform_moe.moe_layer_flags(config) == expected  # the rule the remote code loads with
    assert adapter.experts_per_layer_from_config(config) == [4 if moe else 0 for moe in expected]
    # FLOPs count an MoE layer's router and top-k experts exactly where the layers are MoE
    matmul = [cost["matmul"] for cost in _layer_costs(config, seq_len=8)[0]]
    assert len(set(matmul)) == len(set(expected))
    assert {m for m, moe in zip(matmul, expected, strict=True) if moe}.isdisjoint(
        {m for m, moe in zip(matmul, expected, strict=True) if not moe}
    )
    # the stock class builds exactly these layers
    with torch.device("meta"):
        model = transformers.Qwen2MoeForCausalLM(config)
    assert [adapter.is_moe_layer(layer) for layer in adapter.layers(model)] == expected


def test_sparse_layers_after_a_rewrite_and_for_other_families():
    config = _qwen2_moe(decoder_sparse_step=2, mlp_only_layers=[3])
    adapter = get_adapter(config)
    flags = [True, False, False, True]
    set_moe_layer_flags(config, flags)
    config.num_hidden_layers = 4
    assert adapter.moe_layer_flags(config) == flags
    assert config.decoder_sparse_step == 1 and config.mlp_only_layers == [1, 2]
    mixtral = transformers.MixtralConfig(num_hidden_layers=3, num_local_experts=4)
    assert get_adapter(mixtral).moe_layer_flags(mixtral) == [True] * 3
    llama = transformers.LlamaConfig(num_hidden_layers=3)
    assert get_adapter(llama).moe_layer_flags(llama) == [False] * 3
    assert get_adapter(llama).experts_per_layer_from_config(llama) == [0, 0, 0]


def _tiny_vlm(family: str):
    text = dict(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    if family == "llava":
        config = transformers.LlavaConfig(
            text_config=transformers.LlamaConfig(**text),
            vision_config=transformers.CLIPVisionConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
            ),
            image_token_id=7,
        )
        model_class = transformers.LlavaForConditionalGeneration
    else:
        config = transformers.Qwen2VLConfig(
            text_config=text,
            vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2),
            image_token_id=7,
        )
        model_class = transformers.Qwen2VLForConditionalGeneration
    with torch.device("meta"):
        return config, model_class(config)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vision_language_parts_come_from_the_adapter(family):
    config, model = _tiny_vlm(family)
    adapter = get_adapter(config)
    inner = model.model
    tower, projector = (
        (inner.vision_tower, inner.multi_modal_projector)
        if family == "llava"
        else (inner.visual, inner.visual.merger)
    )
    assert adapter.vision_tower(model) is tower
    assert adapter.projector(model) is projector
    assert adapter.language_model(model) is inner.language_model
    assert adapter.decoder(model) is inner.language_model
    assert adapter.image_token_id(config) == 7
    text = get_adapter(config.get_text_config()) if family == "llava" else None
    if text is not None:
        assert text.image_token_id(config.get_text_config()) is None
        with pytest.raises(UnsupportedModelError, match="not a vision-language model"):
            text.vision_tower(model.model.language_model)


@pytest.mark.parametrize("step", [0, -1])  # (transformers itself refuses non-integers)
def test_a_sparse_step_the_stock_class_cannot_use_is_refused_by_name(step):
    config = transformers.Qwen2MoeConfig(num_hidden_layers=3, mlp_only_layers=[])
    config.decoder_sparse_step = step
    with pytest.raises(UnsupportedModelError, match="decoder_sparse_step must be a positive integer"):
        get_adapter(config).moe_layer_flags(config)
