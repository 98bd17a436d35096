"""Empirical graphons of pruning masks ("The Graphon Limit Hypothesis", arXiv 2510.17515).

A layer's 0/1 mask M [n_out, n_in] is a bipartite graph; its step graphon is W_M(u, v) = M[⌈u·n_out⌉,
⌈v·n_in⌉]. Graphons are equal up to measure-preserving relabelling, so the estimate first puts the nodes in
a canonical order: rows by degree (how many inputs each output keeps, the row sum), columns by degree
(how many outputs each input feeds, the column sum), both descending, then averages the density on a K×K
grid of blocks (the paper's "sort and smooth" estimator, K = 64). Row i falls in block ⌊i·K / n_out⌋, so
blocks differ by at most one node when K does not divide the width.

Distances between two K×K estimates: ``l2_distance`` (the L2 norm of the difference as functions on
[0, 1]², i.e. the root mean square over cells) and ``cut_distance``, the cut norm of the difference
sup_{S,T} |∫_{S×T} (W₁ − W₂)| over unions of cells, searched by alternating maximisation from several
starts (a lower bound of the block cut norm; exact for differences of rank one). Both estimates are
already degree-sorted, which stands in for the infimum over relabellings in the true cut distance.
"""

from __future__ import annotations

import torch

from ..errors import HfPruneError


class GraphonError(HfPruneError, ValueError):
    """Bad input to the graphon analysis: the message names it and what is allowed."""


def check_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """``mask`` as a float 0/1 matrix; refuses other shapes, values, and masks that prune nothing."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise GraphonError(f"{name}: must be a 2-D tensor [outputs, inputs], got {shape}")
    if mask.numel() == 0:
        raise GraphonError(f"{name}: is empty")
    values = mask.detach().to(torch.float64)
    if not bool(((values == 0) | (values == 1)).all()):
        raise GraphonError(f"{name}: must hold only 0 and 1 (a pruning mask), got other values")
    if bool((values == 1).all()):
        raise GraphonError(
            f"{name}: has no zeros: nothing was pruned, so there is no graph structure to show"
        )
    return values


def degree_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row order, column order): rows by descending row sum, columns by descending column sum; ties
    broken by index, so the order is deterministic."""
    return _descending(mask.sum(dim=1)), _descending(mask.sum(dim=0))


def _descending(degrees: torch.Tensor) -> torch.Tensor:
    # A stable sort of -degree keeps equal-degree nodes in index order.
    return torch.sort(-degrees, stable=True).indices


def block_average(matrix: torch.Tensor, row_bins: int, col_bins: int) -> torch.Tensor:
    """The mean of ``matrix`` over a ``row_bins`` × ``col_bins`` grid of contiguous blocks (row i in block
    ⌊i·row_bins / n_rows⌋)."""
    rows, cols = matrix.shape
    row_block = torch.arange(rows) * row_bins // rows
    col_block = torch.arange(cols) * col_bins // cols
    sums = torch.zeros(row_bins, cols, dtype=matrix.dtype).index_add_(0, row_block, matrix)
    sums = torch.zeros(row_bins, col_bins, dtype=matrix.dtype).index_add_(1, col_block, sums)
    counts = torch.bincount(row_block, minlength=row_bins)[:, None] * torch.bincount(
        col_block, minlength=col_bins
    )
    return sums / counts.to(matrix.dtype)


def estimate_graphon(mask: torch.Tensor, bins: int = 64, *, smooth: int = 0) -> torch.Tensor:
    """The K×K (K = ``bins``) empirical graphon of a 0/1 mask: degree-sorted, block-averaged densities.

    ``smooth`` > 0 averages each cell with its neighbours within that many cells (a box filter, edges
    clamped). Invariant to any permutation of the mask's rows and columns."""
    values = check_mask(mask)
    if not isinstance(bins, int) or bins < 1:
        raise GraphonError(f"bins: must be a positive integer, got {bins!r}")
    if bins > min(values.shape):
        raise GraphonError(
            f"bins: {bins} is larger than the mask's smaller side ({min(values.shape)} of "
            f"{tuple(values.shape)}): every block needs at least one node; use bins <= {min(values.shape)}"
        )
    if smooth < 0:
        raise GraphonError(f"smooth: must be >= 0, got {smooth}")
    rows, cols = degree_order(values)
    graphon = block_average(values[rows][:, cols], bins, bins)
    return box_smooth(graphon, smooth) if smooth else graphon


def box_smooth(graphon: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2·radius + 1)² neighbourhood of each cell, the neighbourhood clipped at the edges."""
    padded = torch.nn.functional.pad(graphon[None, None], (radius,) * 4)
    ones = torch.nn.functional.pad(torch.ones_like(graphon)[None, None], (radius,) * 4)
    kernel = torch.ones(1, 1, 2 * radius + 1, 2 * radius + 1, dtype=graphon.dtype)
    total = torch.nn.functional.conv2d(padded, kernel)
    count = torch.nn.functional.conv2d(ones, kernel)
    return (total / count)[0, 0]


def _check_pair(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if first.shape != second.shape or first.dim() != 2:
        raise GraphonError(
            f"graphon estimates must be 2-D and of one shape, got {tuple(first.shape)} and {tuple(second.shape)}"
        )
    return first.to(torch.float64), second.to(torch.float64)


def l2_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    """‖W₁ − W₂‖₂ as step functions on [0, 1]²: the root mean square of the cell differences."""
    a, b = _check_pair(first, second)
    return float(((a - b) ** 2).mean().sqrt())


def cut_distance(first: torch.Tensor, second: torch.Tensor, *, starts: int = 16, seed: int = 0) -> float:
    """max over unions of cells S × T of |mean over the grid of (W₁ − W₂) on S × T| (the block cut norm),
    by alternating maximisation: for a fixed row set the best column set keeps the columns whose sum over
    it is positive (or negative, for the other sign), and the other way round."""
    a, b = _check_pair(first, second)
    difference = a - b
    cells = difference.numel()
    generator = torch.Generator().manual_seed(seed)
    best = 0.0
    for sign in (1.0, -1.0):
        signed = sign * difference
        for start in range(starts):
            rows = (
                torch.ones(signed.shape[0], dtype=torch.bool)
                if start == 0
                else torch.rand(signed.shape[0], generator=generator) < 0.5
            )
            value = -1.0
            for _ in range(100):
                cols = signed[rows].sum(dim=0) > 0
                rows = signed[:, cols].sum(dim=1) > 0
                new = float(signed[rows][:, cols].sum()) if rows.any() and cols.any() else 0.0
                if new <= value + 1e-15:
                    break
                value = new
            best = max(best, value)
    return best / cells
