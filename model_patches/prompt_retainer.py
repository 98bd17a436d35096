"""The learned token retainer of a causal LM's prompt pruning (``adtp`` and ``fixed``), and its soft keep
mask for training.

The retainer reads the hidden states that enter the pruning layer (the token embeddings for layer 0):

- a saliency head scores every prompt token (the kept ones are the highest-scoring);
- a ratio head reads the prompt pooled as [mean of its real tokens, its last real token] (a causal model's
  last token has seen the whole prompt) and gives logits over ``candidate_ratios``: ``adtp`` keeps the
  argmax ratio of each prompt at inference, and the softmax-weighted mean ratio in training.

Imports only torch and transformers: copied next to the checkpoint with ``prompt_token_pruning.py``.
"""

import torch
from torch import nn


class PromptRetainer(nn.Module):
    """Per-token saliency head and per-prompt ratio head (over the candidate ratios)."""

    def __init__(self, hidden_size: int, num_ratios: int, size: int):
        super().__init__()
        self.saliency = nn.Sequential(nn.Linear(hidden_size, size), nn.GELU(), nn.Linear(size, 1))
        self.ratio = nn.Sequential(nn.Linear(2 * hidden_size, size), nn.GELU(), nn.Linear(size, num_ratios))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(saliency [B, L], ratio logits [B, R]) from hidden states [B, L, H] and the real-token mask [B, L]
        (padding on either side)."""
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = positions.masked_fill(~mask, -1).amax(1).clamp_min(0)
        last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.saliency(hidden).squeeze(-1), self.ratio(torch.cat([mean, last_hidden], dim=-1))


def always_kept(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: each row's first and last real token (``mask`` [B, L] bool)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    first = positions.masked_fill(~mask, mask.shape[1]).amin(1, keepdim=True)
    last = positions.masked_fill(~mask, -1).amax(1, keepdim=True)
    return mask & ((positions == first) | (positions == last))


def chosen_ratios(settings: dict, ratio_logits: torch.Tensor) -> torch.Tensor:
    """[B] inference ratios: ``adtp`` the argmax candidate per prompt, otherwise ``keep_ratio``."""
    if settings["algorithm"] == "adtp":
        candidates = torch.tensor(settings["candidate_ratios"], device=ratio_logits.device)
        return candidates[ratio_logits.argmax(-1)]
    return torch.full(ratio_logits.shape[:1], float(settings["keep_ratio"]), device=ratio_logits.device)


def expected_ratios(settings: dict, ratio_logits: torch.Tensor) -> torch.Tensor:
    """[B] training ratios: ``adtp`` the ratio head's softmax-weighted mean candidate, otherwise ``keep_ratio``."""
    if settings["algorithm"] == "adtp":
        candidates = torch.tensor(
            settings["candidate_ratios"], device=ratio_logits.device, dtype=ratio_logits.dtype
        )
        return (ratio_logits.softmax(-1) * candidates).sum(-1)
    return ratio_logits.new_full(ratio_logits.shape[:1], float(settings["keep_ratio"]))


def soft_keep(
    saliency: torch.Tensor, eligible: torch.Tensor, ratios: torch.Tensor, temperature: float
) -> torch.Tensor:
    """[B, L] keep probabilities p_i = σ((s_i − q)/T) of the ``eligible`` tokens (1 elsewhere), q the saliency
    at rank ρ·n of the n eligible ones (interpolated between neighbouring ranks, so the loss reaches the
    ratio ρ through q, and the saliency through s). ρ = 1 keeps everything (p = 1)."""
    ordered = saliency.masked_fill(~eligible, float("-inf")).sort(dim=1, descending=True).values
    count = eligible.sum(1).clamp_min(1)
    rank = (ratios * count - 1).clamp(min=0)
    low = rank.floor().long().clamp(max=ordered.shape[1] - 1)
    high = torch.minimum(low + 1, count - 1)
    fraction = rank - low
    threshold = (1 - fraction) * ordered.gather(1, low[:, None])[:, 0] + fraction * ordered.gather(
        1, high[:, None]
    )[:, 0]
    threshold = torch.where(ratios >= 1, torch.full_like(threshold, float("-inf")), threshold)
    probability = torch.sigmoid((saliency - threshold[:, None]) / temperature)
    return torch.where(eligible, probability, torch.ones_like(probability))


def soft_attention_bias(
    keep_probability: torch.Tensor, mask: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """[B, 1, L, L] float attention mask: causal (and within ``window`` if given), padding keys masked, and
    log p_k added to every query's score of key k (a key kept with probability p weighs p times)."""
    length = mask.shape[1]
    dtype = keep_probability.dtype
    query = torch.arange(length, device=mask.device)[:, None]
    key = torch.arange(length, device=mask.device)[None, :]
    visible = key <= query
    if window is not None:
        visible = visible & (query - key < window)
    visible = visible[None] & mask[:, None, :]
    visible = visible | torch.eye(length, dtype=torch.bool, device=mask.device)[None]  # no fully masked rows
    blocked = torch.zeros(visible.shape, dtype=dtype, device=mask.device).masked_fill(
        ~visible, torch.finfo(dtype).min
    )
    log_keep = torch.log(keep_probability.clamp_min(torch.finfo(dtype).tiny))
    return (blocked + log_keep[:, None, :])[:, None]
