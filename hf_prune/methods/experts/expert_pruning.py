"""Expert pruning for Mixture-of-Experts models: score routed experts, keep the best, remove the rest.

Algorithms (``algorithm``):

- ``diep`` (NeurIPS 2025): learned scores |α_{l,e}|·β_l (see ``diep.py``); non-uniform by
  default, since DiEP's point is one ranking across layers, so counts differ per layer;
- ``frequency``: tokens routed to the expert (top-k membership) on calibration data; uniform by default;
- ``router_weight``: summed routing probability on calibration data; uniform by default.

How α enters DiEP's forward (``alpha_weighting``, default ``replace``): layer l computes
β_l·Σ_{e∈topk(x)} α_{l,e}·E_e(x), α *replacing* the router's top-k weights, as METHODS.md and the
official code do. ``router`` (β_l·Σ α_{l,e}·w_e(x)·E_e(x), α rescaling the router's weights) is kept as
an option: it starts from exactly the original model (α = β = 1), but then the reconstruction error is
zero at the start and its gradient carries no ranking signal, so α barely moves away from 1 and the
scores are close to noise. On the MoE testbed, keeping 50% of the experts, ``router`` gave perplexity
40.6 / 141.3 / 69.2 (stories / shakespeare / wikitext) against 22.5 / 47.3 / 66.4 for ``replace``.

Removal slices the fused experts and the router rows (``removal.remove_experts``): uniform counts keep
the stock architecture with a smaller expert count, non-uniform counts become an ``hf_prune_<family>``
model that reloads with its per-layer counts. Every layer keeps at least top-k experts.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ...adapters import ModelAdapter, get_adapter
from ...context import PruneContext
from ...engine.activation_store import ActivationStore
from ...engine.distributed import all_reduce_int
from ...engine.layers import LayerRunner
from ...engine.plan import SequentialPlan
from ...errors import CalibrationError, ConfigFieldError, UnsupportedModelError
from ...registry import register_method
from ..base import OneShotMethod, config_field
from .diep import diep_scores
from .removal import remove_experts
from .scoring import moe_layers, round_half_up, router_statistics, select_experts
from .sequential import plan_expert_pruning


@dataclass
class ExpertPruningConfig(OneShotMethod):
    """Expert pruning (DiEP, frequency or router weight): remove the lowest-scoring routed experts of an MoE model."""

    algorithm: Literal["diep", "frequency", "router_weight"] = config_field(
        "diep",
        help="how experts are scored: diep (learned α·β), frequency (top-k count), router_weight (summed probability)",
    )
    keep_ratio: float | None = config_field(
        None, help="fraction of routed experts to keep, in (0, 1] (give this or keep_experts)"
    )
    keep_experts: int | None = config_field(
        None,
        help="experts to keep per layer (non-uniform: on average, i.e. keep_experts × MoE layers in total)",
    )
    uniform: bool | None = config_field(
        None, help="same count in every layer (default: false for diep, true for frequency / router_weight)"
    )
    min_experts_per_layer: int | None = config_field(
        None, help="non-uniform: every layer keeps at least this many (and never fewer than top-k)"
    )
    # ---- DiEP (official defaults where the paper / code gives them) ----
    lambda_recon: float = config_field(0.12, help="diep: weight λ of the layer-wise reconstruction loss")
    lr_alpha: float = config_field(
        0.1,
        help="diep: SGD learning rate of the expert scores α (the official value is unknown here: a project choice)",
    )
    lr_beta: float = config_field(
        0.1, help="diep: SGD learning rate of the layer scales β (a project choice, like lr_alpha)"
    )
    epochs: int = config_field(11, help="diep: passes over the calibration batches")
    alpha_epochs: int = config_field(2, help="diep: epochs updating α in each α/β cycle")
    beta_epochs: int = config_field(1, help="diep: epochs updating β in each α/β cycle")
    beta_init: Literal["official"] | float = config_field(
        "official",
        help="diep: β start: official (2.0 for the first half of the MoE layers, 0.2 after) or a constant",
    )
    clamp_min: float = config_field(
        1e-5, help="diep: α and β are clamped to [clamp_min, clamp_max] after each step"
    )
    clamp_max: float = config_field(5.0, help="diep: upper clamp of α and β")
    max_cached_tokens: int = config_field(
        4096, help="diep: calibration tokens whose MoE inputs/outputs are cached per layer (CPU, float32)"
    )
    lm_loss_weight: float = config_field(
        1.0,
        help="diep: weight of the language-model loss (0 skips the full forward/backward: reconstruction only)",
    )
    alpha_weighting: Literal["replace", "router"] = config_field(
        "replace",
        help="diep: α replaces the router's top-k weights (replace: METHODS.md and the official code) "
        "or multiplies them (router)",
    )

    @property
    def needs_calibration(self) -> bool:
        return True

    #: Router counts are sums over tokens; DiEP's gradients are too, for each step's batch.
    supports_data_parallel = True

    @property
    def data_parallel_split(self) -> str:
        # DiEP takes one SGD step per batch: every process takes a share of each batch's sequences
        return "sequences" if self.algorithm == "diep" else "batches"

    def __post_init__(self) -> None:
        if (self.keep_ratio is None) == (self.keep_experts is None):
            raise ConfigFieldError("keep_ratio", "give exactly one of keep_ratio or keep_experts")
        if self.keep_ratio is not None and not 0 < self.keep_ratio <= 1:
            raise ConfigFieldError("keep_ratio", f"must be in (0, 1], got {self.keep_ratio}")
        if self.keep_experts is not None and self.keep_experts < 1:
            raise ConfigFieldError("keep_experts", f"must be a positive integer, got {self.keep_experts}")
        if self.min_experts_per_layer is not None and self.min_experts_per_layer < 1:
            raise ConfigFieldError(
                "min_experts_per_layer", f"must be a positive integer, got {self.min_experts_per_layer}"
            )
        if self.uniform is None:
            self.uniform = self.algorithm != "diep"
        for name in ("lambda_recon", "lm_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigFieldError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.algorithm == "diep" and self.lambda_recon == 0 and self.lm_loss_weight == 0:
            raise ConfigFieldError(
                "lm_loss_weight", "lambda_recon and lm_loss_weight are both 0: DiEP has nothing to fit"
            )
        for name in ("lr_alpha", "lr_beta", "clamp_min"):
            if getattr(self, name) <= 0:
                raise ConfigFieldError(name, f"must be > 0, got {getattr(self, name)}")
        if self.clamp_max <= self.clamp_min:
            raise ConfigFieldError(
                "clamp_max", f"must be > clamp_min ({self.clamp_min}), got {self.clamp_max}"
            )
        for name in ("epochs", "max_cached_tokens"):
            if getattr(self, name) < 1:
                raise ConfigFieldError(name, f"must be a positive integer, got {getattr(self, name)}")
        for name in ("alpha_epochs", "beta_epochs"):
            if getattr(self, name) < 0:
                raise ConfigFieldError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.alpha_epochs == 0:
            raise ConfigFieldError("alpha_epochs", "must be at least 1: α gives the expert scores")
        if self.beta_init != "official" and not self.beta_init > 0:
            raise ConfigFieldError("beta_init", f"must be 'official' or a number > 0, got {self.beta_init}")

    @classmethod
    def unsupported_reason(cls, adapter: ModelAdapter) -> str | None:
        if not adapter.spec.is_moe:
            return (
                f"expert pruning needs a Mixture-of-Experts model; {adapter.text_model_type} has no experts"
            )
        return None

    def check_model(self, model_config: Any, adapter: ModelAdapter) -> None:
        super().check_model(model_config, adapter)
        counts = [n for n in adapter.experts_per_layer_from_config(model_config) if n > 0]
        if not counts:
            raise UnsupportedModelError(
                f"expert pruning: this {adapter.text_model_type} model has no MoE layers"
            )
        if adapter.is_vision_language and not self.uniform:
            raise ConfigFieldError(
                "uniform",
                f"must be true for {adapter.model_type}: different expert counts per "
                "layer are only supported for decoder-only models",
            )
        top_k = adapter.top_k(model_config)
        floor = max(top_k, self.min_experts_per_layer or 0)
        why = (
            f"its {top_k} experts per token"
            if floor == top_k
            else f"min_experts_per_layer {self.min_experts_per_layer}"
        )
        if floor > min(counts):
            raise ConfigFieldError(
                "min_experts_per_layer",
                f"must be at most {min(counts)} (the fewest experts in a "
                f"layer of this model), got {self.min_experts_per_layer}",
            )
        layers = len(counts)
        if self.keep_experts is not None:
            high = min(counts) if self.uniform else sum(counts) // layers
            if not floor <= self.keep_experts <= high:
                raise ConfigFieldError(
                    "keep_experts",
                    f"must be in [{floor}, {high}] for this model (at least {why}, at most its "
                    f"{high} experts per layer), got {self.keep_experts}",
                )
            return
        if self.uniform:
            low = max(floor / n for n in counts)
            short = [n for n in counts if round_half_up(self.keep_ratio * n) < floor]
            kept = (
                f"keeps {round_half_up(self.keep_ratio * short[0])} of {short[0]} experts in a layer"
                if short
                else ""
            )
        else:
            low = floor * layers / sum(counts)
            short = round_half_up(self.keep_ratio * sum(counts)) < floor * layers
            kept = (
                f"keeps {round_half_up(self.keep_ratio * sum(counts))} of {sum(counts)} experts in total"
                if short
                else ""
            )
        if short:
            raise ConfigFieldError(
                "keep_ratio",
                f"must be in [{low:.4g}, 1] for this model ({kept}, fewer than {why}"
                f"{'' if self.uniform else ' in each of its ' + str(layers) + ' MoE layers'}), "
                f"got {self.keep_ratio}",
            )

    def predict_config(self, model_config: Any, adapter: ModelAdapter) -> Any:
        """Uniform pruning: every MoE layer keeps ``keep_experts`` (or round(keep_ratio·E)) experts. A
        non-uniform count per layer follows the scores, unknown before the weights load: left unchanged."""
        if not self.uniform:
            return model_config
        counts = adapter.experts_per_layer_from_config(model_config)
        kept = [
            0
            if n == 0
            else self.keep_experts
            if self.keep_experts is not None
            else round_half_up(self.keep_ratio * n)
            for n in counts
        ]
        predicted = copy.deepcopy(model_config)
        # a stock config's one count: every MoE layer had the same, so keeps the same
        adapter.set_experts_in_config(predicted, kept)
        return predicted

    def apply(self, model: Any, context: PruneContext) -> dict[str, Any]:
        return apply_expert_pruning(model, self, context)

    def supports_sequential(self, adapter: ModelAdapter) -> bool:
        return True

    def apply_sequential(
        self, runner: LayerRunner, store: ActivationStore, context: PruneContext
    ) -> SequentialPlan:
        return plan_expert_pruning(self, runner, store, context)

    def min_calibration_tokens(self, model_config: Any) -> int:
        # Ranking needs at least one token per expert of the largest layer (apply checks it again for
        # callers that bypass the pipeline).
        return max(get_adapter(model_config).experts_per_layer_from_config(model_config), default=0)


def _significant(value: float, digits: int = 6) -> float:
    return float(f"{value:.{digits}g}")


def apply_expert_pruning(model: Any, config: ExpertPruningConfig, context: PruneContext) -> dict[str, Any]:
    adapter = context.adapter
    layers = adapter.layers(model)
    moe = moe_layers(model, adapter)
    before = {i: adapter.expert_count(layers[i]) for i in moe}
    batches = context.calibration_batches(split=config.data_parallel_split)
    tokens = all_reduce_int(sum(batch.num_tokens for batch in batches))  # every process's batches
    if tokens < max(before.values()):
        raise CalibrationError(
            f"expert pruning: the calibration data gave {tokens} tokens, fewer than the {max(before.values())} "
            "experts per layer it must rank (shorter than one batch); add calibration data or raise "
            "calibration.num_samples / seq_len"
        )

    started = time.perf_counter()
    diep: dict[str, Any] | None = None
    if config.algorithm == "diep":
        scores, diep = diep_scores(model, context, config)
    else:
        stats = router_statistics(model, context)
        scores = {i: stats[i][config.algorithm].double() for i in moe}
    scoring_seconds = time.perf_counter() - started

    top_k = adapter.top_k(model.config)
    keep = experts_to_keep(config, scores, top_k)
    removal = remove_experts(model, adapter, keep)
    return expert_pruning_report(config, scores, keep, before, top_k, tokens, scoring_seconds, removal, diep)


def experts_to_keep(
    config: ExpertPruningConfig, scores: dict[int, torch.Tensor], top_k: int
) -> dict[int, list[int]]:
    """The original expert indices each MoE layer keeps under the config's budget."""
    return select_experts(
        scores,
        top_k=top_k,
        keep_ratio=config.keep_ratio,
        keep_experts=config.keep_experts,
        uniform=bool(config.uniform),
        min_experts_per_layer=config.min_experts_per_layer,
    )


def expert_pruning_report(
    config: ExpertPruningConfig,
    scores: dict[int, torch.Tensor],
    keep: dict[int, list[int]],
    before: dict[int, int],
    top_k: int,
    tokens: int,
    scoring_seconds: float,
    removal: dict[str, Any],
    diep: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The stage report: per MoE layer the scores and kept experts, totals, and DiEP's training figures."""
    moe = sorted(scores)
    per_layer = []
    for i in moe:
        entry: dict[str, Any] = {
            "layer": i,
            "experts_before": before[i],
            "experts_after": len(keep[i]),
            "kept": keep[i],
            "scores": [_significant(float(s)) for s in scores[i]],
        }
        if diep is not None:
            entry["alpha"] = [_significant(float(a)) for a in diep["alpha"][i]]
            entry["beta"] = _significant(float(diep["beta"][i]))
            entry["beta_init"] = diep["beta_init"][i]
            entry["scoring_seconds"] = round(diep["seconds"]["per_layer"][i], 4)
        per_layer.append(entry)
    details: dict[str, Any] = {
        "algorithm": config.algorithm,
        "uniform": bool(config.uniform),
        "top_k": top_k,
        "experts_before": sum(before.values()),
        "experts_after": sum(len(k) for k in keep.values()),
        "layers": per_layer,
        "calibration_tokens": tokens,
        "scoring_seconds": round(scoring_seconds, 4),
        "removal": removal,
    }
    if diep is not None:
        seconds = diep["seconds"]
        details["diep"] = {
            "alpha_weighting": diep["alpha_weighting"],
            "cached_tokens": diep["cached_tokens"],
            "history": [
                {k: (_significant(v) if isinstance(v, float) else v) for k, v in h.items()}
                for h in diep["history"]
            ],
            "seconds": {
                "cache": round(seconds["cache"], 4),
                "lm_loss": round(seconds["lm_loss"], 4),
                "total": round(seconds["total"], 4),
            },
        }
    return details


register_method("expert_pruning", ExpertPruningConfig)
