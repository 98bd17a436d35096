"""Accuracy of a sequence-classification model on a local JSONL file of labelled texts.

Each row is ``{"text": ..., "label": ...}`` (optionally with a second text for pair tasks); the
label is a class index or a label name looked up in ``model.config.label2id``. Texts are batched
and padded with the tokenizer, truncated to the model's maximum length, the predicted class is the
argmax of the logits, and the shipped ``accuracy`` metric aggregates.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import max_positions, model_device
from ..data import read_records
from ..errors import DataError
from .metrics import load_metric

_HEAD_SUFFIX = "ForSequenceClassification"


def evaluate_classification(
    model,
    tokenizer,
    data: str | os.PathLike,
    *,
    text_field: str = "text",
    text_pair_field: str | None = None,
    label_field: str = "label",
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy of ``model`` on the labelled texts in the JSONL file ``data``.

    Args:
        model: a ``*ForSequenceClassification`` model (encoder or decoder) whose logits are
            ``[batch, num_labels]``.
        tokenizer: its tokenizer; it must be able to pad (decoder models also need
            ``model.config.pad_token_id`` to find the last real token).
        data: a local ``.jsonl`` file, one object per line.
        text_field / text_pair_field: the row fields holding the text (and the optional second
            text of a pair task).
        label_field: the row field holding the gold label: an int in ``[0, num_labels)`` or a
            string key of ``model.config.label2id``.
        batch_size: rows per forward pass.
        limit: evaluate only the first ``limit`` rows.
        progress: show a tqdm bar over batches.

    Returns:
        ``{"accuracy", "num_examples", "data", "seconds"}``.

    Raises:
        ValueError: the model has no sequence-classification head; a bad ``batch_size``/``limit``.
        FileNotFoundError: ``data`` does not exist.
        DataError (a ValueError): bad JSON, a row without a text or label, a label that is not a
            known class, or an empty file; each message names ``file:line``.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all rows), got {limit}")
    num_labels = _check_classifier(model)

    data_name = os.fspath(data)
    fields = (text_field,) + ((text_pair_field,) if text_pair_field else ()) + (label_field,)
    records = read_records(data_name, required=fields)
    if limit is not None:
        records = records[:limit]
    examples = []
    for where, row in records:
        texts = tuple(_text(row, name, where) for name in fields[:-1])
        examples.append((texts, _label_index(row[label_field], model.config, num_labels, label_field, where)))

    max_length = model_max_length(model, tokenizer)
    metric = load_metric("accuracy")
    device = model_device(model)
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="classification", unit="batch", disable=not progress):
                columns = list(zip(*(texts for texts, _ in batch), strict=True))
                encoded = tokenizer(
                    *[list(column) for column in columns],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                encoded = {name: tensor.to(device) for name, tensor in encoded.items()}
                logits = model(**encoded).logits
                if logits.dim() != 2 or tuple(logits.shape) != (len(batch), num_labels):
                    raise ValueError(
                        f"classification needs a sequence-classification model: {type(model).__name__} "
                        f"returned logits of shape {tuple(logits.shape)}, expected [{len(batch)}, {num_labels}] "
                        "(batch, num_labels)"
                    )
                metric.add_batch(
                    predictions=logits.argmax(dim=-1).tolist(), references=[label for _, label in batch]
                )
    finally:
        model.train(was_training)

    result = metric.compute()
    return {
        "accuracy": float(result["accuracy"]),
        "num_examples": len(examples),
        "data": data_name,
        "seconds": time.perf_counter() - started,
    }


def model_max_length(model, tokenizer) -> int | None:
    """The smaller of the tokenizer's ``model_max_length`` and the config's ``max_position_embeddings``.

    Tokenizers saved without a maximum report a huge sentinel (about 1e30), so the config bounds it.
    RoBERTa-style configs count two reserved positions in ``max_position_embeddings``; their
    tokenizers carry the true limit (e.g. 512 of 514), which the minimum picks.
    """
    limits = []
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < 1_000_000_000:
        limits.append(tokenizer_max)
    config_max = max_positions(model)
    if config_max:
        limits.append(config_max)
    return min(limits) if limits else None


def _check_classifier(model) -> int:
    """``num_labels`` of a ``*ForSequenceClassification`` model; a clear ValueError for anything else."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if not name.endswith(_HEAD_SUFFIX) or config is None:
        model_type = getattr(config, "model_type", None) or "unknown"
        raise ValueError(
            f"classification needs a sequence-classification model (a *{_HEAD_SUFFIX} class with "
            f"logits [batch, num_labels]); got {name} (model_type {model_type!r})"
        )
    return int(config.num_labels)


def _text(row: dict, field: str, where: str) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _label_index(value: Any, config, num_labels: int, field: str, where: str) -> int:
    """The class index of a gold label: an int in range, or a string key of ``config.label2id``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DataError(
            f"{where}: field {field!r} must be a class index (int) or a label name (string), "
            f"got {type(value).__name__} {value!r}"
        )
    if isinstance(value, int):
        if not 0 <= value < num_labels:
            raise DataError(
                f"{where}: label {value} is out of range; the model has {num_labels} labels "
                f"(0..{num_labels - 1})"
            )
        return value
    label2id = dict(getattr(config, "label2id", None) or {})
    if value not in label2id:
        known = ", ".join(repr(name) for name in label2id) or "none"
        raise DataError(f"{where}: unknown label {value!r}; the model's label2id knows {known}")
    return int(label2id[value])


__all__ = ["evaluate_classification", "model_max_length"]
