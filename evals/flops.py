"""Analytic FLOPs per token from a model's config: the language model, the vision tower, visual token pruning.

Used by ``hf-prune bench`` next to measured latencies: FLOPs do not depend on the machine, so they show
what a pruning removes even where the CPU timings are noisy.
"""

from __future__ import annotations

import math
from typing import Any

from ..adapters import get_adapter, vision_config
from ..model_patches.token_selection import kept_count


def analytic_flops_per_token(config: Any, seq_len: int, image_tokens: int | None = None) -> dict:
    """FLOPs per token of the language model (one sequence), from the config alone.

    Per decoder layer, with H hidden, nh / nkv heads, d head_dim, the matmul parameters are
    attention ``H·nh·d + 2·H·nkv·d + nh·d·H`` plus MLP ``3·H·I`` (gated) or, in a MoE layer, router
    ``H·E`` + top-k experts ``k·3·H·I_moe`` + shared expert ``3·H·I_shared + H`` (Qwen2-MoE); which layers
    are sparse is the adapter's ``moe_layer_flags`` (the rule the stock class builds by). With M the sum
    over layers and V the vocabulary, and attention scores + values costing ``4·nh·d`` per attended key
    and layer (keys capped at the sliding window on sliding layers):

    - ``decode_flops_per_token`` = 2·M + 2·V·H + Σ_layers 4·nh·d·min(seq_len, window)
      (one new token attending ``seq_len`` keys, itself included);
    - ``prefill_flops_per_token`` = 2·M + 2·V·H / seq_len + Σ_layers 4·nh·d·Σ_t min(t, window) / seq_len
      (a causal prefill of ``seq_len`` tokens that, like ``generate``, computes logits for the last one);
    - ``params_active`` = parameters one token touches: M + embedding + head (once if tied) + norms + biases.

    Vision-language configs: the text config as above (``seq_len`` counts the image placeholders) plus
    ``vision_flops_per_crop`` for one vision-tower pass (ViT: 2·params·T + 4·layers·Hv·T² for T tokens,
    the patch embedding, the projector on the image tokens) and ``image_tokens_per_crop``; a LLaVA image
    is one crop, a LLaVA-NeXT image several (base + tiles).

    Visual-token-pruned configs (``token_pruning``): the language model sees ``seq_len`` minus the dropped
    visual tokens, out of ``image_tokens`` placeholders in the sequence (default: one crop's); the prefill
    figure stays per *input* token, so it compares directly with the unpruned model's. The kept share is
    one crop's (exact for LLaVA and Qwen2-VL; LLaVA-NeXT keeps its newline tokens on top).

    Prompt-pruned causal LMs (``token_pruning`` with a ``layer``, ``model_patches/prompt_token_pruning.py``):
    the ``seq_len``-token prompt keeps k = 2 + ⌈keep_ratio·(seq_len − 2)⌉ tokens; layers before ``layer``
    run the prefill on all ``seq_len``, the others on k (each layer's cost as above at its own length),
    still counted per input token; decoding attends the k cached tokens in every layer. ``adtp`` (no
    ``keep_ratio``: a ratio per prompt) is counted at its largest candidate ratio, an upper bound.
    """
    out = _language_model_flops(config, seq_len)
    settings = getattr(config, "token_pruning", None)
    if settings and vision_config(config) is None and "layer" in settings:
        # adtp chooses its ratio per prompt: counted at its largest candidate, an upper bound
        ratio = (
            settings["keep_ratio"]
            if settings.get("keep_ratio") is not None
            else max(settings["candidate_ratios"])
        )
        kept_len = min(seq_len, 2 + math.ceil(ratio * (seq_len - 2) - 1e-6)) if seq_len > 2 else seq_len
        split = settings["layer"]
        prefill = (
            sum(layer["prefill"] for layer in _layer_costs(config, seq_len)[0][:split])
            + sum(layer["prefill"] for layer in _layer_costs(config, kept_len)[0][split:])
            + 2 * _head_size(config)
        )
        out.update(
            prefill_flops_per_token=prefill / seq_len,
            language_model_tokens=kept_len,
            decode_flops_per_token=_language_model_flops(config, kept_len)["decode_flops_per_token"],
        )
        return out
    if settings and hasattr(vision_config(config), "image_size"):
        per_crop = _vision_flops(config)["image_tokens_per_crop"]
        count = per_crop if image_tokens is None else image_tokens
        dropped = count - round(count * kept_count(settings, per_crop) / per_crop)
        kept_len = max(seq_len - dropped, 1)
        pruned = _language_model_flops(config, kept_len)
        out.update(
            prefill_flops_per_token=pruned["prefill_flops_per_token"] * kept_len / seq_len,
            decode_flops_per_token=pruned["decode_flops_per_token"],
            language_model_tokens=kept_len,
        )
    if get_adapter(config).is_vision_language and hasattr(vision_config(config), "image_size"):
        out.update(_vision_flops(config))
    return out


def _language_model_flops(config: Any, seq_len: int) -> dict:
    layers, norms_and_biases = _layer_costs(config, seq_len)
    matmul = sum(layer["matmul"] for layer in layers)
    attn_prefill = sum(layer["attn_prefill"] for layer in layers)
    attn_decode = sum(layer["attn_decode"] for layer in layers)
    t = get_adapter(config).text_config(config)
    head = _head_size(config)
    tied = getattr(t, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
    return {
        "prefill_flops_per_token": 2 * matmul + (2 * head + attn_prefill) / seq_len,
        "decode_flops_per_token": 2 * matmul + 2 * head + attn_decode,
        "params_active": matmul + norms_and_biases + t.hidden_size + head * (1 if tied else 2),
    }


def _head_size(config: Any) -> int:
    t = get_adapter(config).text_config(config)
    return t.vocab_size * t.hidden_size


def _layer_costs(config: Any, seq_len: int) -> tuple[list[dict], int]:
    """Per decoder layer: ``matmul`` parameters one token touches, ``attn_prefill`` (scores + values over a
    causal prefill of ``seq_len`` tokens), ``attn_decode`` (one token after them), ``prefill`` (the layer's
    whole prefill: 2·matmul·seq_len + attn_prefill); and the norm / bias parameters of all layers."""
    adapter = get_adapter(config)
    t = adapter.text_config(config)
    hidden, layers = t.hidden_size, adapter.num_layers(config)
    nh = t.num_attention_heads
    nkv = getattr(t, "num_key_value_heads", None) or nh
    hd = getattr(t, "head_dim", None) or hidden // nh
    attn = hidden * nh * hd + 2 * hidden * nkv * hd + nh * hd * hidden
    extra = 2 * hidden  # input and post-attention norms
    if getattr(t, "attention_bias", False) or adapter.spec.qkv_bias:
        extra += (nh + 2 * nkv) * hd + (hidden if getattr(t, "attention_bias", False) else 0)
    if adapter.spec.qk_norm == "per_head":
        extra += 2 * hd
    elif adapter.spec.qk_norm == "full":
        extra += (nh + nkv) * hd
    dense_mlp, dense_bias = (
        3 * hidden * t.intermediate_size,
        (2 * t.intermediate_size + hidden) * getattr(t, "mlp_bias", False),
    )
    sparse_mlp = 0
    if adapter.spec.is_moe:
        moe_inter = getattr(t, "moe_intermediate_size", None) or t.intermediate_size
        sparse_mlp = hidden * adapter.num_experts(config) + t.num_experts_per_tok * 3 * hidden * moe_inter
        if getattr(t, "shared_expert_intermediate_size", 0):
            sparse_mlp += 3 * hidden * t.shared_expert_intermediate_size + hidden
    moe_flags = adapter.moe_layer_flags(config)
    layer_types = getattr(t, "layer_types", None)
    window = (
        getattr(t, "sliding_window", None) if getattr(t, "use_sliding_window", True) is not False else None
    )
    costs, extra = [], extra * layers
    for i in range(layers):
        sparse = moe_flags[i]
        matmul = attn + (sparse_mlp if sparse else dense_mlp)
        extra += 0 if sparse else dense_bias
        w = (
            window
            if layer_types is None
            else (getattr(t, "sliding_window", None) if layer_types[i] == "sliding_attention" else None)
        )
        w = min(w or seq_len, seq_len)  # keys attended: min(t, w) for token t = 1..seq_len
        attn_prefill = 4 * nh * hd * (w * (w + 1) // 2 + (seq_len - w) * w)
        costs.append(
            {
                "matmul": matmul,
                "attn_prefill": attn_prefill,
                "attn_decode": 4 * nh * hd * w,
                "prefill": 2 * matmul * seq_len + attn_prefill,
            }
        )
    return costs, extra


def _vision_flops(config: Any) -> dict:
    """One vision-tower pass (CLIP / SigLIP style) and its image tokens, for a LLaVA-style config."""
    v, text_hidden = vision_config(config), config.get_text_config().hidden_size
    hv, patches = v.hidden_size, (v.image_size // v.patch_size) ** 2
    cls = 0 if "siglip" in v.model_type else 1
    tokens = patches + cls
    image_tokens = (
        patches if getattr(config, "vision_feature_select_strategy", "default") == "default" else tokens
    )
    feature_layers = getattr(config, "vision_feature_layer", -1)
    proj_in = hv * (len(feature_layers) if isinstance(feature_layers, (list, tuple)) else 1)
    tower = v.num_hidden_layers * (
        2 * tokens * (4 * hv * hv + 2 * hv * v.intermediate_size) + 4 * hv * tokens**2
    )
    patch_embed = 2 * patches * getattr(v, "num_channels", 3) * v.patch_size**2 * hv
    projector = 2 * image_tokens * (proj_in * text_hidden + text_hidden * text_hidden)
    return {"vision_flops_per_crop": tower + patch_embed + projector, "image_tokens_per_crop": image_tokens}
