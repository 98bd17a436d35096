"""Pruning-at-initialisation scorers: random, magnitude, SNIP, GraSP, SynFlow, and the masks they give.

Each scores every targeted weight (``nn.Linear`` weights, by module name); the mask keeps the highest
scores, over all targets together (``scope="global"``, as SNIP, GraSP and SynFlow prune) or per layer
(``"layer"``):

- random: i.i.d. uniform scores (seeded);
- magnitude: |w|;
- SNIP (Lee et al. 2019): |w ⊙ ∂L/∂w| on a batch;
- GraSP (Wang et al. 2020): S = −w ⊙ H g with g = ∂L/∂w and H the Hessian of L (a Hessian-vector product
  by double backpropagation); GraSP removes the *highest* S, so the mask keeps the lowest;
- SynFlow (Tanaka et al. 2020): weights replaced by |w|, R = 1ᵀ f(1) (all-ones input), score |w ⊙ ∂R/∂w|,
  iterated: round k of ``rounds`` keeps the top (1 − sparsity)^(k / rounds) fraction of the weights kept so
  far, so it needs no data. Computed in float64 (R grows as the product of the layers' norms).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .graphon import GraphonError

SCORERS = ("random", "magnitude", "snip", "grasp", "synflow")


def linear_targets(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` in ``model``, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _weights(model: nn.Module, targets: list[str]) -> dict[str, nn.Parameter]:
    modules = dict(model.named_modules())
    missing = [t for t in targets if not isinstance(modules.get(t), nn.Linear)]
    if missing:
        raise GraphonError(f"targets: {missing[:3]} are not nn.Linear modules of the model")
    return {name: modules[name].weight for name in targets}


def score_weights(
    model: nn.Module,
    method: str,
    targets: list[str],
    *,
    loss: Callable[[nn.Module], torch.Tensor] | None = None,
    objective: Callable[[nn.Module], torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """One round of scores (higher = keep) for each target's weight. ``loss(model)`` gives the scalar loss
    on a batch (SNIP, GraSP); ``objective`` is SynFlow's R (see ``synflow_scores``). The model's weights
    are left as they were."""
    weights = _weights(model, targets)
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return {n: torch.rand(w.shape, generator=generator, dtype=torch.float64) for n, w in weights.items()}
    if method == "magnitude":
        return {n: w.detach().abs().to(torch.float64) for n, w in weights.items()}
    if method in ("snip", "grasp"):
        if loss is None:
            raise GraphonError(
                f"method {method}: needs data (a loss on a batch); random, magnitude and synflow do not"
            )
        grads = torch.autograd.grad(loss(model), list(weights.values()), create_graph=method == "grasp")
        if method == "snip":
            return {
                n: (w.detach() * g).abs().to(torch.float64)
                for (n, w), g in zip(weights.items(), grads, strict=True)
            }
        # H g: the gradient of gᵀ·stop(g), the second backward through the first one's graph.
        dot = sum((g * g.detach()).sum() for g in grads)
        hessian_grad = torch.autograd.grad(dot, list(weights.values()))
        return {
            n: (w.detach() * hg).to(torch.float64)  # −S: the mask keeps the highest, GraSP the lowest S
            for (n, w), hg in zip(weights.items(), hessian_grad, strict=True)
        }
    if method == "synflow":
        return synflow_scores(model, targets, objective)
    raise GraphonError(f"method: unknown scorer {method!r} (allowed: {', '.join(SCORERS)})")


@contextlib.contextmanager
def _absolute_float64(model: nn.Module) -> Iterator[None]:
    """Inside the block every parameter and buffer of ``model`` is its float64 absolute value (eval mode);
    after it, the model is exactly as before (values, dtype, mode)."""
    original = {name: p.detach().clone() for name, p in model.state_dict().items()}
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.double().eval()
    try:
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.abs_()
        yield
    finally:
        model.to(dtype)
        model.load_state_dict(original)
        model.train(was_training)


def _synflow_round(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    objective: Callable[[nn.Module], torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """|w ⊙ ∂R/∂w| on a model already made absolute (``_absolute_float64``)."""
    if objective is None:
        first = next(iter(weights.values()))
        total = model(torch.ones(1, first.shape[1], dtype=torch.float64, device=first.device)).sum()
    else:
        total = objective(model)
    grads = torch.autograd.grad(total, list(weights.values()))
    return {n: (w.detach() * g).abs() for (n, w), g in zip(weights.items(), grads, strict=True)}


def synflow_scores(
    model: nn.Module, targets: list[str], objective: Callable[[nn.Module], torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """One SynFlow round: |w ⊙ ∂R/∂w| with every parameter replaced by its absolute value, in float64.
    R = ``objective(model)``; default: the sum of the outputs for an all-ones input as wide as the first
    target (a plain MLP; a transformer passes e.g. all-ones ``inputs_embeds``). The model is restored
    afterwards."""
    with _absolute_float64(model):
        return _synflow_round(model, _weights(model, targets), objective)


def synflow_masks(
    model: nn.Module,
    targets: list[str],
    density: float,
    *,
    rounds: int,
    scope: str,
    objective: Callable[[nn.Module], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Iterative SynFlow: round k keeps the top density^(k / rounds) of the weights, scored with the
    weights pruned so far set to 0 (and never revived)."""
    with _absolute_float64(model):
        weights = _weights(model, targets)
        absolute = {name: weight.detach().clone() for name, weight in weights.items()}
        masks: dict[str, torch.Tensor] | None = None
        for k in range(1, rounds + 1):
            if masks is not None:
                with torch.no_grad():
                    for name, weight in weights.items():
                        weight.copy_(absolute[name] * masks[name])
            scores = _synflow_round(model, weights, objective)
            if masks is not None:  # a pruned weight scores 0: put it below every live one
                scores = {n: torch.where(masks[n], s, torch.full_like(s, -1.0)) for n, s in scores.items()}
            masks = keep_top(scores, density ** (k / rounds), scope)
    return masks


def keep_top(scores: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the ``density`` fraction of highest scores (rounded to nearest, at least one per
    mask), over all scores together (``global``) or per tensor (``layer``); ties go to the lower index."""
    if scope == "layer":
        return {n: _top_mask(s.flatten(), density).reshape(s.shape) for n, s in scores.items()}
    if scope != "global":
        raise GraphonError(f"scope: must be 'global' or 'layer', got {scope!r}")
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = _top_mask(flat, density)
    masks, offset = {}, 0
    for name, score in scores.items():
        masks[name] = keep[offset : offset + score.numel()].reshape(score.shape)
        offset += score.numel()
    return masks


def _top_mask(flat: torch.Tensor, density: float) -> torch.Tensor:
    """The ``count`` highest entries; of entries equal to the cut-off, the lowest indices. A selection
    (``kthvalue``), not a sort: SynFlow calls this once per round on every weight of the model."""
    count = max(1, round(density * flat.numel()))
    if count >= flat.numel():
        return torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    cutoff = torch.kthvalue(flat.cpu(), flat.numel() - count + 1).values.to(flat.device)
    mask = flat > cutoff
    missing = count - int(mask.sum())
    if missing > 0:
        mask[(flat == cutoff).nonzero().flatten()[:missing]] = True
    return mask


def prune_at_init(
    model: nn.Module,
    method: str,
    sparsity: float,
    *,
    targets: list[str] | None = None,
    loss: Callable[[nn.Module], torch.Tensor] | None = None,
    objective: Callable[[nn.Module], torch.Tensor] | None = None,
    scope: str = "global",
    rounds: int = 100,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Masks (True = kept) for ``targets`` (default: every ``nn.Linear``) at ``sparsity`` by ``method``.
    SynFlow runs ``rounds`` rounds on an exponential schedule; the others score once. ``model`` is not
    changed."""
    if method not in SCORERS:
        raise GraphonError(f"method: unknown scorer {method!r} (allowed: {', '.join(SCORERS)})")
    if not 0 < sparsity < 1:
        raise GraphonError(f"sparsity: must be in (0, 1), got {sparsity}")
    targets = targets if targets is not None else linear_targets(model)
    if not targets:
        raise GraphonError("targets: the model has no nn.Linear layer to prune")
    density = 1.0 - sparsity
    if method != "synflow":
        scores = score_weights(model, method, targets, loss=loss, objective=objective, seed=seed)
        return keep_top(scores, density, scope)
    return synflow_masks(model, targets, density, rounds=rounds, scope=scope, objective=objective)


def apply_masks_(model: nn.Module, masks: dict[str, Any]) -> None:
    """Zero the pruned weights of ``model`` in place (True = kept)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            weight = modules[name].weight
            weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))


def prune_projections_at_init(
    model: nn.Module,
    method: str,
    sparsity: float,
    input_ids: torch.Tensor,
    *,
    scope: str = "global",
    rounds: int = 100,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``prune_at_init`` on every attention and MLP projection of a Hugging Face causal LM's decoder layers
    (the adapter table names them; routers are left out): SNIP and GraSP score with the language-model
    loss on ``input_ids``, SynFlow with R = the sum of the logits for all-ones ``inputs_embeds`` of the
    same length."""
    from ..adapters import get_adapter

    targets, _ = get_adapter(model.config).adapter_targets(model)
    hidden = model.get_input_embeddings().weight.shape[1]

    def loss(m: nn.Module) -> torch.Tensor:
        return m(input_ids=input_ids, labels=input_ids).loss

    def objective(m: nn.Module) -> torch.Tensor:
        ones = torch.ones(1, input_ids.shape[-1], hidden, dtype=torch.float64, device=input_ids.device)
        return m(inputs_embeds=ones).logits.sum()

    # GraSP differentiates the gradient again; the fused SDPA kernels have no double backward.
    attention = model.config._attn_implementation
    if method == "grasp" and attention != "eager":
        model.set_attn_implementation("eager")
    try:
        return prune_at_init(
            model,
            method,
            sparsity,
            targets=targets,
            loss=loss,
            objective=objective,
            scope=scope,
            rounds=rounds,
            seed=seed,
        )
    finally:
        if model.config._attn_implementation != attention:
            model.set_attn_implementation(attention)
