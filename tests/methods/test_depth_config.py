"""Depth-pruning settings: bad keys named, predicted configs (composite, MoE layer flags, per-layer expert
counts) computed by hand, refused architectures."""

from __future__ import annotations

import pytest
import transformers as tf
from depth_references import (
    HIDDEN,
    VOCAB,
    tiny_llama,
    tiny_llava_config,
)

from hf_prune.adapters import get_adapter
from hf_prune.errors import ConfigFieldError, UnsupportedModelError
from hf_prune.methods.depth.cuts import DepthCutConfig
from hf_prune.methods.depth.replaceme import ReplaceMeConfig


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        ({}, "num_layers", "give exactly one of num_layers or layers"),
        ({"num_layers": 2, "layers": [1, 2]}, "num_layers", "give exactly one of num_layers or layers"),
        ({"num_layers": 2, "num_cuts": 0}, "num_cuts", "must be a positive integer, got 0"),
        ({"num_layers": 0}, "num_layers", "must be a positive integer, got 0"),
        ({"num_layers": 3, "num_cuts": 2}, "num_cuts", "must divide num_layers (3), got 2"),
        ({"layers": [1, 2], "num_cuts": 2}, "num_cuts", "must be 1 with explicit layers"),
        (
            {"layers": [0, 2]},
            "layers",
            "must be [first, last] with 1 <= first <= last (layer first-1 is kept), got [0, 2]",
        ),
        (
            {"layers": [3, 2]},
            "layers",
            "must be [first, last] with 1 <= first <= last (layer first-1 is kept), got [3, 2]",
        ),
        (
            {"layers": [1, 2, 3]},
            "layers",
            "must be [first, last] with 1 <= first <= last (layer first-1 is kept), got [1, 2, 3]",
        ),
        (
            {"layers": [2]},
            "layers",
            "must be [first, last] with 1 <= first <= last (layer first-1 is kept), got [2]",
        ),
        ({"layers": [1, 1], "ridge": -1.0}, "ridge", "must be >= 0, got -1.0"),
        ({"layers": [1, 1], "lr": 0.0}, "lr", "must be > 0, got 0.0"),
        ({"layers": [1, 1], "epochs": 0}, "epochs", "must be a positive integer, got 0"),
        ({"layers": [1, 1], "batch_tokens": 0}, "batch_tokens", "must be a positive integer, got 0"),
    ],
)
def test_bad_fields_are_named(kwargs, field, words):
    with pytest.raises(ConfigFieldError) as err:
        ReplaceMeConfig(**kwargs)
    assert err.value.field == field
    assert err.value.message == words


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_layers": 1, "num_cuts": 1},
        {"layers": [1, 1]},
        {"layers": [5, 5]},
        {"layers": [1, 1], "epochs": 1, "batch_tokens": 1, "ridge": 0.0, "lr": 1e-9},
    ],
)
def test_good_fields_pass(kwargs):
    ReplaceMeConfig(**kwargs)


def test_check_model_bounds_name_the_key():
    config = tiny_llama(4).config
    adapter = get_adapter(config)
    ReplaceMeConfig(num_layers=3).check_model(config, adapter)
    ReplaceMeConfig(layers=[1, 3]).check_model(config, adapter)
    with pytest.raises(ConfigFieldError) as err:
        ReplaceMeConfig(num_layers=4).check_model(config, adapter)
    assert (
        err.value.field == "num_layers"
        and "less than the model's 4 decoder layers, got 4" in err.value.message
    )
    with pytest.raises(ConfigFieldError) as err:
        ReplaceMeConfig(layers=[2, 4]).check_model(config, adapter)
    assert err.value.field == "layers" and "below 4" in err.value.message and "[2, 4]" in err.value.message


def test_calibration_needs_and_token_floor():
    config = tiny_llama(4).config
    assert DepthCutConfig(num_layers=1).needs_calibration
    assert not DepthCutConfig(layers=[1, 1]).needs_calibration
    assert ReplaceMeConfig(layers=[1, 1]).needs_calibration
    assert ReplaceMeConfig(layers=[1, 1]).min_calibration_tokens(config) == HIDDEN
    assert ReplaceMeConfig(layers=[1, 1], estimator="cosine").min_calibration_tokens(config) == 0


def test_replaceme_refuses_post_ffn_norm_before_weights():
    config = tf.Gemma2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    adapter = get_adapter(config)
    reason = ReplaceMeConfig.unsupported_reason(adapter)
    assert reason is not None and reason.startswith("ReplaceMe cannot fold its map into gemma2: ")
    with pytest.raises(UnsupportedModelError, match="ReplaceMe cannot fold"):
        ReplaceMeConfig(layers=[1, 1]).check_model(config, adapter)
    assert DepthCutConfig.unsupported_reason(adapter) is None  # layer_drop may still drop gemma2 layers
    assert ReplaceMeConfig.unsupported_reason(get_adapter(tiny_llama(2).config)) is None


def test_predict_config_of_a_composite_config_leaves_the_source_alone():
    """LLaVA: the prediction cuts the *text* config's count and list; the caller's config (and its text
    config, a sub-object) keeps 4 layers. Planted bug caught: a shallow copy."""
    config = tiny_llava_config()
    adapter = get_adapter(config)
    predicted = ReplaceMeConfig(layers=[1, 2]).predict_config(config, adapter)
    assert predicted.get_text_config().num_hidden_layers == 2
    assert config.get_text_config().num_hidden_layers == 4
    assert config.get_text_config().layer_types == ["full_attention"] * 4
    # The token floor is the text model's hidden size (LLaVA's top config has none).
    assert ReplaceMeConfig(layers=[1, 1]).min_calibration_tokens(config) == HIDDEN


def test_min_calibration_tokens_of_a_plain_config_object():
    from types import SimpleNamespace

    assert ReplaceMeConfig(layers=[1, 1]).min_calibration_tokens(SimpleNamespace(hidden_size=24)) == 24


def test_predict_config_rewrites_qwen2_moe_layer_flags():
    """Qwen2-MoE with decoder_sparse_step 2: layers 1 and 3 of 4 are MoE (by hand: (i+1) % 2 == 0).
    Removing layer 1 leaves old layers 0, 2, 3: dense, dense, MoE, so mlp_only_layers = [0, 1] with step 1.
    Removing the deepest layer (num_layers 1) leaves 0, 1, 2: dense, MoE, dense."""
    config = tf.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, shared_expert_intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[],
    )  # fmt: skip
    adapter = get_adapter(config)
    predicted = ReplaceMeConfig(layers=[1, 1]).predict_config(config, adapter)
    assert predicted.num_hidden_layers == 3
    assert predicted.mlp_only_layers == [0, 1] and predicted.decoder_sparse_step == 1
    predicted = ReplaceMeConfig(num_layers=1).predict_config(config, adapter)
    assert predicted.mlp_only_layers == [0, 2] and predicted.decoder_sparse_step == 1
    assert config.mlp_only_layers == [] and config.decoder_sparse_step == 2


def test_depth_refuses_token_pruning_only_architectures():
    """BERT (an encoder classifier) is refused by the depth base class, and ReplaceMe says the same."""
    config = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    adapter = get_adapter(config)
    expected = (
        "depth pruning does not support bert: an encoder classifier: only text token pruning supports it"
    )
    assert DepthCutConfig.unsupported_reason(adapter) == expected
    assert ReplaceMeConfig.unsupported_reason(adapter) == expected


def test_predict_config_with_per_layer_expert_counts():
    """A non-uniform config (experts_per_layer [0, 1, 0, 1]: layers with a single expert are still MoE):
    removing layer 1 keeps old layers 0, 2, 3, so experts_per_layer [0, 0, 1] and mlp_only_layers [0, 1]."""
    config = tf.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=1,
        moe_intermediate_size=8, shared_expert_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip
    config.experts_per_layer = [0, 1, 0, 1]
    predicted = ReplaceMeConfig(layers=[1, 1]).predict_config(config, get_adapter(config))
    assert predicted.experts_per_layer == [0, 0, 1]
    assert predicted.mlp_only_layers == [0, 1]
