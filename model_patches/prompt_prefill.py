"""The pieces of a decoder prefill that drops prompt tokens at a layer: which tokens stay, how a batch is
repacked, the per-layer masks, the cache crop, and what the cache remembers for decoding.

Used by ``prompt_token_pruning.py`` and copied next to its checkpoints with it; imports only torch and
transformers.
"""

from dataclasses import dataclass

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


def kept_tokens(scores: torch.Tensor, mask: torch.Tensor, keep_ratio: float | torch.Tensor) -> torch.Tensor:
    """[B, L] bool: per row, the first and the last real token and the ⌈keep_ratio·n⌉ highest-scoring of the
    other n real tokens (``mask`` [B, L] bool marks the real ones; padding may sit on either side).
    ``keep_ratio``: one ratio for every row, or a [B] tensor of per-row ratios."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    first = positions.masked_fill(~mask, mask.shape[1]).amin(1, keepdim=True)
    last = positions.masked_fill(~mask, -1).amax(1, keepdim=True)
    anchors = mask & ((positions == first) | (positions == last))
    eligible = mask & ~anchors
    ratios = torch.as_tensor(keep_ratio, dtype=torch.float32, device=mask.device).expand(mask.shape[0])
    counts = torch.ceil(ratios * eligible.sum(1) - 1e-6).long()
    order = scores.float().masked_fill(~eligible, float("-inf")).argsort(dim=1, descending=True)
    ranks = torch.empty_like(order).scatter_(1, order, positions.contiguous())
    return anchors | (eligible & (ranks < counts[:, None]))


def seeded_scores(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """[B, L] random scores for the ``random`` algorithm: the i-th real token of every row gets the i-th draw
    of a generator seeded with ``seed``, so a prompt keeps the same tokens alone or padded in a batch."""
    draws = torch.rand(mask.shape[1], generator=torch.Generator().manual_seed(seed)).to(mask.device)
    return draws[(mask.long().cumsum(1) - 1).clamp_min(0)]


def left_packed_order(keep: torch.Tensor) -> torch.Tensor:
    """[B, W] indices that gather each row's kept tokens, in order, to the right end of W = the most kept
    in a row; shorter rows start with dropped tokens, which the caller masks as padding. Left padding puts
    every row's last real token last, where ``generate`` reads the next-token logits."""
    width = int(keep.sum(1).max())
    return keep.to(torch.int8).argsort(dim=1, stable=True)[:, keep.shape[1] - width :]


def gather_tokens(tensor: torch.Tensor, order: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``tensor`` ([B, L, ...] with ``dim`` = 1, or [B, heads, L, d] with ``dim`` = 2) at ``order`` [B, W]."""
    index = order.view(
        *order.shape[:1], *([1] * (dim - 1)), order.shape[1], *([1] * (tensor.dim() - dim - 1))
    )
    return tensor.gather(dim, index.expand(*tensor.shape[:dim], order.shape[1], *tensor.shape[dim + 1 :]))


def layer_kinds(config) -> list[str]:
    """Each decoder layer's mask kind, as the stock models choose it: ``layer_types`` (Qwen2), else a
    sliding window on every layer when one is set (Mistral), else full causal attention (Llama)."""
    if getattr(config, "layer_types", None):
        return list(config.layer_types[: config.num_hidden_layers])
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers


def layer_masks(
    config,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    layers: range,
    eager_layer: int | None = None,
) -> dict[int, object]:
    """{layer: its attention mask} for a cache-less pass of ``hidden`` [B, L, H] with the 2-D ``mask``.

    The 2-D mask is always given, so gapped ``positions`` are never taken for packed sequences. The
    ``eager_layer`` gets a mask built for eager attention (with SDPA the mask may be left to ``is_causal``,
    which eager attention does not read)."""
    kinds, built = layer_kinds(config), {}
    for index in layers:
        key = (kinds[index], index == eager_layer)
        if key not in built:
            build = create_sliding_window_causal_mask if key[0] == "sliding_attention" else create_causal_mask
            previous = config._attn_implementation
            config._attn_implementation = "eager" if key[1] else previous
            try:
                built[key] = build(
                    config=config,
                    inputs_embeds=hidden,
                    attention_mask=mask.long(),
                    cache=None,
                    position_ids=positions,
                )
            finally:
                config._attn_implementation = previous
    return {index: built[(kinds[index], index == eager_layer)] for index in layers}


def attention_received(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L]: the attention each key receives (eager weights [B, heads, query, key]), averaged over heads
    and over the real queries (``mask`` [B, L] bool) that can see it, those at or after it. (Averaged over
    every real query, as in an encoder, a causal model's early tokens would win by the sheer number of
    queries that see them; on stories260K that choice did worse than random.)"""
    queries = mask.float()
    received = (weights.detach().float().mean(1) * queries[:, :, None]).sum(1)
    seeing = queries.flip(1).cumsum(1).flip(1)
    return received / seeing.clamp_min(1)


@dataclass
class PrunedPrompt:
    """What a cache filled by a pruned prefill remembers, so that later steps line up with it.

    ``kept_mask`` [B, W]: which of the W cached prompt entries are real (rows are left-padded);
    ``prompt_length``: L, the caller's prompt length (masks given in its coordinates are cut to W);
    ``next_position`` [B]: the rotary position of the first token after the prompt (last real prompt
    position + 1), so new tokens continue the original numbering.
    """

    kept_mask: torch.Tensor
    prompt_length: int
    next_position: torch.Tensor

    @property
    def width(self) -> int:
        return self.kept_mask.shape[1]

    def decode_inputs(self, cached: int, new: int, attention_mask, position_ids) -> tuple:
        """(attention_mask, position_ids) for ``new`` tokens after ``cached`` cache entries. A 2-D mask may
        cover the caller's whole sequence (prompt + tokens since) or the cache's; none means no padding after
        the prompt. Positions default to the original numbering, per row."""
        since = cached - self.width + new  # tokens after the prompt, the new ones included
        rows = self.kept_mask.shape[0]
        if position_ids is None:
            steps = torch.arange(cached - self.width, since, device=self.next_position.device)
            position_ids = self.next_position[:, None] + steps
        if attention_mask is not None and attention_mask.dim() != 2:
            return attention_mask, position_ids  # a prepared 4-D mask is the caller's own
        if attention_mask is None:
            tail = self.kept_mask.new_ones(rows, since)
        elif attention_mask.shape == (rows, self.prompt_length + since):
            tail = attention_mask[:, self.prompt_length :]
        elif attention_mask.shape == (rows, self.width + since):
            tail = attention_mask[:, self.width :]
        else:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} fits neither the prompt "
                f"({self.prompt_length} tokens) nor the pruned cache ({self.width}) plus {since} "
                f"tokens since, for {rows} rows"
            )
        return torch.cat([self.kept_mask, tail.to(self.kept_mask.dtype)], dim=1), position_ids
