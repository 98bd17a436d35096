"""Calibration data through ``datasets``: local files or a hub id, cut into padded token batches.

Sequences are right-padded and carry an attention mask; every statistic downstream skips masked
positions, so pad tokens never enter them.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .data import load_text_records
from .errors import CalibrationError, CalibrationWarning
from .recipe import CalibrationConfig


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S], 1 for real tokens

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> CalibrationBatch:
        return CalibrationBatch(self.input_ids.to(device), self.attention_mask.to(device))


def tokenize_calibration(
    texts: list[str], tokenizer: Any, config: CalibrationConfig
) -> list[CalibrationBatch]:
    """Cut texts into at most ``num_samples`` sequences of at most ``seq_len`` tokens, batched."""
    if config.shuffle:
        texts = list(texts)
        random.Random(config.seed).shuffle(texts)
    sequences: list[list[int]] = []
    if config.packing:
        stream: list[int] = []
        for text in texts:
            stream.extend(tokenizer(text, verbose=False)["input_ids"])
            if len(stream) >= config.num_samples * config.seq_len:
                break
        sequences = [stream[i : i + config.seq_len] for i in range(0, len(stream), config.seq_len)]
        sequences = [s for s in sequences if len(s) == config.seq_len] or sequences[:1]
    else:
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=config.seq_len)["input_ids"]
            if len(ids) >= 2:
                sequences.append(ids)
            if len(sequences) == config.num_samples:
                break
    sequences = [s for s in sequences[: config.num_samples] if len(s) >= 2]
    if not sequences:
        raise CalibrationError("calibration data yields no sequence of at least 2 tokens")
    warn_if_short(sequences, config)
    pad_id = _pad_token_id(tokenizer)
    batches = []
    for start in range(0, len(sequences), config.batch_size):
        chunk = sequences[start : start + config.batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        batches.append(CalibrationBatch(ids, mask))
    return batches


def warn_if_short(sequences: list[list[int]], config: CalibrationConfig) -> None:
    """A CalibrationWarning when the sequences hold fewer tokens than ``num_samples × seq_len``: the run goes
    on, but on less data than the recipe says (short records, or too few of them)."""
    tokens = sum(len(s) for s in sequences)
    requested = config.num_samples * config.seq_len
    if tokens < requested:
        hint = "" if config.packing else ", or set packing: true to fill every sequence"
        warnings.warn(
            f"calibration data {config.data} gives {tokens:,} tokens, fewer than the {requested:,} requested "
            f"(num_samples {config.num_samples} × seq_len {config.seq_len}): {len(sequences)} sequence(s) "
            f"of {tokens / len(sequences):.0f} tokens on average; add calibration text{hint}",
            CalibrationWarning,
            stacklevel=2,
        )


def build_calibration(config: CalibrationConfig, tokenizer: Any) -> list[CalibrationBatch]:
    texts = load_text_records(
        config.data, text_field=config.text_field, split=config.split, sample_by=config.sample_by
    )
    return tokenize_calibration(texts, tokenizer, config)


@torch.no_grad()
def self_generated_texts(
    model: Any, tokenizer: Any, *, num_samples: int, max_new_tokens: int, seed: int = 0, batch_size: int = 16
) -> list[str]:
    """Texts the model samples from BOS (data-free calibration, in the model's own distribution)."""
    if tokenizer.bos_token_id is None:
        raise CalibrationError("self-generated calibration needs a tokenizer with a BOS token")
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    texts = []
    try:
        for start in range(0, num_samples, batch_size):
            rows = min(batch_size, num_samples - start)
            bos = torch.full((rows, 1), tokenizer.bos_token_id, device=device)
            out = model.generate(
                bos,
                attention_mask=torch.ones_like(bos),
                do_sample=True,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=_pad_token_id(tokenizer),
            )
            texts.extend(tokenizer.decode(row, skip_special_tokens=True) for row in out)
    finally:
        torch.random.set_rng_state(generator_state)
    return texts


def _pad_token_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0
