"""Shared pieces of the project's own testbed builders (the demo Llama, the MoE testbed)."""

from __future__ import annotations

import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


def cache_root() -> pathlib.Path:
    """Where built testbeds are cached: ``$HF_PRUNE_CACHE``, else ``~/.cache/hf_prune`` (outside the repo)."""
    env = os.environ.get("HF_PRUNE_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "hf_prune"


def adamw_warmup_cosine(model: torch.nn.Module, *, steps: int, peak_lr: float, warmup_fraction: float):
    """AdamW (β 0.9/0.95, weight decay 0.1) with linear warm-up, then cosine decay to 10% of the peak."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, int(warmup_fraction * steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


#: Special tokens of the testbeds' tokenizers; the list order fixes their ids 0..3.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
BOS_ID, EOS_ID, PAD_ID = 1, 2, 3


def train_byte_level_bpe(
    pieces: Iterable[str], *, vocab_size: int, model_max_length: int, split_special_tokens: bool = False
):
    """A byte-level BPE trained offline on ``pieces``, wrapped for transformers; every encoding starts with BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(pieces, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        split_special_tokens=split_special_tokens,
    )


@contextmanager
def publish_when_done(out_dir: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a fresh hidden sibling of ``out_dir`` to build into; when the block succeeds, rename it into
    place (a folder that a concurrent build finished first is kept). Nothing half-built is ever left."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp_dir
        # mkdtemp (and the weights writer) make things private, but the cache is shared like any folder.
        for path in [tmp_dir, *tmp_dir.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.replace(tmp_dir, out_dir)
        except OSError:  # renaming onto a non-empty folder fails: another build finished first
            if not out_dir.is_dir():
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def default_assets_dir() -> pathlib.Path:
    """The shared assets beside a source checkout: ``<repo>/../shared/assets``."""
    return pathlib.Path(__file__).resolve().parents[2] / "shared" / "assets"


def testbed_cli(argv: list[str] | None, doc: str, testbed_dir, summary) -> dict:
    """``python -m hf_prune.evals.testbeds.<name>_testbed [--cache DIR] [--assets DIR]``: build (or find) the cached
    testbed with ``testbed_dir(cache, assets=...)``, print its folder and ``summary(record)``; returns the record."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--cache", default=None, help="cache root (default: $HF_PRUNE_CACHE or ~/.cache/hf_prune)"
    )
    parser.add_argument(
        "--assets", default=None, help=f"shared assets folder (default: {default_assets_dir()})"
    )
    args = parser.parse_args(argv)
    folder = testbed_dir(args.cache, assets=args.assets)
    record = json.loads((folder / "testbed.json").read_text())
    print(folder)
    print(summary(record))
    return record
