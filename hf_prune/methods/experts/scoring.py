"""Scoring the routed experts of every MoE layer, and choosing which to keep.

Three scores, all computed on the calibration batches with pad tokens excluded:

- ``frequency``: how many tokens have the expert among their top-k (the router's own top-k indices);
- ``router_weight``: the sum over tokens of the expert's routing probability (softmax over *all* experts
  of the router's logits, in float32);
- DiEP (NeurIPS 2025): a learned per-expert score α_{l,e} times a learned per-layer scale β_l, fitted by
  layer-wise reconstruction of the MoE outputs plus the language-model loss (see :func:`diep_scores`).

The router sees flattened ``[B*S, H]`` tokens, so the attention mask is flattened the same way to drop
pad positions. :func:`select_experts` turns scores into the original expert indices to keep, per layer
(uniform counts) or by one ranking across layers (non-uniform counts).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...activations import capture_outputs, run_decoder
from ...adapters import ModelAdapter
from ...calibration import CalibrationBatch
from ...context import PruneContext
from ...engine.distributed import all_reduce_sum
from ...errors import CalibrationError, UnsupportedModelError

#: The official DiEP schedule for β_l: this value for the first half of the MoE layers, BETA_LATE after.
BETA_EARLY = 2.0
BETA_LATE = 0.2


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


# ---- DiEP ----------------------------------------------------------------------------------------


def beta_initial_values(num_moe_layers: int, beta_init: str | float) -> list[float]:
    """β_l at the start: the official schedule (2.0 for the first half of the MoE layers, 0.2 after) or a constant."""
    if beta_init == "official":
        return [
            BETA_EARLY if position < num_moe_layers / 2 else BETA_LATE for position in range(num_moe_layers)
        ]
    return [float(beta_init)] * num_moe_layers


@torch.no_grad()
def cache_moe_io(
    model: nn.Module,
    context: PruneContext,
    max_tokens: int,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], int]:
    """Inputs X_l and outputs Z_l ([N, H], float32, CPU) of every MoE block on calibration tokens.

    At most ``max_tokens`` non-pad tokens are kept, spread evenly over all calibration tokens (every
    ceil(total / max_tokens)-th one, in batch order), the same tokens for every layer. Returns
    (inputs, outputs, total calibration tokens).
    """
    adapter = context.adapter
    layers = adapter.layers(model)
    moe = moe_layers(model, adapter)
    batches = context.calibration_batches()
    total = sum(batch.num_tokens for batch in batches)
    stride = max(1, math.ceil(total / max_tokens))
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in moe}
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in moe}
    current: dict[str, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            rows = current["rows"].to(hidden.device)
            inputs[index].append(hidden.reshape(-1, hidden.shape[-1])[rows].float().cpu())
            out = _main_output(output)
            outputs[index].append(out.reshape(-1, out.shape[-1])[rows].float().cpu())

        return hook

    handles = []
    seen = 0
    try:
        for index in moe:
            handles.append(
                adapter.mlp(layers[index]).register_forward_hook(make_hook(index), with_kwargs=True)
            )
        for batch in tqdm(
            batches, desc="DiEP: cache MoE inputs/outputs", disable=not context.progress, leave=False
        ):
            positions = torch.nonzero(flat_mask(batch)).squeeze(1)
            chosen = (torch.arange(positions.numel()) + seen) % stride == 0
            seen += positions.numel()
            if not bool(chosen.any()):
                continue
            current["rows"] = positions[chosen]
            with capture_outputs({}, stop_after=adapter.mlp(layers[moe[-1]])):
                run_decoder(adapter.decoder(model), batch)
    finally:
        for handle in handles:
            handle.remove()
    if not inputs[moe[0]]:
        raise CalibrationError("DiEP: the calibration data gave no token to cache")
    return (
        {i: torch.cat(v) for i, v in inputs.items()},
        {i: torch.cat(v) for i, v in outputs.items()},
        total,
    )


@contextmanager
def alpha_weighted_routing(
    model: nn.Module,
    adapter: ModelAdapter,
    alphas: dict[int, torch.Tensor],
    betas: dict[int, torch.Tensor],
    weighting: str = "replace",
) -> Iterator[None]:
    """Temporarily make every MoE layer l compute β_l·Σ_{e∈topk(x)} α_{l,e}·E_e(x) (``replace``)
    or β_l·Σ_{e∈topk(x)} α_{l,e}·w_e(x)·E_e(x) (``router``), via a forward hook on its router.

    The router still chooses the top-k experts; the hook rescales (or replaces) the top-k weights it
    returns, which the experts module multiplies into each expert's output. Everything else in the block
    (the shared expert and its gate for Qwen2-MoE) is left alone. Hooks are removed on exit.
    """
    layers = adapter.layers(model)
    handles = []

    def make_hook(index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            logits, weights, indices = output
            scale = betas[index] * alphas[index][indices]
            new = scale if weighting == "replace" else scale * weights.float()
            return logits, new.to(weights.dtype), indices

        return hook

    try:
        for index in alphas:
            handles.append(adapter.router(layers[index]).register_forward_hook(make_hook(index)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Model weights frozen and in eval mode (no dropout / router jitter); both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _causal_lm_loss(model: nn.Module, batch: CalibrationBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over non-pad targets (computed here, so no router aux loss is added)."""
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def diep_scores(
    model: nn.Module, context: PruneContext, config: Any
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """DiEP expert scores s_{l,e} = |α_{l,e}|·β_l for every MoE layer l (float32, CPU).

    ``config`` needs the DiEP fields of ``ExpertPruningConfig``: ``lambda_recon``, ``lr_alpha``, ``lr_beta``,
    ``epochs``, ``alpha_epochs``, ``beta_epochs``, ``beta_init``, ``clamp_min``, ``clamp_max``,
    ``max_cached_tokens``, ``lm_loss_weight``, ``alpha_weighting``.

    Per MoE layer: α_l ∈ R^E (init 1) and β_l (init :func:`beta_initial_values`). The candidate output
    of layer l on a token x is β_l·Σ_{e∈topk(x)} α_{l,e}·E_e(x) (``alpha_weighting: replace``: α replaces
    the routing weights, as in METHODS.md and the official code) or β_l·Σ α_{l,e}·w_e(x)·E_e(x)
    (``router``: α rescales the model's own top-k weights, so α = 1, β = 1 is exactly the original
    model), plus the shared expert where the block has one. Loss per step =
    ``lm_loss_weight``·CE(model with every MoE layer α-weighted, on one calibration batch)
    + ``lambda_recon``·Σ_l mean_tokens ‖Z_l − candidate_l(X_l)‖₂ on that step's share of the cached
    (X_l, Z_l). X_l / Z_l come from the unmodified model, so the reconstruction terms are layer-local.
    One epoch = one pass over the calibration batches (one SGD step each); epochs alternate
    ``alpha_epochs`` updating only α and ``beta_epochs`` updating only β; after each step both are
    clamped to [clamp_min, clamp_max]. Model weights are frozen; everything runs on the model's device.

    Returns (scores, details) with details: ``alpha`` / ``beta`` (final, CPU tensors), ``beta_init``,
    ``cached_tokens``, ``calibration_tokens``, ``history`` (per-epoch mean losses) and ``seconds``
    (``cache``, ``per_layer`` reconstruction forward+backward, ``lm_loss``, ``total``).
    """
    started = time.perf_counter()
    adapter = context.adapter
    layers = adapter.layers(model)
    moe = moe_layers(model, adapter)
    batches = context.calibration_batches()
    inputs, targets, calibration_tokens = cache_moe_io(model, context, config.max_cached_tokens)
    cache_seconds = time.perf_counter() - started

    betas_init = beta_initial_values(len(moe), config.beta_init)
    alphas: dict[int, torch.Tensor] = {}
    betas: dict[int, torch.Tensor] = {}
    for position, index in enumerate(moe):
        device = adapter.router(layers[index]).weight.device
        alphas[index] = torch.ones(_num_experts(adapter, layers[index]), device=device, requires_grad=True)
        betas[index] = torch.tensor(betas_init[position], device=device, requires_grad=True)
    optimisers = {
        "alpha": torch.optim.SGD(list(alphas.values()), lr=config.lr_alpha),
        "beta": torch.optim.SGD(list(betas.values()), lr=config.lr_beta),
    }
    steps = len(batches)
    num_cached = inputs[moe[0]].shape[0]
    chunks = torch.tensor_split(torch.arange(num_cached), steps)
    cycle = config.alpha_epochs + config.beta_epochs
    layer_seconds = dict.fromkeys(moe, 0.0)
    lm_seconds = 0.0
    history = []

    with (
        _frozen(model),
        torch.enable_grad(),
        alpha_weighted_routing(model, adapter, alphas, betas, config.alpha_weighting),
    ):
        progress = tqdm(total=config.epochs * steps, desc="DiEP", disable=not context.progress, leave=False)
        for epoch in range(config.epochs):
            phase = "alpha" if epoch % cycle < config.alpha_epochs else "beta"
            for tensor in alphas.values():
                tensor.requires_grad_(phase == "alpha")
            for tensor in betas.values():
                tensor.requires_grad_(phase == "beta")
            optimiser = optimisers[phase]
            recon_total = lm_total = 0.0
            for step, batch in enumerate(batches):
                optimiser.zero_grad(set_to_none=True)
                rows = chunks[step]
                if config.lambda_recon > 0 and rows.numel():
                    for index in moe:
                        tick = time.perf_counter()
                        block = adapter.mlp(layers[index])
                        weight = adapter.router(layers[index]).weight
                        x = inputs[index][rows].to(weight.device, weight.dtype)
                        out = _main_output(block(x.unsqueeze(0))).float().reshape(x.shape)
                        recon = (targets[index][rows].to(out.device) - out).norm(dim=-1).mean()
                        (config.lambda_recon * recon).backward()
                        recon_total += float(recon.detach())
                        layer_seconds[index] += time.perf_counter() - tick
                if config.lm_loss_weight > 0:
                    tick = time.perf_counter()
                    loss = _causal_lm_loss(model, batch)
                    (config.lm_loss_weight * loss).backward()
                    lm_total += float(loss.detach())
                    lm_seconds += time.perf_counter() - tick
                optimiser.step()
                with torch.no_grad():
                    for tensor in (*alphas.values(), *betas.values()):
                        tensor.clamp_(config.clamp_min, config.clamp_max)
                progress.update()
            history.append(
                {
                    "epoch": epoch,
                    "phase": phase,
                    "reconstruction": recon_total / steps,
                    "lm_loss": lm_total / steps if config.lm_loss_weight > 0 else None,
                }
            )
        progress.close()

    alpha_out = {i: a.detach().float().cpu() for i, a in alphas.items()}
    beta_out = {i: b.detach().float().cpu() for i, b in betas.items()}
    scores = {i: alpha_out[i].abs() * beta_out[i] for i in moe}
    details = {
        "alpha": alpha_out,
        "beta": beta_out,
        "beta_init": dict(zip(moe, betas_init, strict=True)),
        "alpha_weighting": config.alpha_weighting,
        "cached_tokens": num_cached,
        "calibration_tokens": calibration_tokens,
        "history": history,
        "seconds": {
            "cache": cache_seconds,
            "per_layer": layer_seconds,
            "lm_loss": lm_seconds,
            "total": time.perf_counter() - started,
        },
    }
    return scores, details


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
