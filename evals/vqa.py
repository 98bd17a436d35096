"""Visual question answering with a vision-language model (LLaVA-style) on a local JSONL file.

Each row is ``{"image": path, "question": str, "answers": [str, ...]}`` (or ``"answer": str``);
relative image paths resolve against the JSONL file's folder. Prompts come from the processor's
chat template when it has one, else ``"USER: <image>\\n{question} ASSISTANT:"``; generation is
greedy and batched with left padding, and only the new tokens are decoded. The shipped
``vqa_accuracy`` and ``exact_match`` metrics score the answers.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import model_device, vision_config
from ..data import read_records
from ..errors import DataError
from .metrics import load_metric

#: Prompt used when the processor has no chat template; ``{image}`` is the processor's image token.
FALLBACK_PROMPT = "USER: {image}\n{question} ASSISTANT:"

#: How many (question, prediction, answers) triples the result shows.
NUM_SHOWN_EXAMPLES = 5


def evaluate_vqa(
    model,
    processor,
    data: str | os.PathLike,
    *,
    batch_size: int = 4,
    limit: int | None = None,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """VQA accuracy and exact match of ``model`` on the image questions in the JSONL file ``data``.

    Args:
        model: a vision-language model with ``generate`` whose config has a ``vision_config``
            (LLaVA, LLaVA-NeXT, ...).
        processor: its processor (tokenizer + image processor), e.g. ``LlavaProcessor``.
        data: a local ``.jsonl`` file, one object per line (see the module docstring).
        batch_size: questions per ``generate`` call; prompts are left-padded, so batching does not
            change the answers.
        limit: evaluate only the first ``limit`` rows.
        max_new_tokens: answer length cap (generation is greedy and stops early at EOS).
        progress: show a tqdm bar over batches.

    Returns:
        ``{"vqa_accuracy", "exact_match", "num_examples", "data", "seconds", "examples"}`` where
        ``examples`` lists the first 5 ``{"question", "prediction", "answers"}``. ``exact_match``
        compares the prediction with the row's most frequent answer (the first one on a tie).

    Raises:
        ValueError: a text-only model (no vision tower), a processor without an image processor,
            or a bad ``batch_size`` / ``limit`` / ``max_new_tokens``.
        FileNotFoundError: ``data`` does not exist, or an image it names does not (the message
            names ``file:line`` and the image path).
        DataError (a ValueError): bad JSON, a row without image/question/answers, an image that
            cannot be read, or an empty file; each message names ``file:line``.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all rows), got {limit}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    _check_vision_model(model)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise ValueError(
            f"vqa needs the model's processor (tokenizer + image processor), got {type(processor).__name__}"
        )

    data_name = os.fspath(data)
    examples = read_vqa_records(data_name, limit=limit)

    vqa_metric = load_metric("vqa_accuracy")
    exact_metric = load_metric("exact_match")
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    shown = []
    saved_padding_side = tokenizer.padding_side
    saved_pad_token = tokenizer.pad_token
    was_training = model.training
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # padding is needed for batches; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="vqa", unit="batch", disable=not progress):
                images = [load_image(example["image"], example["where"]) for example in batch]
                predictions = answer_questions(
                    model,
                    processor,
                    images,
                    [example["question"] for example in batch],
                    max_new_tokens=max_new_tokens,
                    device=device,
                    dtype=dtype,
                )
                vqa_metric.add_batch(
                    predictions=predictions, references=[example["answers"] for example in batch]
                )
                exact_metric.add_batch(
                    predictions=predictions,
                    references=[majority_answer(example["answers"]) for example in batch],
                )
                for example, prediction in zip(batch, predictions, strict=True):
                    if len(shown) < NUM_SHOWN_EXAMPLES:
                        shown.append(
                            {
                                "question": example["question"],
                                "prediction": prediction,
                                "answers": list(example["answers"]),
                            }
                        )
    finally:
        tokenizer.padding_side = saved_padding_side
        if saved_pad_token is None:
            tokenizer.pad_token = None
        model.train(was_training)

    vqa = vqa_metric.compute()
    exact = exact_metric.compute()
    return {
        "vqa_accuracy": float(vqa["vqa_accuracy"]),
        "exact_match": float(exact["exact_match"]),
        "num_examples": len(examples),
        "data": data_name,
        "seconds": time.perf_counter() - started,
        "examples": shown,
    }


def answer_questions(
    model, processor, images: list, questions: list[str], *, max_new_tokens: int, device=None, dtype=None
) -> list[str]:
    """Greedy answers to one batch of (image, question) pairs; only the generated tokens are decoded.

    Pads on the tokenizer's current ``padding_side``: ``evaluate_vqa`` sets it to ``"left"`` (with
    right padding, a shorter prompt's answer would follow pad tokens).
    """
    tokenizer = processor.tokenizer
    prompts = [build_prompt(processor, question) for question in questions]
    # A chat template writes the special tokens (BOS) itself; the tokenizer must not add them again.
    add_special = getattr(processor, "chat_template", None) is None
    inputs = processor(
        images=images, text=prompts, padding=True, add_special_tokens=add_special, return_tensors="pt"
    )
    device = device if device is not None else model_device(model)
    inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
    if "pixel_values" in inputs and dtype is not None and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_token_id
    )
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def build_prompt(processor, question: str) -> str:
    """The prompt for one question: the processor's chat template (user turn with an image and the
    question, generation prompt added) if it has one, else ``FALLBACK_PROMPT``."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(processor, "image_token", None) or "<image>"
    return FALLBACK_PROMPT.format(image=image_token, question=question)


def read_vqa_records(path: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Validated VQA rows: ``{"image": resolved Path, "question", "answers": [str, ...], "where": "file:line"}``.

    Every image is checked to exist up front, so a bad row fails before any generation runs.
    """
    records = read_records(path, required=("image", "question"))
    if limit is not None:
        records = records[:limit]
    base = Path(path).expanduser().resolve().parent
    examples = []
    for where, row in records:
        image, question = row["image"], row["question"]
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: field 'image' must be a non-empty path string, got {image!r}")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: field 'question' must be a non-empty string, got {question!r}")
        answers = _answers(row, where)
        image_path = Path(image).expanduser()
        if not image_path.is_absolute():
            image_path = base / image_path
        if not image_path.is_file():
            raise FileNotFoundError(f"{where}: image not found: {image} (looked for {image_path})")
        examples.append({"image": image_path, "question": question, "answers": answers, "where": where})
    return examples


def load_image(path: Path, where: str = ""):
    """An RGB PIL image; unreadable files raise a DataError naming ``where`` (file:line) and the path."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{where}: cannot read image {path}: {exc}") from exc


def majority_answer(answers: list[str]) -> str:
    """The most frequent answer (the earliest of the most frequent on a tie)."""
    counts = Counter(answers)
    return max(answers, key=lambda answer: counts[answer])  # max keeps the first maximal item


def _answers(row: dict, where: str) -> list[str]:
    # A field absent from this row but present in others reads as null through datasets.
    if row.get("answers") is not None:
        answers = row["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: field 'answers' must be a non-empty list of strings, got {answers!r}")
        return list(answers)
    if row.get("answer") is not None:
        answer = row["answer"]
        if not isinstance(answer, str):
            raise DataError(f"{where}: field 'answer' must be a string, got {answer!r}")
        return [answer]
    raise DataError(
        f"{where}: missing field 'answers' (a list of strings) or 'answer' (a string); "
        "each row needs image, question and answers"
    )


def _check_vision_model(model) -> None:
    config = getattr(model, "config", None)
    if vision_config(config) is None:
        model_type = getattr(config, "model_type", None) or type(model).__name__
        raise ValueError(f"vqa needs a vision-language model; {model_type} has no vision tower")


__all__ = [
    "FALLBACK_PROMPT",
    "answer_questions",
    "build_prompt",
    "evaluate_vqa",
    "load_image",
    "majority_answer",
    "read_vqa_records",
]
