"""DiEP (NeurIPS 2025): expert scores s_{l,e} = |α_{l,e}|·β_l learned on calibration data.

Per MoE layer l: α_l ∈ R^E (init 1) and β_l (init :func:`beta_initial_values`). The candidate output of
layer l on a token x is β_l·Σ_{e∈topk(x)} α_{l,e}·E_e(x) (``alpha_weighting: replace``: α replaces the
routing weights, as in METHODS.md and the official code) or β_l·Σ α_{l,e}·w_e(x)·E_e(x) (``router``: α
rescales the model's own top-k weights, so α = 1, β = 1 is exactly the original model), plus the shared
expert where the block has one. Loss per step = ``lm_loss_weight``·CE(model with every MoE layer
α-weighted, on one calibration batch) + ``lambda_recon``·Σ_l mean_tokens ‖Z_l − candidate_l(X_l)‖₂ on that
step's share of the cached (X_l, Z_l). X_l / Z_l come from the unmodified model, so the reconstruction
terms are layer-local. One epoch = one pass over the calibration batches (one SGD step each); epochs
alternate ``alpha_epochs`` updating only α and ``beta_epochs`` updating only β; after each step both are
clamped to [clamp_min, clamp_max]. Model weights are frozen.

:class:`DiepTraining` holds what both engines share (α, β, optimisers, schedule, the reconstruction term,
history); :func:`diep_scores` runs it on a model in memory, ``diep_sequential.py`` one layer at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...activations import capture_outputs, run_decoder
from ...adapters import ModelAdapter
from ...calibration import CalibrationBatch
from ...context import PruneContext
from ...engine.distributed import all_reduce_sum, rank_and_world
from ...engine.layers import next_token_loss, scored_targets
from ...errors import CalibrationError
from .scoring import flat_mask, moe_layers

#: The official DiEP schedule for β_l: this value for the first half of the MoE layers, BETA_LATE after.
BETA_EARLY = 2.0
BETA_LATE = 0.2


def beta_initial_values(num_moe_layers: int, beta_init: str | float) -> list[float]:
    """β_l at the start: the official schedule (2.0 for the first half of the MoE layers, 0.2 after) or a constant."""
    if beta_init == "official":
        return [
            BETA_EARLY if position < num_moe_layers / 2 else BETA_LATE for position in range(num_moe_layers)
        ]
    return [float(beta_init)] * num_moe_layers


@dataclass
class CachedRows:
    """Which calibration tokens have their MoE inputs/outputs cached, as this process sees them.

    At most ``max_tokens`` non-pad tokens of all calibration batches are cached, every
    ceil(total / max_tokens)-th one in batch order, numbered 0… in that order; step b of an epoch uses the
    b-th of ``steps`` equal runs of those numbers. Data-parallel, each process holds the cached tokens of
    its own sequences (``PruneContext.calibration_batches(split="sequences")``)."""

    rows: list[torch.Tensor]  # per batch: this process's flattened positions that are cached
    order: torch.Tensor  # the number of each of this process's cached tokens, in the order of ``rows``
    total: int  # cached tokens over all processes
    calibration_tokens: int  # non-pad calibration tokens over all processes

    def step_share(self, step: int, steps: int) -> tuple[torch.Tensor, int]:
        """(indices into this process's cached tokens used at ``step``, how many all processes use)."""
        chunk = torch.tensor_split(torch.arange(self.total), steps)[step]
        if not chunk.numel():
            return torch.zeros(0, dtype=torch.long), 0
        mine = (self.order >= chunk[0]) & (self.order <= chunk[-1])
        return torch.nonzero(mine).squeeze(1), chunk.numel()


def cached_rows(batches: list[CalibrationBatch], max_tokens: int) -> CachedRows:
    """The :class:`CachedRows` of ``batches`` (every calibration batch, whole) for this process."""
    rank, world = rank_and_world()
    total = sum(batch.num_tokens for batch in batches)
    stride = max(1, math.ceil(total / max_tokens))
    rows, order, seen, numbered = [], [], 0, 0
    for batch in batches:
        length = batch.input_ids.shape[1]
        positions = torch.nonzero(flat_mask(batch)).squeeze(1)
        chosen = positions[(torch.arange(positions.numel()) + seen) % stride == 0]
        seen += positions.numel()
        sequence = chosen // length
        mine = sequence % world == rank
        rows.append((sequence[mine] // world) * length + chosen[mine] % length)
        order.append(torch.arange(numbered, numbered + chosen.numel())[mine])
        numbered += chosen.numel()
    return CachedRows(rows, torch.cat(order), numbered, total)


def main_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def cache_moe_io(
    model: nn.Module,
    context: PruneContext,
    max_tokens: int,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], CachedRows]:
    """Inputs X_l and outputs Z_l ([N, H], float32, CPU) of every MoE block on this process's cached
    calibration tokens (:func:`cached_rows`, the same for every layer). Returns (inputs, outputs, rows)."""
    adapter = context.adapter
    layers = adapter.layers(model)
    moe = moe_layers(model, adapter)
    batches = context.calibration_batches(split="sequences")
    cached = cached_rows(context.all_calibration_batches(), max_tokens)
    if not cached.total:
        raise CalibrationError("DiEP: the calibration data gave no token to cache")
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in moe}
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in moe}
    current: dict[str, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            chosen = current["rows"].to(hidden.device)
            inputs[index].append(hidden.reshape(-1, hidden.shape[-1])[chosen].float().cpu())
            out = main_output(output)
            outputs[index].append(out.reshape(-1, out.shape[-1])[chosen].float().cpu())

        return hook

    handles = []
    try:
        for index in moe:
            handles.append(
                adapter.mlp(layers[index]).register_forward_hook(make_hook(index), with_kwargs=True)
            )
        for batch, chosen in tqdm(
            list(zip(batches, cached.rows, strict=True)),
            desc="DiEP: cache MoE inputs/outputs",
            disable=not context.progress,
            leave=False,
        ):
            if not chosen.numel():
                continue
            current["rows"] = chosen
            with capture_outputs({}, stop_after=adapter.mlp(layers[moe[-1]])):
                run_decoder(adapter.decoder(model), batch)
    finally:
        for handle in handles:
            handle.remove()
    empty = {i: torch.zeros(0, adapter.router(layers[i]).weight.shape[1]) for i in moe}
    return (
        {i: torch.cat(v) if v else empty[i] for i, v in inputs.items()},
        {i: torch.cat(v) if v else empty[i] for i, v in outputs.items()},
        cached,
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
def frozen(model: nn.Module) -> Iterator[None]:
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


class DiepTraining:
    """α and β of every MoE layer, their SGD optimisers, the α/β epoch schedule and the loss history.

    A step is ``zero_grad()``, the caller's backward passes (``reconstruction`` for the layer-local terms,
    ``lm_loss`` for the weighted LM loss, or gradients it propagates itself), then ``step()``."""

    def __init__(self, config: Any, expert_counts: dict[int, int], devices: dict[int, torch.device]):
        self.config = config
        self.moe = sorted(expert_counts)
        self.beta_init = dict(
            zip(self.moe, beta_initial_values(len(self.moe), config.beta_init), strict=True)
        )
        self.alphas = {
            i: torch.ones(expert_counts[i], device=devices[i], requires_grad=True) for i in self.moe
        }
        self.betas = {
            i: torch.tensor(self.beta_init[i], device=devices[i], requires_grad=True) for i in self.moe
        }
        self.optimisers = {
            "alpha": torch.optim.SGD(list(self.alphas.values()), lr=config.lr_alpha),
            "beta": torch.optim.SGD(list(self.betas.values()), lr=config.lr_beta),
        }
        self.history: list[dict[str, Any]] = []
        self.layer_seconds = dict.fromkeys(self.moe, 0.0)
        self.lm_seconds = 0.0
        self._phase = "alpha"
        self._totals = [0.0, 0.0]

    def routing(self, model: nn.Module, adapter: ModelAdapter):
        """The context in which ``model``'s MoE layers are α-weighted (see :func:`alpha_weighted_routing`)."""
        return alpha_weighted_routing(model, adapter, self.alphas, self.betas, self.config.alpha_weighting)

    def begin_epoch(self, epoch: int) -> None:
        cycle = self.config.alpha_epochs + self.config.beta_epochs
        self._phase = "alpha" if epoch % cycle < self.config.alpha_epochs else "beta"
        for tensor in self.alphas.values():
            tensor.requires_grad_(self._phase == "alpha")
        for tensor in self.betas.values():
            tensor.requires_grad_(self._phase == "beta")
        self._totals = [0.0, 0.0]

    def zero_grad(self) -> None:
        self.optimisers[self._phase].zero_grad(set_to_none=True)

    def reconstruction(
        self, index: int, block: nn.Module, x: torch.Tensor, z: torch.Tensor, count: int
    ) -> None:
        """Back-propagate λ·mean_tokens ‖z − block(x)‖₂ for MoE layer ``index`` (cached rows x → z), the
        mean over the ``count`` tokens the step uses in all processes."""
        if not x.shape[0]:
            return
        tick = time.perf_counter()
        weight = next(block.parameters())
        x = x.to(weight.device, weight.dtype)
        out = main_output(block(x.unsqueeze(0))).float().reshape(x.shape)
        recon = (z.to(out.device) - out).norm(dim=-1).sum() / count
        (self.config.lambda_recon * recon).backward()
        self._totals[0] += float(recon.detach())
        self.layer_seconds[index] += time.perf_counter() - tick

    def lm_loss(self, summed: torch.Tensor, count: int, seconds: float = 0.0) -> None:
        """Back-propagate ``lm_loss_weight``·(summed / count): the next-token loss summed over this process's
        targets, over the batch's targets in all processes."""
        tick = time.perf_counter()
        loss = summed / count
        (self.config.lm_loss_weight * loss).backward()
        self._totals[1] += float(loss.detach())
        self.lm_seconds += seconds + time.perf_counter() - tick

    def step(self) -> None:
        """The SGD step, on the gradients summed over data-parallel processes, then the clamp."""
        if rank_and_world()[1] > 1:
            for tensor in (self.alphas if self._phase == "alpha" else self.betas).values():
                if tensor.grad is None:  # nothing of this step reached it in this process
                    tensor.grad = torch.zeros_like(tensor)
                all_reduce_sum(tensor.grad)
        self.optimisers[self._phase].step()
        with torch.no_grad():
            for tensor in (*self.alphas.values(), *self.betas.values()):
                tensor.clamp_(self.config.clamp_min, self.config.clamp_max)

    def end_epoch(self, epoch: int, steps: int) -> None:
        self._totals = all_reduce_sum(torch.tensor(self._totals, dtype=torch.float64)).tolist()
        self.history.append(
            {
                "epoch": epoch,
                "phase": self._phase,
                "reconstruction": self._totals[0] / steps,
                "lm_loss": self._totals[1] / steps if self.config.lm_loss_weight > 0 else None,
            }
        )

    def state(self) -> list[torch.Tensor]:
        """α, β and the history as tensors (for a restart after the epoch)."""
        history = torch.tensor(
            [
                [h["reconstruction"], h["lm_loss"] if h["lm_loss"] is not None else math.nan]
                for h in self.history
            ],
            dtype=torch.float64,
        ).reshape(-1, 2)
        return [
            *(a.detach().cpu() for a in self.alphas.values()),
            torch.stack([b.detach().cpu() for b in self.betas.values()]),
            history,
        ]

    def load_state(self, tensors: list[torch.Tensor]) -> int:
        """Restore :meth:`state`; returns the epochs done."""
        *alphas, betas, history = tensors
        with torch.no_grad():
            for i, alpha, beta in zip(self.moe, alphas, betas, strict=True):
                self.alphas[i].copy_(alpha)
                self.betas[i].copy_(beta)
        cycle = self.config.alpha_epochs + self.config.beta_epochs
        self.history = [
            {
                "epoch": epoch,
                "phase": "alpha" if epoch % cycle < self.config.alpha_epochs else "beta",
                "reconstruction": float(row[0]),
                "lm_loss": None if math.isnan(row[1]) else float(row[1]),
            }
            for epoch, row in enumerate(history.tolist())
        ]
        return len(self.history)

    def results(
        self, cached: CachedRows, cache_seconds: float, total_seconds: float
    ) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
        """(scores |α|·β per MoE layer, details for the stage report)."""
        alpha = {i: a.detach().float().cpu() for i, a in self.alphas.items()}
        beta = {i: b.detach().float().cpu() for i, b in self.betas.items()}
        scores = {i: alpha[i].abs() * beta[i] for i in self.moe}
        details = {
            "alpha": alpha,
            "beta": beta,
            "beta_init": self.beta_init,
            "alpha_weighting": self.config.alpha_weighting,
            "history": self.history,
            "cached_tokens": cached.total,
            "calibration_tokens": cached.calibration_tokens,
            "seconds": {
                "cache": cache_seconds,
                "per_layer": self.layer_seconds,
                "lm_loss": self.lm_seconds,
                "total": total_seconds,
            },
        }
        return scores, details


def causal_lm_loss(model: nn.Module, batch: CalibrationBatch) -> torch.Tensor:
    """Next-token cross-entropy summed over non-pad targets (computed here, so no router aux loss is added)."""
    device = next(model.parameters()).device
    logits = model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False
    ).logits
    return next_token_loss(logits, batch)[0]


def diep_scores(
    model: nn.Module, context: PruneContext, config: Any
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """DiEP expert scores s_{l,e} = |α_{l,e}|·β_l for every MoE layer l (float32, CPU), on a model in memory
    (everything runs on the model's device; see the module docstring for the loss and schedule).

    ``config`` needs the DiEP fields of ``ExpertPruningConfig``: ``lambda_recon``, ``lr_alpha``, ``lr_beta``,
    ``epochs``, ``alpha_epochs``, ``beta_epochs``, ``beta_init``, ``clamp_min``, ``clamp_max``,
    ``max_cached_tokens``, ``lm_loss_weight``, ``alpha_weighting``.

    Returns (scores, details) with details: ``alpha`` / ``beta`` (final, CPU tensors), ``beta_init``,
    ``cached_tokens``, ``calibration_tokens``, ``history`` (per-epoch mean losses) and ``seconds``
    (``cache``, ``per_layer`` reconstruction forward+backward, ``lm_loss``, ``total``).
    """
    started = time.perf_counter()
    adapter = context.adapter
    layers = adapter.layers(model)
    moe = moe_layers(model, adapter)
    batches = context.calibration_batches(split="sequences")
    whole = context.all_calibration_batches()
    inputs, targets, cached = cache_moe_io(model, context, config.max_cached_tokens)
    cache_seconds = time.perf_counter() - started

    training = DiepTraining(
        config,
        {i: adapter.expert_count(layers[i]) for i in moe},
        {i: adapter.router(layers[i]).weight.device for i in moe},
    )
    steps = len(batches)
    with frozen(model), torch.enable_grad(), training.routing(model, adapter):
        progress = tqdm(total=config.epochs * steps, desc="DiEP", disable=not context.progress, leave=False)
        for epoch in range(config.epochs):
            training.begin_epoch(epoch)
            for step, batch in enumerate(batches):
                training.zero_grad()
                rows, count = cached.step_share(step, steps)
                if config.lambda_recon > 0 and count:
                    for index in moe:
                        training.reconstruction(
                            index,
                            adapter.mlp(layers[index]),
                            inputs[index][rows],
                            targets[index][rows],
                            count,
                        )
                if config.lm_loss_weight > 0:
                    tick = time.perf_counter()
                    summed = causal_lm_loss(model, batch)
                    training.lm_loss(summed, scored_targets(whole[step]), time.perf_counter() - tick)
                training.step()
                progress.update()
            training.end_epoch(epoch, steps)
        progress.close()

    return training.results(cached, cache_seconds, time.perf_counter() - started)
