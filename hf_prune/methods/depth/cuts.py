"""Choosing which contiguous blocks of decoder layers to remove, and removing them (shared by ReplaceMe
and layer_drop).

A cut keeps layer ``kept`` and removes layers ``kept+1 … kept+n``. Its angular distance is
d = mean arccos(cos(h_kept, h_{kept+n})) / π over calibration sequences (last non-pad token, as in the
ReplaceMe paper, or every non-pad token), where h_l is the raw output of decoder layer l.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ...activations import capture_outputs, run_decoder
from ...adapters import ModelAdapter
from ...context import PruneContext
from ...engine.distributed import all_reduce_int, all_reduce_sum
from ...errors import ConfigFieldError
from ..base import OneShotMethod, config_field


@dataclass
class DepthCutConfig(OneShotMethod):
    """Which layers to remove: ``num_layers`` chosen by angular distance, or explicit ``layers``."""

    num_layers: int | None = config_field(None, help="layers to remove in total, chosen by angular distance")
    num_cuts: int = config_field(1, help="split num_layers into this many equal non-overlapping blocks")
    layers: list[int] | None = config_field(
        None, help="explicit [first, last] decoder layers to remove (0-based, inclusive; first >= 1)"
    )
    distance_tokens: Literal["last", "all"] = config_field(
        "last", help="angular distance on the last non-pad token (paper) or on all non-pad tokens"
    )

    def __post_init__(self) -> None:
        if (self.num_layers is None) == (self.layers is None):
            raise ConfigFieldError("num_layers", "give exactly one of num_layers or layers")
        if self.num_cuts < 1:
            raise ConfigFieldError("num_cuts", f"must be a positive integer, got {self.num_cuts}")
        if self.num_layers is not None:
            if self.num_layers < 1:
                raise ConfigFieldError("num_layers", f"must be a positive integer, got {self.num_layers}")
            if self.num_layers % self.num_cuts:
                raise ConfigFieldError(
                    "num_cuts", f"must divide num_layers ({self.num_layers}), got {self.num_cuts}"
                )
        if self.layers is not None:
            if self.num_cuts != 1:
                raise ConfigFieldError("num_cuts", "must be 1 with explicit layers")
            if len(self.layers) != 2 or not 1 <= self.layers[0] <= self.layers[1]:
                raise ConfigFieldError(
                    "layers",
                    f"must be [first, last] with 1 <= first <= last (layer first-1 is kept), got {self.layers}",
                )

    @property
    def needs_calibration(self) -> bool:
        return self.layers is None

    @classmethod
    def unsupported_reason(cls, adapter: ModelAdapter) -> str | None:
        if adapter.spec.token_pruning_only:
            return f"depth pruning does not support {adapter.model_type}: {adapter.spec.token_pruning_only}"
        return None

    def check_model(self, model_config: Any, adapter: ModelAdapter) -> None:
        super().check_model(model_config, adapter)
        total = adapter.num_layers(model_config)
        if self.num_layers is not None and self.num_layers >= total:
            raise ConfigFieldError(
                "num_layers", f"must be less than the model's {total} decoder layers, got {self.num_layers}"
            )
        if self.layers is not None and self.layers[1] >= total:
            raise ConfigFieldError(
                "layers", f"last layer must be below {total} (the model's decoder layers), got {self.layers}"
            )

    def predict_config(self, model_config: Any, adapter: ModelAdapter) -> Any:
        """The config with the removed layers gone: fewer ``num_hidden_layers``, and the per-layer lists
        (``layer_types``, ``experts_per_layer``, Qwen-MoE's dense layers) cut as ``remove_layers`` cuts them.

        With ``num_layers`` the block is chosen on calibration data, so only the count is certain; the
        lists are cut as if the deepest block went."""
        total = adapter.num_layers(model_config)
        first, last = self.layers if self.layers is not None else (total - self.num_layers, total - 1)
        kept = [i for i in range(total) if not first <= i <= last]
        experts = adapter.experts_per_layer_from_config(model_config)
        moe_flags = [experts[i] > 0 for i in kept]
        predicted = copy.deepcopy(model_config)
        adapter.keep_layers_in_config(adapter.text_config(predicted), kept, moe_flags)
        return predicted


@dataclass
class Cut:
    kept: int  # layer whose output stays (ReplaceMe folds its map here)
    removed: list[int]  # original indices of the removed layers
    distances: list[float]  # angular distance of each block merged into this cut (empty if explicit)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept_layer": self.kept,
            "removed_layers": self.removed,
            "angular_distance": [round(d, 6) for d in self.distances],
        }


def angular_distances(model: Any, context: PruneContext, block: int, tokens: str) -> torch.Tensor:
    """d[l] for every start l in 0 … L-1-block: distance between h_l and h_{l+block}."""
    adapter = context.adapter
    decoder = adapter.decoder(model)
    layers = adapter.layers(model)
    num_layers = len(layers)
    starts = num_layers - block
    sums = torch.zeros(starts, dtype=torch.float64)
    count = 0
    batches = context.calibration_batches()
    for batch in tqdm(batches, desc="angular distances", disable=not context.progress, leave=False):
        named = {str(i): layer for i, layer in enumerate(layers)}
        with capture_outputs(named, stop_after=layers[-1]) as outputs:
            run_decoder(decoder, batch)
        states = [distance_rows(outputs[str(i)], batch.attention_mask, tokens) for i in range(num_layers)]
        for start in range(starts):
            sums[start] += angular_distance_sum(states[start], states[start + block])
        count += states[0].shape[0]
    # Data-parallel calibration: every process summed its own batches.
    return all_reduce_sum(sums) / all_reduce_int(count)


def distance_rows(hidden: torch.Tensor, attention_mask: torch.Tensor, tokens: str) -> torch.Tensor:
    """The rows of a layer's output [B, S, d] the angular distance compares: each sequence's last real
    token (``last``) or every real token (``all``), in float64."""
    mask = attention_mask.to(hidden.device).bool()
    if tokens == "last":
        last = mask.sum(dim=1) - 1  # right padding: the last real token
        return hidden[torch.arange(mask.shape[0], device=mask.device), last].double()
    return hidden[mask].double()


def angular_distance_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ over rows of arccos(cos(a, b)) / π."""
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return float((torch.arccos(cos.clamp(-1.0, 1.0)) / torch.pi).sum())


def choose_cuts(distances: torch.Tensor, block: int, num_cuts: int) -> list[Cut]:
    """Greedily take the lowest-distance blocks whose removed layers do not overlap; merge contiguous ones."""
    chosen: list[Cut] = []
    taken: set[int] = set()
    for start in torch.argsort(distances, stable=True).tolist():
        removed = set(range(start + 1, start + block + 1))
        if removed & taken:
            continue
        chosen.append(Cut(start, sorted(removed), [float(distances[start])]))
        taken |= removed
        if len(chosen) == num_cuts:
            break
    if len(chosen) < num_cuts:
        raise ConfigFieldError(
            "num_cuts",
            f"only {len(chosen)} non-overlapping blocks of {block} layers fit after greedy selection; "
            "lower num_cuts or give explicit layers",
        )
    chosen.sort(key=lambda c: c.kept)
    merged: list[Cut] = []
    for cut in chosen:
        if merged and cut.kept == merged[-1].removed[-1]:  # its kept layer is removed by the previous cut
            merged[-1].removed.extend(cut.removed)
            merged[-1].distances.extend(cut.distances)
        else:
            merged.append(cut)
    return merged


def select_cuts(
    model: Any, config: DepthCutConfig, context: PruneContext
) -> tuple[list[Cut], list[float] | None]:
    """The cuts to make (ascending), and the distance of every candidate start (None if explicit)."""
    if config.layers is not None:
        first, last = config.layers
        return [Cut(first - 1, list(range(first, last + 1)), [])], None
    block = config.num_layers // config.num_cuts
    distances = angular_distances(model, context, block, config.distance_tokens)
    return choose_cuts(distances, block, config.num_cuts), [round(float(d), 6) for d in distances]


def shifted(cut: Cut, removed_before: int) -> tuple[int, int]:
    """(kept, deepest removed) indices of ``cut`` after ``removed_before`` earlier layers were deleted."""
    return cut.kept - removed_before, cut.removed[-1] - removed_before


def remove_cuts(
    model: Any, cuts: list[Cut], context: PruneContext, before_removal=None
) -> list[dict[str, Any]]:
    """Delete each cut's layers (ascending, indices shifted); ``before_removal(kept, last)`` runs first."""
    removed_before = 0
    reports = []
    for cut in cuts:
        kept, last = shifted(cut, removed_before)
        entry = cut.to_dict()
        if before_removal is not None:
            entry.update(before_removal(kept, last))
        context.adapter.remove_layers(model, list(range(kept + 1, last + 1)))
        removed_before += len(cut.removed)
        reports.append(entry)
    return reports
