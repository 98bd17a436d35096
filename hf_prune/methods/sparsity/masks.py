"""Magnitude masks for the training-time sparsity methods: which weights to keep, for each pattern.

A mask is a bool tensor shaped like its weight (True: kept), keyed by the weight's parameter name. Every
function here returns new masks and never touches the weights; ``apply_masks`` zeros the pruned entries
of the weights and of the optimizer's per-weight state (momentum, Adam moments), so that neither the next
step nor a regrown weight inherits what a pruned weight had.

Ties in a score (equal magnitudes) go by position: the earlier entry is pruned first (stable sorts).
Weights already pruned score below every live one, so a mask only grows sparser under magnitude pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_PRUNED_SCORE = -1.0  # |w| ≥ 0, so a pruned entry always ranks below every live one


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` smallest entries of a 1-D tensor (ties: the earlier first)."""
    return torch.argsort(scores, stable=True)[:count]


def _live_magnitudes(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = weight.detach().abs().float()
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), _PRUNED_SCORE)
    return scores


def unstructured_masks(
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor] | None,
    sparsity: float,
    scope: str,
) -> dict[str, torch.Tensor]:
    """Prune the round(sparsity·n) smallest |w|: n per weight (``scope="layer"``) or over every weight at
    once (``"global"``, one threshold for all)."""
    scores = {name: _live_magnitudes(w, (masks or {}).get(name)).flatten() for name, w in weights.items()}
    keep = {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
    if scope == "layer":
        for name, s in scores.items():
            keep[name][_lowest(s, round(sparsity * s.numel()))] = False
    else:
        flat = torch.cat([s.cpu() for s in scores.values()])
        pruned = torch.zeros_like(flat, dtype=torch.bool)
        pruned[_lowest(flat, round(sparsity * flat.numel()))] = True
        offset = 0
        for name, s in scores.items():
            keep[name] = ~pruned[offset : offset + s.numel()].to(s.device)
            offset += s.numel()
    return {name: keep[name].view(weights[name].shape) for name in weights}


def n_m_masks(
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor] | None,
    n: int,
    m: int,
    group_fraction: float,
) -> dict[str, torch.Tensor]:
    """N:M masks reached gradually: in each weight, round(group_fraction·G) of its G groups (M consecutive
    inputs of one output row) keep only their N largest |w|; the rest stay whole. Groups already N:M stay
    so; the others go in the order of what pruning them costs (the sum of their M−N smallest |w|).
    ``group_fraction=1`` gives exact N:M everywhere; the sparsity is group_fraction·(1 − N/M)."""
    result = {}
    for name, weight in weights.items():
        live = _live_magnitudes(weight, (masks or {}).get(name)).reshape(-1, m)  # one row per group
        order = torch.argsort(live, dim=1, stable=True)  # each group's entries, smallest first
        smallest = torch.gather(live, 1, order[:, : m - n])
        already = (smallest == _PRUNED_SCORE).all(dim=1)
        cost = torch.where(already, torch.full_like(smallest[:, 0], _PRUNED_SCORE), smallest.sum(dim=1))
        chosen = torch.zeros(live.shape[0], dtype=torch.bool, device=live.device)
        chosen[_lowest(cost, round(group_fraction * live.shape[0]))] = True
        keep = torch.ones_like(live, dtype=torch.bool)
        keep.scatter_(1, order[:, : m - n], ~chosen.unsqueeze(1).expand(-1, m - n))
        result[name] = keep.view(weight.shape)
    return result


@dataclass
class NeuronGroup:
    """One dense MLP: neuron j is row j of each input projection (and of its bias) and column j of the
    output projection, named by parameter name. ``inputs[0]`` is the projection whose row silences the
    neuron: with it (and its bias) zero, the neuron's output is act(0) = 0 (GELU, SiLU), times the other
    input's row in a gated MLP."""

    input_weights: list[str]  # weight names, each [intermediate, hidden]
    input_biases: list[str | None]  # their biases [intermediate], None where there is none
    output_weight: str  # weight name [hidden, intermediate]


def neuron_scores(group: NeuronGroup, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """L1 norm of each neuron's weights: its input rows and its output column."""
    score = params[group.output_weight].detach().abs().float().sum(dim=0)
    for name in group.input_weights:
        score = score + params[name].detach().abs().float().sum(dim=1)
    return score


def expand_neuron_mask(
    group: NeuronGroup, alive: torch.Tensor, params: dict[str, torch.Tensor], *, whole: bool = True
) -> dict[str, torch.Tensor]:
    """The per-parameter masks of a neuron mask (True: neuron kept). ``whole``: every row, bias entry and
    column of the neuron; else only the silencing row and bias (``input_weights[0]``), which leaves the other
    weights in place, so that a dead neuron's silencing row still gets a gradient to be regrown by."""
    rows = group.input_weights if whole else group.input_weights[:1]
    biases = group.input_biases if whole else group.input_biases[:1]
    masks = {name: alive.unsqueeze(1).expand_as(params[name]).clone() for name in rows}
    masks.update({name: alive.clone() for name in biases if name is not None})
    if whole:
        masks[group.output_weight] = alive.unsqueeze(0).expand_as(params[group.output_weight]).clone()
    return masks


def neuron_alive(group: NeuronGroup, masks: dict[str, torch.Tensor] | None, params) -> torch.Tensor:
    """Which neurons of ``group`` are alive under ``masks`` (all when it holds none for the group)."""
    if masks is None or group.input_weights[0] not in masks:
        return torch.ones(
            params[group.output_weight].shape[1], dtype=torch.bool, device=params[group.output_weight].device
        )
    return masks[group.input_weights[0]].any(dim=1)


def neuron_masks(
    groups: list[NeuronGroup],
    params: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor] | None,
    sparsity: float,
    scope: str,
    *,
    whole: bool = True,
) -> dict[str, torch.Tensor]:
    """Prune whole MLP neurons with the smallest L1 norm: round(sparsity·width) per MLP (``"layer"``) or
    round(sparsity·total) over all MLPs (``"global"``). Dead neurons stay dead."""
    scores = []
    for group in groups:
        alive = neuron_alive(group, masks, params)
        scores.append(neuron_scores(group, params).masked_fill(~alive, _PRUNED_SCORE))
    alive_after = [torch.ones_like(s, dtype=torch.bool) for s in scores]
    if scope == "layer":
        for alive, s in zip(alive_after, scores, strict=True):
            alive[_lowest(s, round(sparsity * s.numel()))] = False
    else:
        flat = torch.cat([s.cpu() for s in scores])
        pruned = torch.zeros_like(flat, dtype=torch.bool)
        pruned[_lowest(flat, round(sparsity * flat.numel()))] = True
        offset = 0
        for i, s in enumerate(scores):
            alive_after[i] = ~pruned[offset : offset + s.numel()].to(s.device)
            offset += s.numel()
    result: dict[str, torch.Tensor] = {}
    for group, alive in zip(groups, alive_after, strict=True):
        result.update(expand_neuron_mask(group, alive, params, whole=whole))
    return result


def prune_and_regrow(
    weight: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, int]:
    """GraNet's neuroregeneration on one weight: drop the round(fraction·active) active entries with the
    smallest |w|, then activate as many inactive entries (the just-dropped ones included) with the largest
    |dense gradient|. Returns the new mask and how many were regrown (= dropped): the density is unchanged."""
    live = mask.flatten()
    count = round(fraction * int(live.sum()))
    if count == 0:
        return mask.clone(), 0
    magnitude = weight.detach().abs().float().flatten().masked_fill(~live, float("inf"))
    new = live.clone()
    new[_lowest(magnitude, count)] = False
    growth = grad.detach().abs().float().flatten().masked_fill(new, -1.0)
    new[_lowest(-growth, count)] = True
    return new.view_as(mask), count


def prune_and_regrow_neurons(
    group: NeuronGroup, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor], fraction: float
) -> tuple[dict[str, torch.Tensor], int]:
    """The structured variant on one MLP (silencing masks, ``whole=False``): drop the round(fraction·alive)
    alive neurons with the smallest L1 norm, then revive as many dead ones (the just-dropped included)
    with the largest gradient norm of their silencing row."""
    alive = neuron_alive(group, masks, params)
    count = round(fraction * int(alive.sum()))
    if count == 0:
        return {}, 0
    new = alive.clone()
    new[_lowest(neuron_scores(group, params).masked_fill(~alive, float("inf")), count)] = False
    grad_norm = params[group.input_weights[0]].grad.detach().float().norm(dim=1)
    new[_lowest(-grad_norm.masked_fill(new, -1.0), count)] = True
    return expand_neuron_mask(group, new, params, whole=False), count


def optimizer_state_of(optimizer) -> dict:
    """The per-parameter state of an optimizer, through accelerate's wrapper if there is one."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return getattr(inner, "state", {}) if inner is not None else {}


@torch.no_grad()
def apply_masks(params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor], optimizer=None) -> None:
    """Zero the pruned entries of every masked parameter and of its optimizer state (SGD momentum, Adam's
    first and second moments: any state tensor shaped like the parameter)."""
    state = optimizer_state_of(optimizer)
    for name, mask in masks.items():
        param = params[name]
        keep = mask.to(device=param.device)
        param.mul_(keep.to(param.dtype))
        for value in state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.mul_(keep.to(value.dtype))
