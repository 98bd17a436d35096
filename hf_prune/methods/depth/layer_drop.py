"""Layer drop: remove the same blocks ReplaceMe would, with no map (the UIDL / ShortGPT-style baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...context import PruneContext
from ...engine.activation_store import ActivationStore
from ...engine.layers import LayerRunner
from ...engine.plan import SequentialPlan
from ...registry import register_method
from .cuts import DepthCutConfig, remove_cuts, select_cuts
from .sequential import plan_depth_cuts


@dataclass
class LayerDropConfig(DepthCutConfig):
    """Layer drop: remove a block of layers chosen by angular distance, with no replacement (baseline)."""

    supports_data_parallel = True

    def apply(self, model: Any, context: PruneContext) -> dict[str, Any]:
        return apply_layer_drop(model, self, context)

    def apply_sequential(
        self, runner: LayerRunner, store: ActivationStore, context: PruneContext
    ) -> SequentialPlan:
        return plan_depth_cuts(self, runner, store, context, fit_map=False)


def apply_layer_drop(model: Any, config: LayerDropConfig, context: PruneContext) -> dict[str, Any]:
    layers_before = context.adapter.num_layers(model.config)
    cuts, distances = select_cuts(model, config, context)
    cut_reports = remove_cuts(model, cuts, context)
    return {
        "layers_before": layers_before,
        "layers_after": context.adapter.num_layers(model.config),
        "removed_layers": sorted(i for c in cuts for i in c.removed),
        "cuts": cut_reports,
        "candidate_distances": distances,
    }


register_method("layer_drop", LayerDropConfig)
