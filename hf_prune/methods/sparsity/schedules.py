"""Schedules of the training-time sparsity methods: the cubic sparsity ramp (Zhu & Gupta), GraNet's cosine
regrowth fraction, and ERK layer densities (Evci et al.'s Erdős–Rényi-Kernel, as GraNet uses for a sparse
start). Plain functions of step numbers and shapes; the methods call them."""

from __future__ import annotations

import math
from collections.abc import Sequence


def cubic_sparsity(step: int, *, initial: float, final: float, start_step: int, end_step: int) -> float:
    """Zhu & Gupta's schedule s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(t_f − t₀))³, held at s_i before
    ``start_step`` and at s_f after ``end_step``."""
    if step <= start_step:
        return initial
    if step >= end_step:
        return final
    progress = (step - start_step) / (end_step - start_step)
    return final + (initial - final) * (1.0 - progress) ** 3


def is_pruning_step(step: int, *, start_step: int, end_step: int, frequency: int) -> bool:
    """Whether the mask is recomputed after optimizer step ``step``: every ``frequency`` steps from
    ``start_step``, and at ``end_step`` itself (so the run always reaches the final sparsity)."""
    if step < start_step or step > end_step:
        return False
    return (step - start_step) % frequency == 0 or step == end_step


def last_pruning_step(step: int, *, start_step: int, end_step: int, frequency: int) -> int | None:
    """The latest pruning step ≤ ``step`` (None before ``start_step``): the sparsity the model holds after
    optimizer step ``step`` is the schedule's value there."""
    if step < start_step:
        return None
    if step >= end_step:
        return end_step
    return start_step + (step - start_step) // frequency * frequency


def cosine_fraction(step: int, total_steps: int, *, initial: float, final: float) -> float:
    """GraNet's regrowth fraction r_t: cosine decay from ``initial`` at step 0 to ``final`` at
    ``total_steps`` (torch's ``CosineAnnealingLR`` with ``eta_min=final``, stepped every iteration)."""
    if total_steps <= 0 or step >= total_steps:
        return final
    return final + 0.5 * (initial - final) * (1.0 + math.cos(math.pi * step / total_steps))


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Per-layer densities with the Erdős–Rényi-Kernel rule, averaging ``density`` over all weights.

    A layer of shape (n_out, n_in, k…) gets a density proportional to (n_out + n_in + Σk) / (n_out·n_in·Πk):
    small layers stay denser. Layers whose density would exceed 1 are made dense and the rest rescaled, until
    none does (RigL's procedure)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    sizes = [math.prod(shape) for shape in shapes]
    raw = [sum(shape) / size for shape, size in zip(shapes, sizes, strict=True)]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        weighted = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        scale = budget / weighted if weighted > 0 else 0.0
        too_dense = {i for i in range(len(sizes)) if i not in dense and scale * raw[i] > 1.0}
        if not too_dense:
            return [1.0 if i in dense else scale * raw[i] for i in range(len(sizes))]
        dense |= too_dense
