"""Remove routed experts from a mixture-of-experts model, in place, and keep the model saveable.

``remove_experts(model, adapter, keep)`` slices the fused expert tensors and the router rows of every MoE
layer to the experts in ``keep``; top-k routing then runs over the remaining experts only (identical to
masking the removed experts' router logits to -inf). The shared expert and its gate are never touched.

Afterwards the config and class agree with the weights (DESIGN.md §5):

- the same count in every MoE layer: the family's own count key (``num_local_experts`` / ``num_experts``)
  is rewritten and the model stays the stock class, loadable by plain transformers;
- different counts: the model becomes the ``hf_prune_<family>`` class of
  ``model_patches/nonuniform_moe.py`` (config field ``experts_per_layer``, 0 for dense layers), which
  ``save_pretrained`` exports as remote code.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...adapters import ModelAdapter, count_parameters
from ...errors import ConfigFieldError, UnsupportedModelError
from ...model_patches import nonuniform_moe
from ..class_swap import swap_config_and_class

FIELD = "keep_experts"


def validate_keep(
    model: nn.Module, adapter: ModelAdapter, keep: dict[int, list[int]]
) -> dict[int, list[int]]:
    """Check ``keep`` against the model and return it normalised (int layer -> sorted unique indices).

    Every MoE decoder layer must be present, no dense or out-of-range layer may be, indices must be unique,
    name existing experts and leave at least top-k experts per layer. Raises ConfigFieldError("keep_experts").
    """
    if not adapter.spec.is_moe:
        raise UnsupportedModelError(
            f"{adapter.model_type}: not a mixture-of-experts model, no experts to remove"
        )
    if not isinstance(keep, dict):
        raise ConfigFieldError(
            FIELD, f"expected a mapping of MoE layer index to expert indices, got {type(keep).__name__}"
        )
    counts = adapter.experts_per_layer(model)
    moe = adapter.moe_layer_indices(model)
    top_k = adapter.top_k(model.config)
    plan: dict[int, list[int]] = {}
    for raw_layer, raw_indices in keep.items():
        layer = _as_int(raw_layer, "layer index")
        if not 0 <= layer < len(counts):
            raise ConfigFieldError(
                FIELD,
                f"layer {raw_layer!r} does not exist (decoder layers 0..{len(counts) - 1}; MoE layers {moe})",
            )
        if counts[layer] == 0:
            raise ConfigFieldError(
                FIELD, f"layer {layer} is a dense layer, it has no experts (MoE layers: {moe})"
            )
        if layer in plan:
            raise ConfigFieldError(FIELD, f"layer {layer} is given more than once")
        if isinstance(raw_indices, (str, bytes)) or not hasattr(raw_indices, "__iter__"):
            raise ConfigFieldError(
                FIELD, f"layer {layer}: expected a list of expert indices, got {raw_indices!r}"
            )
        indices = [_as_int(i, f"layer {layer} expert index") for i in raw_indices]
        n = counts[layer]
        for index in indices:
            if not 0 <= index < n:
                raise ConfigFieldError(
                    FIELD,
                    f"layer {layer}: expert index {index} does not exist "
                    f"(valid range 0..{n - 1}, the layer has {n} experts)",
                )
        duplicates = sorted({i for i in indices if indices.count(i) > 1})
        if duplicates:
            raise ConfigFieldError(
                FIELD, f"layer {layer}: expert indices {duplicates} are listed more than once"
            )
        if len(indices) < top_k:
            raise ConfigFieldError(
                FIELD,
                f"layer {layer}: keeps {len(indices)} experts, fewer than the "
                f"{top_k} each token is routed to (num_experts_per_tok)",
            )
        plan[layer] = sorted(indices)
    missing = [i for i in moe if i not in plan]
    if missing:
        raise ConfigFieldError(
            FIELD, f"MoE layers {missing} are missing: give the experts to keep for every MoE layer {moe}"
        )
    return dict(sorted(plan.items()))


def remove_experts(model: nn.Module, adapter: ModelAdapter, keep: dict[int, list[int]]) -> dict[str, Any]:
    """Keep only the experts ``keep[layer]`` (original indices) in every MoE layer, in place.

    Validates everything first (nothing is modified when it raises), then slices experts and router,
    updates every expert count and makes config and class consistent (stock class when all MoE layers keep
    the same count, ``hf_prune_<family>`` class otherwise). Returns a JSON-ready report.
    """
    plan = validate_keep(model, adapter, keep)
    if adapter.is_vision_language and len({len(kept) for kept in plan.values()}) > 1:
        # Refused before anything is sliced (the hf_prune_<family> classes are decoder-only).
        raise UnsupportedModelError(
            f"{adapter.model_type}: a different expert count per layer is only "
            "supported for decoder-only models; keep the same count in every MoE layer"
        )
    layers = adapter.layers(model)
    before = adapter.experts_per_layer(model)
    params_before = count_parameters(model)
    for index, kept in plan.items():
        layer = layers[index]
        nonuniform_moe.select_experts(adapter.experts(layer), adapter.router(layer), kept)
    after = adapter.experts_per_layer(model)
    uniform = len({n for n in after if n}) == 1
    if uniform:
        _make_stock(model, adapter, max(after))
    else:
        _make_nonuniform(model, adapter, after)
    return {
        "uniform": uniform,
        "model_type": model.config.model_type,
        "experts_per_layer_before": before,
        "experts_per_layer": after,
        "experts_before": sum(before),
        "experts_after": sum(after),
        "params_before": params_before,
        "params_after": count_parameters(model),
        "layers": [
            {
                "layer": i,
                "kept": kept,
                "removed": [e for e in range(before[i]) if e not in kept],
                "experts_before": before[i],
                "experts_after": after[i],
            }
            for i, kept in plan.items()
        ],
    }


def kept_expert_indices_report(report: dict[str, Any]) -> list[str]:
    """One line per MoE layer of a ``remove_experts`` report, for logs and model cards."""
    return [
        f"layer {entry['layer']}: kept experts {entry['kept']} of {entry['experts_before']}"
        for entry in report["layers"]
    ]


# ---- config / class consistency -------------------------------------------------------------------


def _make_stock(model: nn.Module, adapter: ModelAdapter, count: int) -> None:
    """Uniform counts: rewrite the family's count key; an ``hf_prune_`` model goes back to the stock class."""
    if model.config.model_type.startswith(nonuniform_moe.PREFIX):
        config_class, model_class = nonuniform_moe.stock_classes(model.config.model_type)
        swap_config_and_class(
            model,
            config_class,
            model_class,
            {adapter.spec.num_experts_key: count},
            drop=("experts_per_layer",),
        )
    else:
        setattr(adapter.text_config(model.config), adapter.spec.num_experts_key, count)
    adapter.set_head_expert_count(model, count)  # the causal-LM head's copy (load-balancing loss)


def _make_nonuniform(model: nn.Module, adapter: ModelAdapter, counts: list[int]) -> None:
    config_class, model_class = nonuniform_moe.nonuniform_classes(model.config.model_type)
    swap_config_and_class(
        model,
        config_class,
        model_class,
        {adapter.spec.num_experts_key: max(counts), "experts_per_layer": counts},
    )
    adapter.set_head_expert_count(model, max(counts))


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ConfigFieldError(FIELD, f"{what} {value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)  # YAML / JSON mapping keys arrive as strings
    raise ConfigFieldError(FIELD, f"{what} {value!r} is not an integer")
