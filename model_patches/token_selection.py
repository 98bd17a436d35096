"""Choosing which visual tokens to keep: the settings and the selection algorithms, as pure tensor functions.

Shared by the visual token-pruning files (``visual_pruning_mixin.py`` and ``visual_token_scoring.py``, the
model side of ``visual_token_pruning.py`` for LLaVA / LLaVA-NeXT and ``qwen2_vl_token_pruning.py`` for
Qwen2-VL) and copied next to their checkpoints with them; imports only torch (and ``patch_classes.py``).

- ``check_settings`` (``DEFAULTS``, ``ALGORITHMS``): the ``token_pruning`` dict; ``kept_count``: the kept
  tokens of one group;
- ``cosine_similarity_matrix`` + ``instruction_relevance`` + ``dpp_greedy_map``: CDPruner's kernel
  L = diag(r)·S·diag(r) and the fast greedy MAP inference of Chen, Zhang & Zhou (2018);
- ``pool_grid`` / ``square_grid``: spatial average pooling of a token grid down to a budget;
- ``image_runs``: where each image's placeholder tokens sit in a batch.
"""

import math

import torch
import torch.nn.functional as F

from .patch_classes import settings_with_defaults

ALGORITHMS = ("cdpruner", "diversity", "random", "pooling", "fastv")
RELEVANCE_SIGNS = ("positive", "negative")
DEFAULTS = {
    "algorithm": "cdpruner",
    "budget": None,
    "keep_ratio": None,
    "relevance_sign": "positive",
    "seed": 0,
    "fastv_layer": 2,
}


def check_settings(settings) -> dict:
    """The ``token_pruning`` dict with defaults filled in; ValueError naming the bad key otherwise."""
    merged = settings_with_defaults(settings, DEFAULTS)
    if merged["algorithm"] not in ALGORITHMS:
        raise ValueError(
            f"token_pruning.algorithm: {merged['algorithm']!r} is not one of {', '.join(ALGORITHMS)}"
        )
    budget, ratio = merged["budget"], merged["keep_ratio"]
    if (budget is None) == (ratio is None):
        raise ValueError("token_pruning: give exactly one of budget or keep_ratio")
    if budget is not None and (type(budget) is not int or budget < 1):
        raise ValueError(
            f"token_pruning.budget: must be a positive integer (tokens kept per image or crop), got {budget!r}"
        )
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"token_pruning.keep_ratio: must be in (0, 1], got {ratio!r}")
    if merged["relevance_sign"] not in RELEVANCE_SIGNS:
        raise ValueError(
            f"token_pruning.relevance_sign: {merged['relevance_sign']!r} is not one of "
            f"{', '.join(RELEVANCE_SIGNS)}"
        )
    for key in ("seed", "fastv_layer"):
        if type(merged[key]) is not int or merged[key] < 0:
            raise ValueError(f"token_pruning.{key}: must be a non-negative integer, got {merged[key]!r}")
    return merged


def kept_count(settings: dict, num_tokens: int, crops: float = 1.0) -> int:
    """Tokens kept out of ``num_tokens`` that stand for ``crops`` crops' worth of tokens (a budget at or
    above the count keeps them all)."""
    if settings["budget"] is not None:
        return min(math.ceil(settings["budget"] * crops - 1e-9), num_tokens)
    return min(num_tokens, max(1, math.ceil(settings["keep_ratio"] * num_tokens)))


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """[..., N, D] -> [..., N, N] cosine similarities in float32."""
    unit = F.normalize(features.float(), dim=-1)
    return unit @ unit.transpose(-1, -2)


def instruction_relevance(
    features: torch.Tensor, instruction: torch.Tensor | None, sign: str = "positive"
) -> torch.Tensor:
    """[N] relevance in [0, 1]: mean cosine of each token [N, D] with the instruction embeddings [M, D],
    optionally negated, min-max normalised; all ones without an instruction or when every token ties."""
    if instruction is None or instruction.shape[0] == 0:
        return torch.ones(features.shape[0], device=features.device)
    cosine = F.normalize(features.float(), dim=-1) @ F.normalize(instruction.float(), dim=-1).T
    relevance = cosine.mean(dim=-1) * (-1.0 if sign == "negative" else 1.0)
    spread = relevance.max() - relevance.min()
    if spread <= 1e-6:
        return torch.ones_like(relevance)
    return (relevance - relevance.min()) / spread


#: A candidate's remaining gain d²_i at or below this fraction of its own L_ii is float32 round-off: it lies
#: in the span of the picks so far (measured round-off is about 1e-6 of L_ii).
RESIDUAL_RTOL = 1e-5


def dpp_greedy_map(kernel: torch.Tensor, count: int, eps: float = 1e-10) -> torch.Tensor:
    """Fast greedy MAP inference for a DPP (Chen, Zhang & Zhou 2018), batched: kernel [B, N, N] -> [B, count]
    indices in ascending order. Once the kernel's rank is exhausted (every remaining gain is round-off, see
    ``RESIDUAL_RTOL``), the remaining picks go by index."""
    batch, n, _ = kernel.shape
    kernel = kernel.float()
    rows = torch.arange(batch, device=kernel.device)
    diagonal = torch.diagonal(kernel, dim1=-2, dim2=-1)
    floor = RESIDUAL_RTOL * diagonal + eps
    taken = torch.zeros(batch, n, dtype=torch.bool, device=kernel.device)
    gains = diagonal.clone()  # d²_i
    vectors = kernel.new_zeros(batch, count, n)  # c_k, one row per pick so far
    chosen = torch.empty(batch, count, dtype=torch.long, device=kernel.device)
    for t in range(count):
        j = gains.argmax(dim=-1)
        chosen[:, t] = j
        gain = gains[rows, j]
        projection = torch.einsum("bk,bkn->bn", vectors[rows, :t, j], vectors[:, :t]) if t else 0
        e = (kernel[rows, j] - projection) / gain.clamp_min(eps).sqrt()[:, None]
        e = torch.where((gain > eps)[:, None], e, torch.zeros_like(e))
        vectors[:, t] = e
        taken[rows, j] = True
        gains = gains - e.square()
        # round-off counts as no gain, so that argmax (the first of equal values) then goes by index
        gains = torch.where(taken, float("-inf"), torch.where(gains > floor, gains, 0.0))
    return chosen.sort(dim=-1).values


def pool_grid(features: torch.Tensor, grid: tuple[int, int], count: int) -> torch.Tensor:
    """Average-pool [h0*w0, D] features laid out on ``grid`` (h0, w0) to ``count`` tokens [count, D], on the
    h × w grid with h·w = count whose aspect ratio is closest to the input's."""
    h0, w0 = grid
    shapes = [(h, count // h) for h in range(1, count + 1) if count % h == 0]
    h, w = min(shapes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - math.log(h0 / w0)), 9), s[0]))
    image = features.T.reshape(1, features.shape[1], h0, w0).float()
    pooled = F.adaptive_avg_pool2d(image, (h, w))
    return pooled.reshape(features.shape[1], h * w).T.to(features.dtype)


def square_grid(num_tokens: int) -> tuple[int, int]:
    side = math.isqrt(num_tokens)
    return (side, side) if side * side == num_tokens else (1, num_tokens)


def image_runs(image_mask: torch.Tensor, counts: list[int]) -> list[tuple[int, torch.Tensor]]:
    """(row, positions) of each image's placeholder block, images in row-major order."""
    flat = torch.nonzero(image_mask.reshape(-1)).squeeze(1)
    if flat.numel() != sum(counts):
        raise ValueError(
            f"the input has {flat.numel()} image tokens but the images give {sum(counts)} features "
            f"({len(counts)} images): each image needs exactly one image placeholder in the text, "
            "expanded by the processor"
        )
    width = image_mask.shape[1]
    runs, start = [], 0
    for count in counts:
        positions = flat[start : start + count]
        start += count
        row = int(positions[0]) // width
        if int(positions[-1]) // width != row:
            raise ValueError("an image's placeholder tokens span two rows of the batch")
        runs.append((row, positions - row * width))
    return runs
