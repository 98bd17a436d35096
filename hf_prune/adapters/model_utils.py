"""Facts about any model that need no architecture table: sizes, device, context length."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def max_positions(model: Any) -> int | None:
    """``max_position_embeddings`` of a model's (text) config, or None when the config does not say."""
    config = getattr(model, "config", None)
    candidates = [config.get_text_config()] if hasattr(config, "get_text_config") else []
    for candidate in [*candidates, config]:
        value = getattr(candidate, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
