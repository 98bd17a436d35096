"""Perplexity of a causal LM on a local text corpus (or, with network access, a Hub dataset).

The corpus is tokenised once and cut into non-overlapping windows; the model's own loss (HF shifts
the labels internally) gives each batch's negative log-likelihood, and the shipped ``perplexity``
metric aggregates those into a token-weighted figure.

``context_len`` splits each window: its first ``context_len`` tokens are context, only the tokens after
them are scored. An ordinary model runs one forward over the window with the context's labels ignored
(the same numbers as scoring the rest through a KV cache after a prefill of the context, which the tests
check). A prompt-pruned causal LM (``model_patches/prompt_token_pruning.py``) is scored as ``generate``
runs it: the context is pruned at prefill and the scored tokens are teacher-forced through the cache
(``pruned_prompt_scoring.window_logprobs``); without a ``context_len`` such a model gets
``seq_len // 2``, and the result says so. Without ``context_len`` an ordinary model is scored as
before: every token of a window but its first.
"""

from __future__ import annotations

import os
import time
import warnings
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import max_positions, model_device
from ..data import load_text_records
from ..errors import DataError
from .metrics import load_metric
from .pruned_prompt_scoring import prunes_prompts, window_logprobs

# Literal marker that raw corpus dumps (TinyStories, GPT-2-style text files) put between documents.
DEFAULT_DOCUMENT_SEPARATOR = "<|endoftext|>"

# Fallback window when the config does not say how many positions the model supports.
_MAX_DEFAULT_SEQ_LEN = 1024


def evaluate_perplexity(
    model,
    tokenizer,
    data: str | os.PathLike,
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    text_field: str = "text",
    progress: bool = True,
    document_separator: str | None = None,
    context_len: int | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` over the text in ``data``.

    Args:
        model: a causal LM that returns ``.loss`` when called with ``labels``.
        tokenizer: the model's tokenizer; the whole text is encoded once, as the tokenizer does
            by default (so with its BOS token if it adds one).
        data: a ``.txt`` file (read as one document), a ``.jsonl``/``.json``/``.parquet`` file
            whose ``text_field`` values are joined with blank lines, or a Hub dataset id (its
            ``test`` split; needs network access).
        seq_len: window length in tokens; defaults to the model's maximum positions, capped at
            1024. Windows do not overlap; a final shorter window is kept if it has >= 2 tokens. A
            length beyond the model's positions is clamped to them, with a warning, and the result
            says so (``seq_len_clamped_from``).
        batch_size: windows per forward pass (only windows of equal length share a batch).
        limit: evaluate at most this many windows (from the start of the text).
        text_field: column holding the text for structured files and Hub datasets.
        progress: show a tqdm bar over batches.
        document_separator: literal marker between documents in the raw text; its occurrences
            are removed before tokenising (the blank lines around it stay), because a tokenizer
            that does not treat it as a special token spells it out character by character and
            the model would be scored on predicting markup it never saw. ``None`` keeps the text
            exactly as read.
        context_len: each window's first ``context_len`` tokens are context and only the tokens after
            them are scored (below ``seq_len``; a final window no longer than it is left out). A
            prompt-pruned model prunes that context at prefill (see the module docstring); it gets
            ``seq_len // 2`` when none is given. None on an ordinary model: every token of a window
            but its first is scored.

    Returns:
        ``{"perplexity", "mean_nll", "num_tokens", "num_windows", "seq_len", "context_len",
        "scored_tokens", "protocol", "data", "seconds"}`` (plus ``seq_len_clamped_from`` when ``seq_len``
        was clamped, and ``context_len_source`` when a context_len was used) where ``num_tokens`` and
        ``scored_tokens`` count the scored tokens (each window: its length minus one, or minus
        ``context_len``) and ``protocol`` says in a sentence how they were scored.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all windows), got {limit}")
    seq_len_clamped_from = None
    positions = max_positions(model)
    if seq_len is None:
        seq_len = default_seq_len(model)
    elif positions is not None and seq_len > positions:
        # Past its positions a model reads untrained (or wrapped-around) position encodings: the figure
        # would mean nothing, so evaluate at the longest window it supports and say so.
        warnings.warn(
            f"seq_len {seq_len} is longer than the model's {positions} positions "
            f"(max_position_embeddings); evaluating with seq_len {positions}",
            UserWarning,
            stacklevel=2,
        )
        seq_len_clamped_from, seq_len = seq_len, positions
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a window predicts seq_len - 1 tokens), got {seq_len}")
    context_len_source = "given" if context_len is not None else None
    if context_len is None and prunes_prompts(model):
        context_len = default_context_len(seq_len)
        context_len_source = (
            f"default: seq_len // 2 = {context_len}, since the model prunes its prompt (a context to prune "
            "is needed); set context_len to choose"
        )
    check_context_len(context_len, seq_len)

    data_name = os.fspath(data)
    text = load_text(data_name, text_field=text_field)
    if document_separator:
        text = text.replace(document_separator, "")
    if not text.strip():
        raise DataError(f"no text to evaluate in {data_name!r}: it is empty or whitespace only")

    # verbose=False: a corpus is expected to be longer than the model's maximum length, so the
    # tokenizer's "sequence too long" warning would only be noise; windows keep us within bounds.
    token_ids = tokenizer(text, verbose=False)["input_ids"]
    if len(token_ids) < 2:
        raise DataError(
            f"no tokens to evaluate in {data_name!r}: the text encodes to {len(token_ids)} token(s), "
            "at least 2 are needed"
        )
    tokens = torch.tensor(token_ids, dtype=torch.long)
    result = perplexity_of_tokens(
        model,
        tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        limit=limit,
        progress=progress,
        context_len=context_len,
    )
    if seq_len_clamped_from is not None:
        result["seq_len_clamped_from"] = seq_len_clamped_from
    if context_len_source is not None:
        result["context_len_source"] = context_len_source
    return {**result, "data": data_name, "seconds": time.perf_counter() - started}


def perplexity_of_tokens(
    model,
    tokens: torch.Tensor,
    *,
    seq_len: int,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = False,
    context_len: int | None = None,
) -> dict[str, Any]:
    """Perplexity over non-overlapping ``seq_len`` windows of a 1-D token tensor (see evaluate_perplexity).

    A prompt-pruned model needs a ``context_len`` here (``evaluate_perplexity`` gives it a default)."""
    check_context_len(context_len, seq_len)
    pruned = prunes_prompts(model)
    if pruned and context_len is None:
        raise ValueError(
            f"{type(model).__name__} prunes its prompt: give a context_len (the context pruned at prefill; "
            "the tokens after it are scored through the cache)"
        )
    # A window scores its tokens after the first (after the first context_len with a context).
    min_length = 2 if context_len is None else context_len + 1
    batches = _window_batches(
        len(tokens), seq_len=seq_len, batch_size=batch_size, limit=limit, min_length=min_length
    )
    num_windows = sum(len(batch) for batch in batches)
    if num_windows == 0:
        raise DataError(
            f"no window to score: the text has {len(tokens)} tokens"
            + (f", none after a context of {context_len}" if context_len is not None else "")
        )

    metric = load_metric("perplexity")
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
                input_ids = torch.stack([tokens[start:end] for start, end in batch]).to(device)
                if pruned:
                    # Context pruned at prefill, the rest teacher-forced through the cache.
                    logprobs = window_logprobs(model, input_ids[:, :context_len], input_ids[:, context_len:])
                    metric.add_batch(nll_sum=[-float(logprobs.sum())], num_tokens=[logprobs.numel()])
                    continue
                labels = input_ids
                if context_len is not None:
                    labels = input_ids.masked_fill(
                        torch.arange(input_ids.shape[1], device=device) < context_len, -100
                    )
                outputs = model(input_ids=input_ids, labels=labels, use_cache=False)
                if getattr(outputs, "loss", None) is None:
                    raise TypeError(
                        f"{type(model).__name__} returned no loss when given labels; "
                        "perplexity needs a causal LM head"
                    )
                # The loss is the mean over the batch's predicted tokens: labels are shifted by
                # one inside the model, so each window of length L predicts L - 1 tokens (L - context_len
                # with a context, whose labels are ignored).
                predicted = input_ids.shape[0] * (input_ids.shape[1] - (context_len or 1))
                metric.add_batch(
                    nll_sum=[outputs.loss.double().item() * predicted],
                    num_tokens=[predicted],
                )
    finally:
        model.train(was_training)

    result = metric.compute()
    return {
        "perplexity": float(result["perplexity"]),
        "mean_nll": float(result["mean_nll"]),
        "num_tokens": int(result["num_tokens"]),
        "num_windows": num_windows,
        "seq_len": seq_len,
        "context_len": context_len,
        "scored_tokens": int(result["num_tokens"]),
        "protocol": scoring_protocol(seq_len, context_len, pruned),
    }


def scoring_protocol(seq_len: int, context_len: int | None, pruned: bool) -> str:
    """One sentence: how the windows were scored."""
    if context_len is None:
        return f"windows of {seq_len} tokens, one forward each; every token after a window's first is scored"
    if pruned:
        return (
            f"windows of {seq_len} tokens; the first {context_len} are context, pruned at prefill by the model, "
            "and the tokens after them are teacher-forced through the KV cache and scored (as generate runs it)"
        )
    return (
        f"windows of {seq_len} tokens; the first {context_len} are context and only the tokens after them are "
        "scored (one forward, the context's labels ignored: the same as a prefill and the rest through the cache)"
    )


def check_context_len(context_len: int | None, seq_len: int) -> None:
    """ValueError unless ``context_len`` is None or leaves tokens to score in a ``seq_len`` window."""
    if context_len is None:
        return
    if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < 1:
        raise ValueError(f"context_len must be a positive integer, got {context_len!r}")
    if context_len >= seq_len:
        raise ValueError(
            f"context_len {context_len} leaves nothing to score in windows of seq_len {seq_len}: "
            "it must be below seq_len"
        )


def default_context_len(seq_len: int) -> int:
    """The context of a prompt-pruned model when none is given: half the window."""
    return seq_len // 2


def window_length(config: Any, seq_len: int | None) -> int:
    """The window ``evaluate_perplexity`` uses on a model with this config for a requested ``seq_len``
    (None: the default), after clamping to the model's positions."""
    positions = max_positions(SimpleNamespace(config=config))
    if seq_len is None:
        return min(positions or _MAX_DEFAULT_SEQ_LEN, _MAX_DEFAULT_SEQ_LEN)
    return min(seq_len, positions) if positions is not None else seq_len


def default_seq_len(model) -> int:
    """The model's maximum positions capped at 1024 (1024 when the config does not say)."""
    return min(max_positions(model) or _MAX_DEFAULT_SEQ_LEN, _MAX_DEFAULT_SEQ_LEN)


def load_text(data: str, *, text_field: str = "text") -> str:
    """The evaluation text in ``data``: a .txt file whole, or the ``text_field`` records joined by blank lines."""
    return "\n\n".join(load_text_records(data, text_field=text_field, split="test", sample_by="document"))


def _window_batches(
    num_tokens: int, *, seq_len: int, batch_size: int, limit: int | None, min_length: int = 2
) -> list[list[tuple[int, int]]]:
    """Group non-overlapping ``(start, end)`` windows into batches of equal-length windows."""
    windows = [(start, min(start + seq_len, num_tokens)) for start in range(0, num_tokens, seq_len)]
    # A tail shorter than min_length scores nothing (1 token: nothing after the label shift; with a
    # context, nothing after it).
    if windows and windows[-1][1] - windows[-1][0] < min_length:
        windows.pop()
    if limit is not None:
        windows = windows[:limit]
    full = [window for window in windows if window[1] - window[0] == seq_len]
    partial = [window for window in windows if window[1] - window[0] != seq_len]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    # Only the last window can be shorter; it gets a batch of its own.
    batches.extend([window] for window in partial)
    return batches


__all__ = [
    "DEFAULT_DOCUMENT_SEPARATOR",
    "default_context_len",
    "default_seq_len",
    "evaluate_perplexity",
    "load_text",
    "window_length",
]
