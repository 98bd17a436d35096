"""ReplaceMe (NeurIPS 2025): replace a block of decoder layers by one linear map, folded into weights.

For a cut that keeps layer l and removes l+1 … l+n: M = MLP output of layer l, Y = h_l − M, target
h_{l+n}. T is fitted so that Y + M·T ≈ h_{l+n}, then folded into the MLP output projection(s) of
layer l (W ← Tᵀ·W; every expert and the shared expert for MoE layers), and the n layers are deleted.
The result is the stock architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ...activations import capture_outputs, run_decoder
from ...adapters import ModelAdapter
from ...context import PruneContext
from ...engine.activation_store import ActivationStore
from ...engine.distributed import is_distributed
from ...engine.layers import InMemoryModel, LayerRunner
from ...engine.plan import SequentialPlan
from ...errors import ConfigFieldError
from ...registry import register_method
from ..base import config_field
from .cuts import DepthCutConfig, remove_cuts, select_cuts
from .estimators import NormalEquations, fit_cosine_map
from .sequential import plan_depth_cuts


@dataclass
class ReplaceMeConfig(DepthCutConfig):
    """ReplaceMe: remove a block of layers and fold a calibrated linear map into the kept layer's MLP."""

    estimator: Literal["lstsq", "cosine"] = config_field("lstsq", help="how T is fitted")
    ridge: float = config_field(0.0, help="lstsq ridge α (raised automatically if MᵀM is singular)")
    cosine_loss: Literal["residual", "full"] = config_field(
        "residual", help="cosine: 1-cos(M·T, target-Y) (residual) or 1-cos(M·T+Y, target) (full)"
    )
    lr: float = config_field(1e-4, help="cosine: Adam learning rate (official default)")
    epochs: int = config_field(10, help="cosine: passes over the calibration tokens")
    batch_tokens: int = config_field(1024, help="cosine: tokens per optimisation step")
    seed: int = config_field(0, help="cosine: shuffling seed")
    cut_selection: Literal["angular", "residual", "loss"] = config_field(
        "angular",
        help="with num_layers: the block with the lowest angular distance (paper); residual: whose map, fitted "
        "on 4 of 5 calibration tokens, leaves the lowest residual on the fifth; loss: whose map, fitted on 4 "
        "of 5 calibration batches, gives the lowest language-model loss on the fifth",
    )

    supports_data_parallel = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ridge < 0:
            raise ConfigFieldError("ridge", f"must be >= 0, got {self.ridge}")
        if self.lr <= 0:
            raise ConfigFieldError("lr", f"must be > 0, got {self.lr}")
        for name in ("epochs", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigFieldError(name, f"must be a positive integer, got {getattr(self, name)}")

    @property
    def needs_calibration(self) -> bool:
        return True

    @classmethod
    def unsupported_reason(cls, adapter: ModelAdapter) -> str | None:
        reason = super().unsupported_reason(adapter)
        if reason:
            return reason
        if adapter.spec.mlp_not_on_residual:
            return f"ReplaceMe cannot fold its map into {adapter.text_model_type}: {adapter.spec.mlp_not_on_residual}"
        return None

    def apply(self, model: Any, context: PruneContext) -> dict[str, Any]:
        if self.cut_selection != "angular" and self.layers is None:
            # Every candidate's map needs the cached boundary activations: the layer-by-layer pass, in memory.
            runner = LayerRunner(InMemoryModel(model), context.adapter, context.calibration_batches())
            store = ActivationStore(None, memory_budget=0, fingerprint="")
            try:
                plan = plan_depth_cuts(self, runner, store, context, fit_map=True)
            finally:
                store.close()
            context.adapter.remove_layers(model, plan.removed_layers)  # the maps are folded in place
            return plan.report
        return apply_replaceme(model, self, context)

    def apply_sequential(
        self, runner: LayerRunner, store: ActivationStore, context: PruneContext
    ) -> SequentialPlan:
        return plan_depth_cuts(self, runner, store, context, fit_map=True)

    def min_calibration_tokens(self, model_config: Any) -> int:
        # lstsq solves for a d×d map: with fewer than d tokens MᵀM is rank-deficient, the ridge fallback
        # makes it solvable and the map fits the few tokens exactly (an under-determined fit, not a model of
        # the removed layers). The cosine estimator starts from the identity and only nudges it: no floor.
        if self.estimator != "lstsq":
            return 0
        text_config = (
            model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        )
        return int(text_config.hidden_size)


@torch.no_grad()
def fold_linear_map_into_mlp_output(
    adapter: ModelAdapter, layer: torch.nn.Module, transform: torch.Tensor
) -> list[str]:
    """W ← Tᵀ·W (and b ← Tᵀ·b) for every projection that sums into the layer's MLP output."""
    t_transposed = transform.to(torch.float64).T
    folded = []
    for name, weight, bias in adapter.mlp_output_projections(layer):
        w = weight.to(torch.float64)
        t = t_transposed.to(w.device)
        # [out, in] for a Linear, [experts, out, in] for fused experts.
        new = t @ w if w.dim() == 2 else torch.einsum("oh,ehi->eoi", t, w)
        weight.copy_(new.to(weight.dtype))
        if bias is not None:
            bias.copy_((bias.to(torch.float64) @ t.T).to(bias.dtype))
        folded.append(name)
    return folded


class MapFit:
    """Streaming fit of T for one cut: ``add`` each batch's kept-layer output h, its MLP output M and the
    target h_{l+n} (real tokens only), then ``solve``. Sums add across batches and processes."""

    def __init__(self, dim: int, config: ReplaceMeConfig, device: torch.device | str):
        self.config = config
        self.device = device
        self.equations = NormalEquations(dim, device)
        self.tokens: dict[str, list[torch.Tensor]] = {"m": [], "r": [], "y": []}

    def add(
        self, mlp_out: torch.Tensor, hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> None:
        mask = mask.to(hidden.device).bool()
        m, h, t = mlp_out[mask], hidden[mask], target[mask]
        y = h - m
        residual = t.to(torch.float64) - y.to(torch.float64)
        self.equations.add(m, residual)
        if self.config.estimator == "cosine":
            self.tokens["m"].append(m.float().cpu())
            self.tokens["r"].append(residual.float().cpu())
            if self.config.cosine_loss == "full":
                self.tokens["y"].append(y.float().cpu())

    def solve(self, progress: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        config, equations = self.config, self.equations
        equations.all_reduce()
        alpha = None
        if config.estimator == "lstsq":
            transform, alpha = equations.solve(config.ridge)
        else:
            if is_distributed():
                raise ConfigFieldError("estimator", "cosine is not data-parallel; use lstsq, or one process")
            transform = fit_cosine_map(
                torch.cat(self.tokens["m"]),
                torch.cat(self.tokens["r"]),
                torch.cat(self.tokens["y"]) if self.tokens["y"] else None,
                lr=config.lr,
                epochs=config.epochs,
                batch_tokens=config.batch_tokens,
                seed=config.seed,
                device=self.device,
                progress=progress,
            )
        dim = equations.gram.shape[0]
        identity_error = equations.squared_error(torch.eye(dim, dtype=torch.float64))
        fitted_error = equations.squared_error(transform)
        stats = {
            "calibration_tokens": equations.num_tokens,
            # ‖M·T − R‖² / ‖R‖²: how much of the removed layers' contribution the map leaves unexplained.
            "relative_error_without_map": identity_error / max(float(equations.target_sq), 1e-30),
            "relative_error_with_map": fitted_error / max(float(equations.target_sq), 1e-30),
        }
        if alpha is not None:
            stats["ridge_used"] = alpha
        return transform, stats


def estimate_map(
    model: Any, kept: int, last_removed: int, config: ReplaceMeConfig, context: PruneContext
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Fit T for the cut (kept, last_removed) on calibration data; forward passes stop at last_removed."""
    adapter = context.adapter
    layers = adapter.layers(model)
    decoder = adapter.decoder(model)
    watched = {"h": layers[kept], "mlp": adapter.mlp(layers[kept]), "target": layers[last_removed]}
    dim = adapter.text_config(model.config).hidden_size
    fit = MapFit(dim, config, next(layers[kept].parameters()).device)
    for batch in tqdm(
        context.calibration_batches(),
        desc=f"calibrate layers {kept + 1}-{last_removed}",
        disable=not context.progress,
        leave=False,
    ):
        with capture_outputs(watched, stop_after=layers[last_removed]) as out:
            run_decoder(decoder, batch)
        fit.add(out["mlp"], out["h"], out["target"], batch.attention_mask)
    return fit.solve(context.progress)


def apply_replaceme(model: Any, config: ReplaceMeConfig, context: PruneContext) -> dict[str, Any]:
    layers_before = context.adapter.num_layers(model.config)
    cuts, distances = select_cuts(model, config, context)

    def fit_and_fold(kept: int, last: int) -> dict[str, Any]:
        transform, stats = estimate_map(model, kept, last, config, context)
        layer = context.adapter.layers(model)[kept]
        return {**stats, "folded_into": fold_linear_map_into_mlp_output(context.adapter, layer, transform)}

    cut_reports = remove_cuts(model, cuts, context, fit_and_fold)
    return {
        "estimator": config.estimator,
        "layers_before": layers_before,
        "layers_after": context.adapter.num_layers(model.config),
        "removed_layers": sorted(i for c in cuts for i in c.removed),
        "cuts": cut_reports,
        "candidate_distances": distances,
    }


register_method("replaceme", ReplaceMeConfig)
