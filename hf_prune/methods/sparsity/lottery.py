"""Lottery tickets by iterative magnitude pruning (Frankle & Carbin; rewinding as in open_lth).

Training runs ``rounds + 1`` times on the same model. After each run but the last, ``fraction_per_round``
of the remaining targeted weights with the smallest |w| are pruned (one global threshold by default), so
after R rounds the sparsity is 1 − (1 − f)^R (95% takes 14 rounds at f = 0.2). Before the next run:

- ``rewind: weights`` (LTR): the surviving weights go back to their values at optimizer step
  ``rewind_step`` of the first run (0: the initialisation), masked;
- ``rewind: learning_rate`` (LRR): the weights stay as trained (masked); the next run replays the
  learning-rate schedule from its start.

Rounds re-run training, so one Trainer is not enough: ``hf_prune.integrations.run_lottery(make_trainer,
config)`` calls ``make_trainer(round)`` for a fresh Trainer (new optimizer and schedule) on the same model
each round and drives this method through it. Masks are re-applied after every optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ConfigFieldError
from ...registry import register_method
from ..base import TrainingMethod, config_field
from .masks import apply_masks, unstructured_masks
from .targets import exclude_field, prunable_weights, scope_field, targets_field


@dataclass
class LotteryConfig(TrainingMethod):
    """Lottery tickets: iterative magnitude pruning over training rounds, rewinding weights or learning rate."""

    rounds: int = config_field(5, help="pruning rounds; training runs rounds + 1 times (run_lottery)")
    fraction_per_round: float = config_field(0.2, help="share of the remaining weights pruned per round")
    rewind: str = config_field("learning_rate", help="learning_rate (LRR) | weights (LTR) between rounds")
    rewind_step: int = config_field(0, help="LTR: rewind to the weights after this optimizer step of round 0")
    final_sparsity: float | None = config_field(
        None,
        help="stop at this sparsity: the last round prunes only up to it (rounds must reach it; "
        "rounds_to_reach(s) gives the fewest)",
    )
    scope: str = scope_field()
    targets: list[str] = targets_field()
    exclude: list[str] = exclude_field()

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigFieldError("rounds", f"must be >= 1, got {self.rounds}")
        if not 0.0 < self.fraction_per_round < 1.0:
            raise ConfigFieldError("fraction_per_round", f"must be in (0, 1), got {self.fraction_per_round}")
        if self.rewind not in ("learning_rate", "weights"):
            raise ConfigFieldError("rewind", f"must be learning_rate | weights, got {self.rewind!r}")
        if self.rewind_step < 0:
            raise ConfigFieldError("rewind_step", f"must be >= 0, got {self.rewind_step}")
        if self.final_sparsity is not None:
            if not 0.0 < self.final_sparsity < 1.0:
                raise ConfigFieldError("final_sparsity", f"must be in (0, 1), got {self.final_sparsity}")
            needed = rounds_to_reach(self.final_sparsity, self.fraction_per_round)
            if self.rounds < needed:
                raise ConfigFieldError(
                    "rounds",
                    f"{self.rounds} rounds of {self.fraction_per_round:g} reach sparsity "
                    f"{1 - (1 - self.fraction_per_round) ** self.rounds:.4f}, below final_sparsity "
                    f"{self.final_sparsity:g}: it takes {needed}",
                )
        if self.scope not in ("global", "layer"):
            raise ConfigFieldError("scope", f"must be global | layer, got {self.scope!r}")
        if not self.targets:
            raise ConfigFieldError("targets", "must name at least one module pattern")
        # Run state: the round (prunings done so far), masks, the weights LTR rewinds to, the history.
        self.round = 0
        self.masks: dict[str, torch.Tensor] = {}
        self.rewind_weights: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, Any]] = []
        self._params: dict[str, torch.nn.Parameter] = {}

    def sparsity_after(self, rounds: int) -> float:
        """The sparsity after ``rounds`` prunings: 1 − (1 − f)^rounds, at most ``final_sparsity``."""
        sparsity = 1.0 - (1.0 - self.fraction_per_round) ** rounds
        return sparsity if self.final_sparsity is None else min(sparsity, self.final_sparsity)

    def check_training_model(self, model: Any) -> None:
        self._params = prunable_weights(model, self.targets, self.exclude)

    def begin(self, model: Any, *, step: int, total_steps: int, optimizer: Any = None) -> None:
        self._params = prunable_weights(model, self.targets, self.exclude)
        if step == 0 and self.round > 0 and self.rewind == "weights":
            with torch.no_grad():
                for name, value in self.rewind_weights.items():
                    self._params[name].copy_(value.to(self._params[name].device))
        if step == 0 and self.round == 0 and self.rewind == "weights" and self.rewind_step == 0:
            self._keep_rewind_point()
        apply_masks(self._params, self.masks, optimizer)

    def after_optimizer_step(self, model: Any, step: int, optimizer: Any) -> None:
        apply_masks(self._params, self.masks, optimizer)
        if self.round == 0 and self.rewind == "weights" and step == self.rewind_step:
            self._keep_rewind_point()

    def _keep_rewind_point(self) -> None:
        self.rewind_weights = {name: p.detach().to("cpu", copy=True) for name, p in self._params.items()}

    def end(self, model: Any) -> dict[str, Any]:
        """After a run: prune the next fraction (unless this was the last run) and report."""
        if self.rewind == "weights" and not self.rewind_weights:
            raise ConfigFieldError("rewind_step", f"the first run ended before step {self.rewind_step}")
        if self.round < self.rounds:
            self.round += 1
            self.masks = unstructured_masks(
                self._params, self.masks or None, self.sparsity_after(self.round), self.scope
            )
            apply_masks(self._params, self.masks)
            self.history.append({"round": self.round, "sparsity": round(self.sparsity_after(self.round), 6)})
        weights = self._params.values()
        zeros = sum(int((w == 0).sum()) for w in weights)
        total = sum(w.numel() for w in weights)
        return {
            "round": self.round,
            "rounds": self.rounds,
            "rewind": self.rewind,
            "sparsity": round(zeros / total, 6) if total else 0.0,
            "pruned_weights": zeros,
            "targeted_weights": total,
            "sparsity_per_weight": {
                n: round(float((w == 0).float().mean()), 6) for n, w in self._params.items()
            },
            "history": list(self.history),
        }

    @property
    def finished(self) -> bool:
        """Whether every round has been pruned and the last run is still to do (or done)."""
        return self.round >= self.rounds

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {f"mask.{n}": m for n, m in self.masks.items()}
        state.update({f"rewind.{n}": w for n, w in self.rewind_weights.items()})
        return state | {"round": self.round, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = {k[5:]: v.bool() for k, v in state.items() if k.startswith("mask.")}
        self.rewind_weights = {k[7:]: v for k, v in state.items() if k.startswith("rewind.")}
        self.round = int(state.get("round", 0))
        self.history = list(state.get("history", []))


def rounds_to_reach(sparsity: float, fraction_per_round: float) -> int:
    """The fewest rounds of ``fraction_per_round`` whose sparsity 1 − (1 − f)^R reaches ``sparsity``."""
    rounds = math.ceil(math.log(1.0 - sparsity) / math.log(1.0 - fraction_per_round) - 1e-9)
    return max(rounds, 1)


register_method("lottery", LotteryConfig)
