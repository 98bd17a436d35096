"""What a method computed on the layer-by-layer engine, for the writer to apply while it copies the weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class SequentialPlan:
    #: the stage report's details (as ``apply`` returns them)
    report: dict[str, Any]
    #: original indices of the decoder layers to leave out (the rest are renumbered)
    removed_layers: list[int] = field(default_factory=list)
    #: original layer index → an in-place edit of that layer's materialised module (folding a map, slicing
    #: experts), applied by the writer to the original weights
    layer_edits: dict[int, Callable[[nn.Module], None]] = field(default_factory=dict)
    #: the same change made to a copy of the model on the meta device (no weights): the in-memory path's
    #: structural edit, which gives the output's config, class and remote code
    structural_edit: Callable[[nn.Module], Any] | None = None
    #: tensors the stage adds outside the decoder layers (a trained token retainer), named as the pruned
    #: model's ``state_dict`` names them; written after the source's own
    new_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
