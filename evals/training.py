"""Shared pieces of the project's own testbed builders (the demo Llama, the MoE testbed)."""

from __future__ import annotations

import math
import os
import pathlib

import torch


def cache_root() -> pathlib.Path:
    """Where built testbeds are cached: ``$HF_PRUNE_CACHE``, else ``~/.cache/hf_prune`` (outside the repo)."""
    env = os.environ.get("HF_PRUNE_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "hf_prune"


def adamw_warmup_cosine(model: torch.nn.Module, *, steps: int, peak_lr: float, warmup_fraction: float):
    """AdamW (β 0.9/0.95, weight decay 0.1) with linear warm-up, then cosine decay to 10% of the peak."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, int(warmup_fraction * steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
