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


def prunes_prompts(model) -> bool:
    """Whether ``model`` is a prompt-pruned causal LM (scored through this module)."""
    return get_adapter(model.config).prunes_prompts(model.config)


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
