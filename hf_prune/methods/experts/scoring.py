"""Scoring the routed experts of every MoE layer, and choosing which to keep.

Three scores, all computed on the calibration batches with pad tokens excluded:

- ``frequency``: how many tokens have the expert among their top-k (the router's own top-k indices);
- ``router_weight``: the sum over tokens of the expert's routing probability (softmax over *all* experts
  of the router's logits, in float32);
- DiEP (NeurIPS 2025): a learned per-expert score α_{l,e} times a learned per-layer scale β_l, fitted by
  layer-wise reconstruction of the MoE outputs plus the language-model loss (``diep.py``).

The router sees flattened ``[B*S, H]`` tokens, so the attention mask is flattened the same way to drop
pad positions. :func:`select_experts` turns scores into the original expert indices to keep, per layer
(uniform counts) or by one ranking across layers (non-uniform counts).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...activations import capture_outputs, run_decoder
from ...adapters import ModelAdapter
from ...calibration import CalibrationBatch
from ...context import PruneContext
from ...engine.distributed import all_reduce_sum
from ...errors import UnsupportedModelError


def round_half_up(value: float) -> int:
    """``round`` without banker's rounding (round(2.5) is 2 in Python; budgets want 3)."""
    return int(math.floor(value + 0.5))


def moe_layers(model: nn.Module, adapter: ModelAdapter) -> list[int]:
    """Indices of the decoder layers with routed experts; refuses a model without any."""
    indices = adapter.moe_layer_indices(model)
    if not indices:
        raise UnsupportedModelError(
            f"expert pruning needs a Mixture-of-Experts model; {adapter.text_model_type} has no MoE layers"
        )
    return indices


def _num_experts(adapter: ModelAdapter, layer: nn.Module) -> int:
    return adapter.expert_count(layer)


def flat_mask(batch: CalibrationBatch) -> torch.Tensor:
    """[B*S] bool, True for real tokens: the layout the router sees."""
    return batch.attention_mask.reshape(-1).bool()


def _main_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


# ---- router statistics (frequency / router weight baselines) -------------------------------------


@torch.no_grad()
def router_statistics(model: nn.Module, context: PruneContext) -> dict[int, dict[str, torch.Tensor]]:
    """Per MoE layer: ``frequency`` [E] (int64), ``router_weight`` [E] (float64) and ``tokens`` (int64 scalar).

    Forward hooks on every MoE layer's router read its ``(logits, top-k weights, top-k indices)`` output;
    the forward stops after the last MoE layer's router.
    """
    adapter = context.adapter
    layers = adapter.layers(model)
    moe = moe_layers(model, adapter)
    stats: dict[int, dict[str, Any]] = {}
    current: dict[str, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            add_router_output(stats[index], output, current["mask"], index)

        return hook

    handles = []
    try:
        for index in moe:
            stats[index] = empty_router_statistics(_num_experts(adapter, layers[index]))
            # Registered before capture_outputs' stop hook, so the last router is counted before the stop.
            handles.append(adapter.router(layers[index]).register_forward_hook(make_hook(index)))
        last_router = adapter.router(layers[moe[-1]])
        for batch in tqdm(
            context.calibration_batches(), desc="router statistics", disable=not context.progress, leave=False
        ):
            current["mask"] = flat_mask(batch)
            with capture_outputs({}, stop_after=last_router):
                run_decoder(adapter.decoder(model), batch)
    finally:
        for handle in handles:
            handle.remove()
    for entry in stats.values():
        reduce_router_statistics(entry)
    return stats


def empty_router_statistics(num_experts: int) -> dict[str, Any]:
    return {
        "frequency": torch.zeros(num_experts, dtype=torch.int64),
        "router_weight": torch.zeros(num_experts, dtype=torch.float64),
        "tokens": 0,
    }


def add_router_output(entry: dict[str, Any], output: Any, real_tokens: torch.Tensor, index: int) -> None:
    """Count one batch's router output ``(logits, top-k weights, top-k indices)`` on its real tokens."""
    logits, _, indices = output
    num_experts = entry["frequency"].numel()
    logits = logits.reshape(-1, logits.shape[-1])
    keep = real_tokens.to(logits.device)
    if logits.shape[0] != keep.numel():
        raise RuntimeError(
            f"layer {index}: the router saw {logits.shape[0]} tokens, the calibration "
            f"batch has {keep.numel()} positions"
        )
    probs = torch.softmax(logits[keep].float(), dim=-1)
    chosen = indices.reshape(logits.shape[0], -1)[keep]
    entry["frequency"] += torch.bincount(chosen.reshape(-1), minlength=num_experts).cpu()
    entry["router_weight"] += probs.sum(dim=0).double().cpu()
    entry["tokens"] += int(keep.sum())


def reduce_router_statistics(entry: dict[str, Any]) -> None:
    """The token count as a tensor, and every count summed over data-parallel processes."""
    entry["tokens"] = torch.tensor(entry["tokens"], dtype=torch.int64)
    for key in ("frequency", "router_weight", "tokens"):
        all_reduce_sum(entry[key])


# ---- selection ------------------------------------------------------------------------------------


def select_experts(
    scores: dict[int, torch.Tensor],
    *,
    top_k: int,
    keep_ratio: float | None = None,
    keep_experts: int | None = None,
    uniform: bool,
    min_experts_per_layer: int | None = None,
) -> dict[int, list[int]]:
    """Original expert indices to keep in each layer (ascending), highest scores first.

    Give exactly one budget. Uniform: every layer keeps ``keep_experts``, or round(keep_ratio·E_l), of its
    best experts. Non-uniform: one ranking over all (layer, expert) pairs keeps round(keep_ratio·ΣE_l)
    experts in total (``keep_experts``: keep_experts × number of layers in total), while every layer keeps
    at least max(top_k, min_experts_per_layer) of its best ones. Ties: the lower expert index wins within
    a layer, the lower layer index across layers. Rounding is half up. Raises ValueError for a budget that
    cannot be met.
    """
    if (keep_ratio is None) == (keep_experts is None):
        raise ValueError("give exactly one of keep_ratio or keep_experts")
    if not scores:
        return {}
    floor = max(top_k, min_experts_per_layer or 0)
    sizes = {layer: int(s.numel()) for layer, s in scores.items()}
    for layer, size in sizes.items():
        if size < floor:
            raise ValueError(
                f"layer {layer} has {size} experts, fewer than the {floor} every layer must keep"
            )
    values = {layer: [float(v) for v in s.detach().double().cpu().reshape(-1)] for layer, s in scores.items()}

    def ranked(layer: int) -> list[int]:
        return sorted(range(sizes[layer]), key=lambda e: (-values[layer][e], e))

    if uniform:
        keep = {}
        for layer, size in sizes.items():
            count = keep_experts if keep_experts is not None else round_half_up(keep_ratio * size)
            if not floor <= count <= size:
                raise ValueError(
                    f"layer {layer}: keeping {count} of {size} experts; must keep between {floor} and {size}"
                )
            keep[layer] = sorted(ranked(layer)[:count])
        return keep

    total = sum(sizes.values())
    budget = keep_experts * len(sizes) if keep_experts is not None else round_half_up(keep_ratio * total)
    reserved_count = floor * len(sizes)
    if not reserved_count <= budget <= total:
        raise ValueError(
            f"keeping {budget} of {total} experts; must keep between {reserved_count} "
            f"({floor} per layer) and {total}"
        )
    keep = {layer: ranked(layer)[:floor] for layer in sizes}
    pool = [(-values[layer][e], layer, e) for layer in sizes for e in ranked(layer)[floor:]]
    for _, layer, e in sorted(pool)[: budget - reserved_count]:
        keep[layer].append(e)
    return {layer: sorted(kept) for layer, kept in keep.items()}
