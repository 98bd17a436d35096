"""Multiple-choice accuracy of a causal LM by log-likelihood scoring, the way lm-eval-harness does it.

Each row ``{"question": str, "choices": [str, ...], "answer": int}`` is turned into one request per
choice: context = the question, continuation = the choice with a separating space. The model scores
a continuation by the sum of the log-probabilities of its tokens given everything before them; the
prediction is the choice with the highest sum (``accuracy``) or the highest sum per UTF-8 byte of
the continuation (``accuracy_norm``, lm-eval's byte-length ``acc_norm``). Both figures come from the
shipped ``accuracy`` metric.

The separator rule: the continuation is ``" " + choice`` unless the choice already starts with
whitespace or the question already ends with whitespace (then no space is added). As in lm-eval,
whitespace at the end of the question is moved to the front of the continuation before tokenising,
because tokenizers fold a space into the word that follows it. The context and context+continuation
are tokenised separately and the continuation's tokens are the tail of the latter beyond the
former's length; the special tokens the tokenizer puts in front of a text (a BOS) are kept in front
of the context, those it appends (an EOS) are left out.

A prompt-pruned causal LM (``model_patches/prompt_token_pruning.py``) cannot score a whole sequence in
one forward: each choice is scored as ``generate`` would run it, the context (the same tokens as
above: prefix + question, cut from the left to ``max_length`` with the choice) pruned at prefill and
the choice's tokens teacher-forced through the KV cache (``pruned_prompt_scoring.continuation_logprobs``,
one prefill per distinct context). Every other model keeps the batched single forward.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import max_positions, model_device
from ..data import read_records
from ..errors import DataError
from .metrics import load_metric
from .pruned_prompt_scoring import continuation_logprobs, prunes_prompts

#: Fields every row must have.
REQUIRED_FIELDS = ("question", "choices", "answer")

# Longest input when the config does not say how many positions the model supports (lm-eval's default).
_FALLBACK_MAX_LENGTH = 2048


def evaluate_multiple_choice(
    model,
    tokenizer,
    data: str | os.PathLike | Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    max_length: int | None = None,
    return_details: bool = False,
) -> dict[str, Any]:
    """Log-likelihood multiple-choice accuracy of ``model`` on the rows of ``data``.

    Args:
        model: a causal LM returning ``.logits`` (any device; inputs are moved to it).
        tokenizer: the model's tokenizer (see the module docstring for how text is tokenised).
        data: a JSONL file whose rows hold ``question`` (str), ``choices`` (a list of >= 2 strings)
            and ``answer`` (the index of the correct choice, or the correct choice's text); or the
            same rows as a list of dicts (errors then name ``data[i]``).
        batch_size: (question, choice) requests per forward pass; requests are right-padded with an
            attention mask, so the batch size does not change the scores.
        limit: score only the first ``limit`` rows.
        progress: show a tqdm bar over batches.
        max_length: longest input in tokens; defaults to the model config's maximum positions (2048
            when it does not say). Longer context+continuation inputs lose tokens from the left.
        return_details: also return ``per_example``.

    Returns:
        ``{"accuracy", "accuracy_norm", "num_examples", "data", "seconds"}``, plus with
        ``return_details`` a ``"per_example"`` list of ``{"loglik": [sum per choice], "pred",
        "pred_norm", "answer"}`` in row order. Ties go to the first choice.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all rows), got {limit}")
    if max_length is None:
        max_length = default_max_length(model)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")

    data_name, examples = load_examples(data)
    if limit is not None:
        examples = examples[:limit]

    prefix = _prefix_token_ids(tokenizer)
    requests = []  # (example index, choice index, input ids, continuation ids)
    for example_index, example in enumerate(examples):
        for choice_index, choice in enumerate(example["choices"]):
            context, continuation = split_context_continuation(example["question"], choice)
            tokens, num_continuation = _encode_pair(
                tokenizer, prefix, context, continuation, where=f"{example['where']}: choice {choice_index}"
            )
            if num_continuation > max_length:
                raise DataError(
                    f"{example['where']}: choice {choice_index} is {num_continuation} tokens long, more "
                    f"than the {max_length} positions the model can attend to"
                )
            # Input = every token but the last (it predicts nothing), at most max_length of them,
            # cut from the left; the last num_continuation positions predict the continuation.
            requests.append(
                (example_index, choice_index, tokens[:-1][-max_length:], tokens[-num_continuation:])
            )

    if prunes_prompts(model):
        scores = _score_pruned_requests(model, requests, progress=progress)
    else:
        scores = _score_requests(model, tokenizer, requests, batch_size=batch_size, progress=progress)

    details = []
    for example_index, example in enumerate(examples):
        loglik = [scores[(example_index, choice_index)] for choice_index in range(len(example["choices"]))]
        lengths = [
            len(split_context_continuation(example["question"], choice)[1].encode("utf-8"))
            for choice in example["choices"]
        ]
        details.append(
            {
                "loglik": loglik,
                "pred": _argmax(loglik),
                "pred_norm": _argmax([value / length for value, length in zip(loglik, lengths, strict=True)]),
                "answer": example["answer"],
            }
        )

    references = [detail["answer"] for detail in details]
    plain = load_metric("accuracy").compute(predictions=[d["pred"] for d in details], references=references)
    norm = load_metric("accuracy").compute(
        predictions=[d["pred_norm"] for d in details], references=references
    )
    result = {
        "accuracy": float(plain["accuracy"]),
        "accuracy_norm": float(norm["accuracy"]),
        "num_examples": len(examples),
        "data": data_name,
        "seconds": time.perf_counter() - started,
    }
    if return_details:
        result["per_example"] = details
    return result


def split_context_continuation(question: str, choice: str) -> tuple[str, str]:
    """Context and continuation strings for one choice (see the module docstring's separator rule)."""
    if not choice[:1].isspace() and not question[-1:].isspace():
        choice = " " + choice
    stripped = question.rstrip()
    # Trailing whitespace of the question belongs to the continuation (lm-eval does the same).
    return stripped, question[len(stripped) :] + choice


def load_examples(data: str | os.PathLike | Sequence[Mapping[str, Any]]) -> tuple[str, list[dict]]:
    """``(name, rows)``: validated rows with ``answer`` as an index and ``where`` naming their origin."""
    if isinstance(data, (str, os.PathLike)):
        name = os.fspath(data)
        wheres, rows = map(list, zip(*read_records(name, required=REQUIRED_FIELDS), strict=True))
    else:
        name = "<in-memory rows>"
        rows = list(data)
        if not rows:
            raise DataError("no multiple-choice rows to evaluate: the list is empty")
        wheres = [f"data[{index}]" for index in range(len(rows))]
        for row, where in zip(rows, wheres, strict=True):
            if not isinstance(row, Mapping):
                raise DataError(f"{where}: expected a mapping, got {type(row).__name__}")
            missing = [field for field in REQUIRED_FIELDS if field not in row]
            if missing:
                raise DataError(
                    f"{where}: missing field {', '.join(repr(m) for m in missing)} "
                    f"(each row needs {', '.join(REQUIRED_FIELDS)})"
                )
    return name, [_validate_row(row, where) for row, where in zip(rows, wheres, strict=True)]


def default_max_length(model) -> int:
    """The model config's maximum positions (the text config's, for multimodal models); 2048 when unknown."""
    return max_positions(model) or _FALLBACK_MAX_LENGTH


def _validate_row(row: Mapping[str, Any], where: str) -> dict:
    question, choices, answer = row["question"], row["choices"], row["answer"]
    if not isinstance(question, str):
        raise DataError(f"{where}: 'question' must be a string, got {type(question).__name__}")
    if not isinstance(choices, list) or not all(isinstance(choice, str) for choice in choices):
        raise DataError(f"{where}: 'choices' must be a list of strings, got {choices!r}")
    if len(choices) < 2:
        raise DataError(f"{where}: 'choices' needs at least 2 entries, got {len(choices)}")
    if not all(choice.strip() for choice in choices):
        raise DataError(f"{where}: 'choices' holds an empty or whitespace-only choice: {choices!r}")
    if isinstance(answer, str):
        if answer not in choices:
            raise DataError(f"{where}: 'answer' {answer!r} is not one of the choices {choices!r}")
        answer = choices.index(answer)
    elif isinstance(answer, bool) or not isinstance(answer, int):
        raise DataError(f"{where}: 'answer' must be a choice index (int) or a choice's text, got {answer!r}")
    elif not 0 <= answer < len(choices):
        raise DataError(
            f"{where}: 'answer' index {answer} is out of range for {len(choices)} choices "
            f"(0 to {len(choices) - 1})"
        )
    return {"question": question, "choices": list(choices), "answer": answer, "where": where}


def _prefix_token_ids(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts in front of any text (e.g. ``[bos_token_id]``), or ``[]``."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _encode_pair(
    tokenizer, prefix: list[int], context: str, continuation: str, *, where: str
) -> tuple[list[int], int]:
    """``(prefix + context + continuation tokens, number of continuation tokens)``."""
    # verbose=False: an over-long input is cut to max_length later, the "too long" warning is noise.
    whole = tokenizer(context + continuation, add_special_tokens=False, verbose=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False, verbose=False)["input_ids"] if context else []
    num_continuation = len(whole) - len(context_ids)
    if num_continuation < 1:
        raise DataError(f"{where}: {continuation!r} after the question encodes to no tokens of its own")
    tokens = prefix + whole
    if len(tokens) == num_continuation:
        # Nothing in front of the first continuation token (an empty question and a tokenizer
        # that adds no BOS): score it after the BOS/EOS token, as lm-eval does.
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise DataError(
                f"{where}: an empty question needs a tokenizer with a BOS or EOS token to start from"
            )
        tokens = [start, *tokens]
    return tokens, num_continuation


def _score_requests(
    model, tokenizer, requests, *, batch_size: int, progress: bool
) -> dict[tuple[int, int], float]:
    """Summed continuation log-probability of each request, keyed by (example, choice)."""
    # Longest first (ties in input order): batches hold similar lengths, so little padding, and the
    # largest batch runs first. The order is fixed, so results are deterministic.
    order = sorted(range(len(requests)), key=lambda index: (-len(requests[index][2]), index))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    device = model_device(model)
    scores: dict[tuple[int, int], float] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="multiple choice", unit="batch", disable=not progress):
                width = max(len(requests[index][2]) for index in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, index in enumerate(batch):
                    inputs = requests[index][2]
                    input_ids[row, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
                    attention_mask[row, : len(inputs)] = 1
                logits = model(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
                ).logits
                for row, index in enumerate(batch):
                    example_index, choice_index, inputs, targets = requests[index]
                    # Positions len(inputs) - len(targets) .. len(inputs) - 1 predict the targets.
                    end = len(inputs)
                    rows = logits[row, end - len(targets) : end].float()
                    log_probs = torch.log_softmax(rows, dim=-1)
                    target = torch.tensor(targets, dtype=torch.long, device=log_probs.device)
                    picked = log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                    scores[(example_index, choice_index)] = float(picked.double().sum().item())
    finally:
        model.train(was_training)
    return scores


def _score_pruned_requests(model, requests, *, progress: bool) -> dict[tuple[int, int], float]:
    """``_score_requests`` for a prompt-pruned model: the context prefilled (pruned) once per distinct
    context, each continuation teacher-forced through a copy of its cache."""
    groups: dict[tuple[int, ...], list] = {}
    for request in requests:
        _, _, inputs, targets = request
        # The input's last len(targets) positions predict the continuation; the context ends at the first.
        context = tuple(inputs[: len(inputs) - len(targets) + 1])
        groups.setdefault(context, []).append(request)
    scores: dict[tuple[int, int], float] = {}
    was_training = model.training
    model.eval()
    try:
        for context, group in tqdm(
            groups.items(), desc="multiple choice", unit="context", disable=not progress
        ):
            results = continuation_logprobs(model, context, [targets for *_, targets in group])
            for (example_index, choice_index, _, _), (logprobs, _) in zip(group, results, strict=True):
                scores[(example_index, choice_index)] = float(logprobs.sum())
    finally:
        model.train(was_training)
    return scores


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties."""
    return max(range(len(values)), key=lambda index: (values[index], -index))


__all__ = [
    "REQUIRED_FIELDS",
    "default_max_length",
    "evaluate_multiple_choice",
    "load_examples",
    "split_context_continuation",
]
