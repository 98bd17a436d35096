"""The ``hf-prune`` model of lm-evaluation-harness: ``lm_eval --model hf-prune --model_args pretrained=OUT``.

A subclass of lm-eval's ``HFLM`` (its ``hf`` model). Importing this module imports ``hf_prune``, which
registers the ``hf_prune_<family>`` classes with the Auto classes, so hf-prune checkpoints load without
remote code; ``trust_remote_code`` in ``--model_args`` works as it does for ``hf``.

For a **prompt-pruned** causal LM (``text_token_pruning``: ``hf_prune_llama`` / ``hf_prune_qwen2`` /
``hf_prune_mistral``, see ``model_patches/prompt_token_pruning.py``) it scores as the model runs under
``generate``: the *context* is pruned at prefill, and the *continuation* is teacher-forced through the KV
cache, unpruned (``hf_prune.evals.pruned_prompt_scoring.continuation_logprobs``). ``hf`` cannot: it scores
context and continuation in one whole-sequence forward, which such a model refuses (its error names this
model). In detail:

- ``loglikelihood`` (multiple-choice and cloze tasks): requests sharing a context share one prefill; each
  continuation is scored on a copy of its cache. A context too long for the model is cut from the left as
  ``hf`` cuts it (context + continuation at most ``max_length + 1`` tokens); requests run one context at a
  time (no padding across requests).
- ``loglikelihood_rolling`` (perplexity-style tasks) is lm-eval's own: it cuts each text into disjoint
  windows scored as loglikelihood requests whose context is a **single token** (the token before the
  window, or the prefix token), so the prefill has nothing to prune (a pruned prompt always keeps its last
  token) and the figure is the model's own full-sequence perplexity, pruning or not. Token pruning shows in
  the tasks that put a long context before a short continuation.
- ``generate_until``: ``HFLM``'s, which calls the model's own ``generate``; that prunes the prompt at
  prefill and decodes from the pruned cache.
- ``batch_size=auto`` probes a whole-sequence forward, which the model refuses: it means 1 here.

For any other checkpoint (stock, ReplaceMe, expert-pruned, sparse, or a token-pruned model with nothing to
prune at prefill) every method is ``HFLM``'s, unchanged: ``hf`` and ``hf-prune`` give the same numbers.
"""

from __future__ import annotations

import logging
from typing import Any

import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

import hf_prune  # noqa: F401  (registers the hf_prune_<family> classes with the Auto classes)

from ..errors import UnsupportedModelError
from ..evals.pruned_prompt_scoring import continuation_logprobs, prunes_prompts
from .lm_eval_hook import MODEL_NAME

logger = logging.getLogger(__name__)

Request = tuple[Any, list[int], list[int]]  # (cache key or None, context ids, continuation ids)


def scores_pruned_prompts(model: Any) -> bool:
    """Whether ``model`` prunes its prompt at prefill (False for a model hf-prune does not know)."""
    try:
        return prunes_prompts(model)
    except UnsupportedModelError:
        return False


def fit_to_length(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """The context ``HFLM`` would condition on: context + continuation hold at most ``max_length + 1``
    tokens (the last one is only predicted), cut from the left of the context."""
    if not context or not continuation:
        raise ValueError("a loglikelihood request needs a context and a continuation of at least one token")
    if len(continuation) > max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length {max_length}")
    room = max_length + 1 - len(continuation)
    if len(context) > room:
        logger.warning(
            "context of %d tokens + continuation of %d exceed max_length %d: keeping the last %d context tokens",
            len(context),
            len(continuation),
            max_length,
            room,
        )
    return context[-room:]


@register_model(MODEL_NAME)
class HFPruneLM(HFLM):
    """lm-eval's ``hf`` model, scoring prompt-pruned checkpoints as ``generate`` runs them (module doc)."""

    def __init__(self, pretrained: Any, **kwargs: Any) -> None:
        super().__init__(pretrained, **kwargs)
        self.prunes_prompts = scores_pruned_prompts(self.model)
        if self.prunes_prompts:
            settings = self.model.config.token_pruning
            logger.info(
                "%s prunes its prompt at prefill (%s): contexts are pruned, continuations scored through the cache",
                type(self.model).__name__,
                settings,
            )

    def _get_backend(
        self, config: Any, backend: str = "default", trust_remote_code: bool | None = False
    ) -> None:
        # hf_prune's own causal LMs are registered with AutoModelForCausalLM at import, but lm-eval looks for
        # the model_type in transformers' built-in table only, and would warn before guessing "causal".
        if backend == "default" and type(config) in transformers.AutoModelForCausalLM._model_mapping:
            backend = "causal"
        super()._get_backend(config, backend=backend, trust_remote_code=trust_remote_code)

    def _detect_batch_size(self, requests: Any = None, pos: int = 0) -> int:
        if getattr(self, "prunes_prompts", False):
            return 1  # the probe is a whole-sequence forward, which a prompt-pruned model refuses
        return super()._detect_batch_size(requests, pos)

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        if not self.prunes_prompts:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        by_context: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            kept = fit_to_length(list(context), list(continuation), self.max_length)
            by_context.setdefault(tuple(kept), []).append(index)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(
            total=len(requests),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests (context pruned at prefill)",
        )
        for context, indices in by_context.items():
            scored = continuation_logprobs(self.model, context, [list(requests[i][2]) for i in indices])
            for index, (logprobs, greedy) in zip(indices, scored, strict=True):
                answer = (float(logprobs.sum()), greedy)
                results[index] = answer
                key = requests[index][0]
                if key is not None:  # loglikelihood_rolling's windows carry none; it caches per text itself
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                progress.update(1)
        progress.close()
        return results  # type: ignore[return-value]
