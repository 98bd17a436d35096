"""Facts about any model that need no architecture table: sizes, device, context length."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


def model_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its parameters' device or, for a model dispatched by accelerate
    (``device_map``) whose offloaded weights sit on the meta device, the device its first module runs on
    (disk-offloaded modules run on the first GPU of the map, else on the CPU)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        placements = list(device_map.values())
        first = placements[0]
        if first == "disk":
            gpus = [p for p in placements if isinstance(p, int)]
            first = min(gpus) if gpus else "cpu"
        return torch.device("cuda", first) if isinstance(first, int) else torch.device(first)
    return next(model.parameters()).device


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@contextlib.contextmanager
def use_cache_restored(model: Any) -> Iterator[None]:
    """Give ``model.config.use_cache`` back its value after the block: transformers' ``Trainer`` sets it
    to ``TrainingArguments.use_cache`` (False by default) when it is built, and a checkpoint saved after
    training would otherwise keep that (a healed or retrained model whose config differs from its source's)."""
    config = getattr(model, "config", None)
    had, value = config is not None and "use_cache" in vars(config), getattr(config, "use_cache", None)
    try:
        yield
    finally:
        if had:
            config.use_cache = value
        elif config is not None and "use_cache" in vars(config):
            del config.use_cache
