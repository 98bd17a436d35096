"""Gradual magnitude pruning (Zhu & Gupta, 2017) while ``transformers.Trainer`` trains.

Sparsity follows s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(t_f − t₀))³: after every ``frequency``-th optimizer
step from ``start_step`` (and at ``end_step``) the smallest-magnitude weights are pruned up to s_t; after
*every* optimizer step the masks are applied again to the weights and to the optimizer's state, since
the optimizer would otherwise regrow zeros and Adam's moments would revive them. Steps count optimizer
steps (``state.global_step``), never gradient-accumulation micro-batches.

Patterns: ``unstructured`` (global or per-layer magnitude), ``N:M`` (N of every M consecutive inputs kept,
reached gradually: the share of groups made N:M follows the schedule), ``neurons`` (whole MLP neurons by
the L1 norm of their rows and column). The result is the stock architecture with zeros in dense tensors.
Run it with ``PruningCallback`` (``hf_prune.integrations``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ConfigFieldError, RecipeError
from ...registry import register_method
from ..base import TrainingMethod, config_field
from .masks import apply_masks, n_m_masks, neuron_masks, unstructured_masks
from .schedules import cubic_sparsity, is_pruning_step
from .targets import exclude_field, neuron_groups, prunable_weights, scope_field, targets_field

_N_M = re.compile(r"(\d+):(\d+)")
PATTERNS = "unstructured | N:M (e.g. 2:4, 4:8) | neurons"


def parse_n_m(pattern: str) -> tuple[int, int] | None:
    match = _N_M.fullmatch(pattern)
    return (int(match[1]), int(match[2])) if match else None


@dataclass
class GMPConfig(TrainingMethod):
    """Gradual magnitude pruning: sparsity rises on a cubic schedule while Trainer trains (Zhu & Gupta)."""

    final_sparsity: float | None = config_field(
        None, help="share of the targeted weights pruned from end_step on; N:M fixes it at 1 - N/M"
    )
    initial_sparsity: float = config_field(0.0, help="sparsity at start_step, where the schedule begins")
    start_step: int = config_field(0, help="optimizer step of the first pruning (0: before training)")
    end_step: int | None = config_field(
        None, help="optimizer step where final_sparsity is reached (default: half of the run's steps)"
    )
    frequency: int = config_field(10, help="prune every this many optimizer steps between start and end")
    pattern: str = config_field("unstructured", help=f"what is pruned: {PATTERNS}")
    scope: str = scope_field()
    targets: list[str] = targets_field()
    exclude: list[str] = exclude_field()

    def __post_init__(self) -> None:
        self.n_m = parse_n_m(self.pattern)
        if self.pattern not in ("unstructured", "neurons") and self.n_m is None:
            raise ConfigFieldError("pattern", f"must be {PATTERNS}, got {self.pattern!r}")
        if self.n_m is not None:
            n, m = self.n_m
            if not 0 < n < m:
                raise ConfigFieldError("pattern", f"N:M needs 0 < N < M, got {self.pattern!r}")
            implied = 1.0 - n / m
            if self.final_sparsity is not None and abs(self.final_sparsity - implied) > 1e-9:
                raise ConfigFieldError(
                    "final_sparsity",
                    f"pattern {self.pattern} fixes it at {implied:g}; leave it out, got {self.final_sparsity}",
                )
            self.final_sparsity = implied
            if self.scope != "layer":
                raise ConfigFieldError("scope", "N:M holds N of every M in each weight: use scope: layer")
        if self.final_sparsity is None:
            raise ConfigFieldError("final_sparsity", f"missing: required for pattern {self.pattern}")
        if not 0.0 <= self.final_sparsity < 1.0:
            raise ConfigFieldError("final_sparsity", f"must be in [0, 1), got {self.final_sparsity}")
        if not 0.0 <= self.initial_sparsity <= self.final_sparsity:
            raise ConfigFieldError(
                "initial_sparsity",
                f"must be in [0, final_sparsity={self.final_sparsity}], got {self.initial_sparsity}",
            )
        if self.scope not in ("global", "layer"):
            raise ConfigFieldError("scope", f"must be global | layer, got {self.scope!r}")
        if self.start_step < 0:
            raise ConfigFieldError("start_step", f"must be >= 0, got {self.start_step}")
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ConfigFieldError(
                "end_step", f"must be after start_step={self.start_step}, got {self.end_step}"
            )
        if self.frequency < 1:
            raise ConfigFieldError("frequency", f"must be >= 1, got {self.frequency}")
        if not self.targets:
            raise ConfigFieldError("targets", "must name at least one module pattern")
        # Run state (not config fields): set by begin / load_state_dict.
        self.masks: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.total_steps = 0
        self._params: dict[str, torch.nn.Parameter] = {}
        self._groups: list = []

    # ---- the schedule ----------------------------------------------------------------------
    def sparsity_at(self, step: int) -> float:
        """The schedule's sparsity at ``step`` (s_i before start_step, s_f after end_step)."""
        return cubic_sparsity(
            step,
            initial=self.initial_sparsity,
            final=self.final_sparsity,
            start_step=self.start_step,
            end_step=self.last_step,
        )

    @property
    def last_step(self) -> int:
        """``end_step``, or half of the run when it was left out."""
        return self.end_step if self.end_step is not None else max(self.start_step + 1, self.total_steps // 2)

    def is_pruning_step(self, step: int) -> bool:
        return is_pruning_step(
            step, start_step=self.start_step, end_step=self.last_step, frequency=self.frequency
        )

    # ---- hooks -----------------------------------------------------------------------------
    def check_training_model(self, model: Any) -> None:
        """Resolve the targets now (Trainer construction), so a pattern matching nothing fails early."""
        self._resolve(model)

    def begin(self, model: Any, *, step: int, total_steps: int, optimizer: Any = None) -> None:
        self.total_steps = total_steps
        if self.last_step > total_steps:
            raise RecipeError(
                f"end_step: {self.last_step} is after the run's last optimizer step ({total_steps}), so "
                "final_sparsity would never be reached"
            )
        self._resolve(model)
        if step == 0:
            self.masks, self.history = {}, []
            self.start_masks(model)
        self.step = step
        apply_masks(self._params, self.masks, optimizer)

    def start_masks(self, model: Any) -> None:
        """The masks before the first step of a fresh run: ``initial_sparsity`` when the schedule starts at
        step 0, else none (dense)."""
        if self.start_step == 0 and self.initial_sparsity > 0:
            self.update_masks(model, 0)

    def after_optimizer_step(self, model: Any, step: int, optimizer: Any) -> None:
        self.step = step
        if self.is_pruning_step(step):
            self.update_masks(model, step)
        apply_masks(self._params, self.masks, optimizer)

    def update_masks(self, model: Any, step: int) -> None:
        """Prune to the schedule's sparsity at ``step`` and log it."""
        sparsity = self.sparsity_at(step)
        self.masks.update(self.magnitude_masks(sparsity))
        self.history.append({"step": step, "sparsity": round(sparsity, 6)})

    def magnitude_masks(self, sparsity: float, *, whole_neurons: bool = True) -> dict[str, torch.Tensor]:
        params, current = self._params, self.masks or None
        if self.pattern == "neurons":
            return neuron_masks(self._groups, params, current, sparsity, self.scope, whole=whole_neurons)
        if self.n_m is not None:
            n, m = self.n_m
            return n_m_masks(
                params, current, n, m, sparsity / self.final_sparsity if self.final_sparsity else 0
            )
        return unstructured_masks(params, current, sparsity, self.scope)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {f"mask.{name}": mask for name, mask in self.masks.items()}
        return state | {"step": self.step, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = {key[5:]: value.bool() for key, value in state.items() if key.startswith("mask.")}
        self.history = list(state.get("history", []))
        self.step = int(state.get("step", 0))

    def end(self, model: Any) -> dict[str, Any]:
        apply_masks(self._params, self.masks)
        return self.report(model)

    # ---- helpers ---------------------------------------------------------------------------
    def _resolve(self, model: Any) -> None:
        """Find the targeted weights (and MLP neurons) of ``model``; check N:M fits their widths."""
        if self.pattern == "neurons":
            self._groups = neuron_groups(model, self.targets, self.exclude)
            params = dict(model.named_parameters())
            names = [
                n
                for g in self._groups
                for n in [*g.input_weights, *g.input_biases, g.output_weight]
                if n is not None
            ]
            self._params = {name: params[name] for name in names}
            return
        self._params = prunable_weights(model, self.targets, self.exclude)
        if self.n_m is not None:
            m = self.n_m[1]
            for name, weight in self._params.items():
                if weight.dim() != 2 or weight.shape[1] % m:
                    raise RecipeError(
                        f"pattern: {self.pattern} needs 2-D weights whose input width is a multiple of {m}; "
                        f"{name} has shape {tuple(weight.shape)} (leave it out with exclude)"
                    )

    def report(self, model: Any) -> dict[str, Any]:
        """Per-weight and global sparsity measured on the weights, the schedule and the mask history."""
        weights = {n: p for n, p in self._params.items() if not n.endswith(".bias")}
        per_weight = {n: round(float((w == 0).float().mean()), 6) for n, w in weights.items()}
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        total = sum(w.numel() for w in weights.values())
        return {
            "pattern": self.pattern,
            "scope": self.scope,
            "schedule": {
                "initial_sparsity": self.initial_sparsity,
                "final_sparsity": self.final_sparsity,
                "start_step": self.start_step,
                "end_step": self.last_step,
                "frequency": self.frequency,
            },
            "sparsity": round(zeros / total, 6) if total else 0.0,
            "pruned_weights": zeros,
            "targeted_weights": total,
            "sparsity_per_weight": per_weight,
            "mask_updates": len(self.history),
            "history": self.history,
        }


register_method("gmp", GMPConfig)
