"""A small Llama trained offline on Python's own documentation: the default model of the demo.

Everything here is deterministic and needs no network: the text is ``pydoc_data.topics`` (ships
with CPython), the tokenizer is a byte-level BPE trained with ``tokenizers`` and the model a tiny
``LlamaForCausalLM`` trained for about a minute on CPU. The result is cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .perplexity import perplexity_of_tokens
from .training import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    adamw_warmup_cosine,
    cache_root,
    publish_when_done,
    train_byte_level_bpe,
)

# Bump when the recipe changes so stale caches are ignored rather than reused.
DEMO_MODEL_VERSION = "demo-llama-v1"

VOCAB_SIZE = 1024
SEQ_LEN = 128
# Measured on 2 CPU cores: at equal wall time, more small steps beat fewer large ones
# (8 x 800 steps reaches eval perplexity ~22, 16 x 420 only ~38). ~65 s of training.
BATCH_SIZE = 8
TRAIN_STEPS = 800
PEAK_LR = 3e-3
WARMUP_FRACTION = 0.05
HELD_OUT_FRACTION = 0.05  # of the characters, for each of calibration and eval


def demo_model_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the folder of the cached demo model, building it first if missing."""
    root = pathlib.Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / DEMO_MODEL_VERSION
    # The folder only appears through an atomic rename, so its existence means it is complete.
    if not target.is_dir():
        build_demo_model(target)
    return target


def demo_text_splits() -> dict[str, str]:
    """Split the pydoc topics by document into disjoint train / calibration / eval texts."""
    from pydoc_data.topics import topics

    total_chars = sum(len(text) for text in topics.values())
    quota = HELD_OUT_FRACTION * total_chars
    held_out: dict[str, list[str]] = {"calibration": [], "eval": []}
    filled = dict.fromkeys(held_out, 0)
    train: list[str] = []
    # Hashing the key gives an order that is stable across runs and unrelated to topic names.
    for key in sorted(topics, key=lambda k: hashlib.sha256(k.encode()).hexdigest()):
        text = topics[key]
        # Skip documents larger than a quota so one giant topic cannot swallow a split.
        split = next((s for s in held_out if filled[s] < quota and len(text) <= quota), None)
        if split is None:
            train.append(key)
        else:
            held_out[split].append(key)
            filled[split] += len(text)
    # Within each split, join in sorted key order.
    return {
        name: "\n\n".join(topics[k] for k in sorted(keys))
        for name, keys in {"train": train, **held_out}.items()
    }


def _train_tokenizer(text: str) -> PreTrainedTokenizerFast:
    # Fed paragraph by paragraph rather than as one huge string: faster, and better word frequencies.
    return train_byte_level_bpe(text.split("\n\n"), vocab_size=VOCAB_SIZE, model_max_length=SEQ_LEN * 2)


def _token_stream(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """Encode each document (with its BOS) and concatenate them into one 1-D tensor."""
    # The backend skips the wrapper's max-length warning: documents are cut into windows later.
    encodings = tokenizer.backend_tokenizer.encode_batch(text.split("\n\n"))
    return torch.tensor([tok for enc in encodings for tok in enc.ids], dtype=torch.long)


def _build_model(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=6,  # the demo drops 2 of these by depth pruning
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN * 2,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


def _train(model: LlamaForCausalLM, tokens: torch.Tensor, steps: int, seed: int, progress: bool) -> float:
    """Train on random windows of ``tokens``; return the mean loss of the last few steps."""
    generator = torch.Generator().manual_seed(seed)
    optimizer, scheduler = adamw_warmup_cosine(
        model, steps=steps, peak_lr=PEAK_LR, warmup_fraction=WARMUP_FRACTION
    )
    offsets = torch.arange(SEQ_LEN)
    recent_losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="training demo model", disable=not progress)
    for _ in bar:
        starts = torch.randint(0, len(tokens) - SEQ_LEN, (BATCH_SIZE,), generator=generator)
        batch = tokens[starts[:, None] + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent_losses = (recent_losses + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return sum(recent_losses) / max(1, len(recent_losses))


def build_demo_model(
    out_dir: str | os.PathLike, *, seed: int = 0, progress: bool = True, _steps: int | None = None
) -> pathlib.Path:
    """Train the demo tokenizer and model and save them to ``out_dir`` atomically.

    The model is written to a unique temporary sibling folder that is renamed into place at the end,
    so an interrupted build leaves nothing that looks complete. If ``out_dir`` already exists by then
    (a concurrent build won the race), the fresh copy is discarded. ``_steps`` overrides the number of
    training steps (tests use a handful).
    """
    out_dir = pathlib.Path(out_dir)
    steps = TRAIN_STEPS if _steps is None else _steps
    started = time.perf_counter()

    splits = demo_text_splits()
    tokenizer = _train_tokenizer(splits["train"])
    model = _build_model(seed)
    final_loss = _train(model, _token_stream(tokenizer, splits["train"]), steps, seed, progress)
    eval_ppl = perplexity_of_tokens(
        model, _token_stream(tokenizer, splits["eval"]), seq_len=SEQ_LEN, batch_size=32
    )["perplexity"]
    seconds = time.perf_counter() - started  # the whole build bar saving

    with publish_when_done(out_dir) as tmp_dir:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        record = {
            "version": DEMO_MODEL_VERSION,
            "seed": seed,
            "steps": steps,
            "batch_size": BATCH_SIZE,
            "seq_len": SEQ_LEN,
            "seconds": round(seconds, 1),
            "final_train_loss": round(final_loss, 4),
            "eval_perplexity": round(eval_ppl, 3),
        }
        (tmp_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out_dir
