"""Scoring a prompt-pruned causal LM (``model_patches/prompt_token_pruning.py``) the way it runs.

Such a model drops prompt tokens inside its prefill, so "the log-likelihood of a continuation" has one
meaning that matches ``generate``: the *context* is pruned at prefill, and the *continuation* is
teacher-forced through the KV cache, unpruned (``evals/benchmarks/bench_prompt_tokens.py`` measures the
same). The first continuation token is predicted by the prefill's last position (the last real context
token is always kept); the others by a forward of ``continuation[:-1]`` on the cache. A whole-sequence
forward without a cache is refused by the model itself, since pruned positions have no logits.

For a model that prunes nothing this equals the full-sequence log-likelihood, which the tests check.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from ..adapters import get_adapter, model_device
from ..errors import UnsupportedModelError


def prunes_prompts(model) -> bool:
    """Whether ``model`` is a prompt-pruned causal LM (scored through this module)."""
    return config_prunes_prompts(getattr(model, "config", None))


def config_prunes_prompts(config) -> bool:
    """Whether a model with this config is a prompt-pruned causal LM (False for an architecture the
    adapter table does not know: it cannot be one)."""
    if getattr(config, "token_pruning", None) is None:
        return False
    try:
        return get_adapter(config).prunes_prompts(config)
    except UnsupportedModelError:
        return False


@torch.no_grad()
def continuation_logprobs(
    model, context: Sequence[int], continuations: Sequence[Sequence[int]]
) -> list[tuple[torch.Tensor, bool]]:
    """For each continuation after the same ``context`` (token ids; at least one token): (the log-probability
    of each continuation token [n], float64 on the CPU; whether greedy decoding would produce all of them).

    The context is prefilled once (pruned by the model), and each continuation is scored on a copy of
    that cache."""
    if len(context) == 0:
        raise ValueError("a context needs at least one token (a BOS or end-of-text token will do)")
    device = model_device(model)
    prefill = model(
        input_ids=torch.tensor([list(context)], device=device),
        cache=DynamicCache(config=model.config),
        use_cache=True,
        logits_to_keep=1,
    )
    first = prefill.logits[0, -1].float().log_softmax(-1)
    results = []
    for continuation in continuations:
        if len(continuation) == 0:
            raise ValueError("an empty continuation has no log-likelihood")
        rows = [first]
        if len(continuation) > 1:
            cache = copy.deepcopy(prefill.cache)
            out = model(
                input_ids=torch.tensor([list(continuation[:-1])], device=device), cache=cache, use_cache=True
            )
            rows += list(out.logits[0].float().log_softmax(-1))
        logprobs = torch.stack(rows)
        target = torch.tensor(list(continuation), device=logprobs.device)
        picked = logprobs.gather(1, target[:, None])[:, 0]
        greedy = bool((logprobs.argmax(-1) == target).all())
        results.append((picked.double().cpu(), greedy))
    return results


@torch.no_grad()
def window_logprobs(model, context: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Batched :func:`continuation_logprobs` for rows without padding: ``context`` [B, c] (c >= 1) and
    ``continuation`` [B, n] token ids; the log-probability of each continuation token [B, n], float64 on
    the CPU. Each row's context is pruned at prefill by the model (rows may keep different counts: the
    cache remembers each row's kept tokens and positions), then the continuation runs through the cache."""
    if context.dim() != 2 or continuation.dim() != 2 or context.shape[0] != continuation.shape[0]:
        raise ValueError(
            f"context [B, c] and continuation [B, n] must share B, got {tuple(context.shape)} and "
            f"{tuple(continuation.shape)}"
        )
    if context.shape[1] == 0 or continuation.shape[1] == 0:
        raise ValueError("a context and a continuation each need at least one token")
    device = model_device(model)
    context, continuation = context.to(device), continuation.to(device)
    prefill = model(
        input_ids=context, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1
    )
    logits = [prefill.logits[:, -1:].float()]
    if continuation.shape[1] > 1:
        logits.append(
            model(input_ids=continuation[:, :-1], cache=prefill.cache, use_cache=True).logits.float()
        )
    logprobs = torch.cat(logits, dim=1).log_softmax(-1)
    return logprobs.gather(2, continuation[..., None])[..., 0].double().cpu()
