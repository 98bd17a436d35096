"""GraNet (Liu et al., NeurIPS 2021, "Sparse training via boosting pruning plasticity with
neuroregeneration"): gradual magnitude pruning plus regrowth, while ``transformers.Trainer`` trains.

At every pruning step of the GMP schedule, and every ``frequency`` steps after ``end_step`` until the run
ends, each weight drops the fraction r_t of its active entries with the smallest |w| and regrows as many
inactive ones with the largest dense gradient |∂L/∂w| (the gradient of that optimizer step, read before
Trainer zeros it). Regrown weights start at zero with zeroed optimizer moments. r_t decays by cosine from
``initial_regrowth`` to ``final_regrowth`` over the run. With ``init: erk`` training starts sparse at
``initial_sparsity`` with random Erdős–Rényi-Kernel masks (GraNet's sparse-to-sparse mode).

The structured variant (``pattern: neurons``, named in the paper, absent from its code) drops whole MLP
neurons by L1 norm and regrows them by the gradient norm of their silencing row: while a neuron is dead
only that row (the gate of a gated MLP, the input of a plain one) and its bias are zero, which makes its
output exactly zero yet leaves a gradient to rank it by; ``end`` zeros all of a dead neuron's weights.
A step whose gradients are not finite (a skipped fp16 step) regrows nothing in that weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ConfigFieldError
from ...registry import register_method
from ..base import config_field
from .gmp import GMPConfig
from .masks import apply_masks, expand_neuron_mask, neuron_alive, prune_and_regrow, prune_and_regrow_neurons
from .schedules import cosine_fraction, erk_densities


@dataclass
class GraNetConfig(GMPConfig):
    """GraNet: gradual magnitude pruning plus regrowth of the weights with the largest gradients."""

    initial_regrowth: float = config_field(0.5, help="r_t at step 0: share of active weights swapped")
    final_regrowth: float = config_field(0.005, help="r_t at the run's last step (cosine decay)")
    init: str = config_field(
        "dense", help="dense | erk: start dense, or sparse at initial_sparsity (ERK masks)"
    )
    seed: int = config_field(0, help="random seed of the ERK initial masks")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("initial_regrowth", "final_regrowth"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigFieldError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.init not in ("dense", "erk"):
            raise ConfigFieldError("init", f"must be dense | erk, got {self.init!r}")
        if self.init == "erk" and (self.pattern != "unstructured" or self.initial_sparsity <= 0):
            raise ConfigFieldError(
                "init", "erk starts sparse: it needs pattern: unstructured and initial_sparsity > 0"
            )
        if self.n_m is not None:
            raise ConfigFieldError(
                "pattern", "GraNet regrows single weights or neurons: unstructured | neurons"
            )
        self.ever_active: dict[str, torch.Tensor] = {}
        self.skipped_regrowth = 0

    def regrowth_fraction(self, step: int) -> float:
        """r_t: cosine decay from ``initial_regrowth`` (step 0) to ``final_regrowth`` (the last step)."""
        return cosine_fraction(
            step, self.total_steps, initial=self.initial_regrowth, final=self.final_regrowth
        )

    def is_regrowth_step(self, step: int) -> bool:
        after_end = step > self.last_step and (step - self.last_step) % self.frequency == 0
        return self.is_pruning_step(step) or after_end

    def begin(self, model: Any, *, step: int, total_steps: int, optimizer: Any = None) -> None:
        if step == 0:
            self.ever_active, self.skipped_regrowth = {}, 0
        super().begin(model, step=step, total_steps=total_steps, optimizer=optimizer)
        self._track_ever_active()

    def start_masks(self, model: Any) -> None:
        if self.init == "erk":
            self.masks = self.erk_masks()
            self.history.append({"step": 0, "sparsity": self.initial_sparsity, "init": "erk"})
        else:
            super().start_masks(model)

    def erk_masks(self) -> dict[str, torch.Tensor]:
        """Random masks at density 1 − initial_sparsity overall, spread over the weights by ERK."""
        generator = torch.Generator().manual_seed(self.seed)
        densities = erk_densities(
            [tuple(w.shape) for w in self._params.values()], 1.0 - self.initial_sparsity
        )
        masks = {}
        for (name, weight), density in zip(self._params.items(), densities, strict=True):
            keep = torch.zeros(weight.numel(), dtype=torch.bool)
            keep[torch.randperm(weight.numel(), generator=generator)[: round(density * weight.numel())]] = (
                True
            )
            masks[name] = keep.view(weight.shape).to(weight.device)
        return masks

    def magnitude_masks(self, sparsity: float, *, whole_neurons: bool = True) -> dict[str, torch.Tensor]:
        # Dead neurons keep a gradient only if their other weights stay: silencing masks while training.
        return super().magnitude_masks(sparsity, whole_neurons=False)

    def after_optimizer_step(self, model: Any, step: int, optimizer: Any) -> None:
        self.step = step
        if self.is_pruning_step(step):
            self.update_masks(model, step)
        if self.is_regrowth_step(step) and self.masks:
            apply_masks(self._params, self.masks, optimizer)  # magnitudes after pruning, before regrowth
            regrown = self.regrow(self.regrowth_fraction(step))
            if self.history and self.history[-1]["step"] == step:
                self.history[-1]["regrown"] = regrown
            else:
                self.history.append(
                    {"step": step, "sparsity": self.history[-1]["sparsity"], "regrown": regrown}
                )
        apply_masks(self._params, self.masks, optimizer)
        self._track_ever_active()

    def regrow(self, fraction: float) -> int:
        """Per weight (or MLP), swap ``fraction`` of the active entries for the inactive ones with the
        largest gradients; returns how many were regrown in all."""
        total = 0
        if self.pattern == "neurons":
            for group in self._groups:
                if not all(self._finite_grad(n) for n in group.input_weights[:1]):
                    self.skipped_regrowth += 1
                    continue
                new, count = prune_and_regrow_neurons(group, self._params, self.masks, fraction)
                self.masks.update(new)
                total += count
            return total
        for name, mask in self.masks.items():
            if not self._finite_grad(name):
                self.skipped_regrowth += 1
                continue
            param = self._params[name]
            self.masks[name], count = prune_and_regrow(param, param.grad, mask, fraction)
            total += count
        return total

    def _finite_grad(self, name: str) -> bool:
        grad = self._params[name].grad
        return grad is not None and bool(torch.isfinite(grad).all())

    def _track_ever_active(self) -> None:
        """Union of the masks from ``end_step`` on: the final density plus what regrowth explored there
        (before it every weight was active in a dense start, which would say nothing)."""
        if self.step < self.last_step:
            return
        for name, mask in self.masks.items():
            seen = self.ever_active.get(name)
            self.ever_active[name] = mask.clone() if seen is None else seen | mask

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({f"ever_active.{n}": m for n, m in self.ever_active.items()})
        return state | {"skipped_regrowth": self.skipped_regrowth}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.ever_active = {k[12:]: v.bool() for k, v in state.items() if k.startswith("ever_active.")}
        self.skipped_regrowth = int(state.get("skipped_regrowth", 0))

    def end(self, model: Any) -> dict[str, Any]:
        if self.pattern == "neurons":  # dead neurons lose all their weights, not only the silencing row
            for group in self._groups:
                self.masks.update(
                    expand_neuron_mask(group, neuron_alive(group, self.masks, self._params), self._params)
                )
        details = super().end(model)
        seen = [m for n, m in self.ever_active.items() if not n.endswith(".bias")]
        if seen:
            details["ever_active_fraction"] = round(
                sum(int(m.sum()) for m in seen) / sum(m.numel() for m in seen), 6
            )
        details["regrowth"] = {
            "initial": self.initial_regrowth,
            "final": self.final_regrowth,
            "init": self.init,
        }
        details["skipped_regrowth"] = self.skipped_regrowth
        return details


register_method("granet", GraNetConfig)
