"""A tiny LLaVA trained offline on Fashion-MNIST composites: the testbed for visual token pruning.

Visual token pruning drops image tokens before the language model. On a random or untrained model
every token is as useless as any other, so a pruning method cannot look better than chance; this
module trains a small stock LLaVA whose answers depend on *which* image tokens it sees, and on the
question, deterministically and in a few minutes on 2 CPU cores:

* Images: real Fashion-MNIST items (``images/fashion-mnist`` in the shared assets) in a 2×2 grid,
  four 28×28 items per 56×56 grayscale composite (handled as RGB). Training composites are drawn
  afresh every step from the *train* split; the held-out composites come from the *test* split.
* Questions, templated, so that the tokens that matter depend on the instruction:
  ``position`` -- "What is in the top-left?" (and the three other cells), answered by a short class
  name ("tshirt", "trouser", ..., "boot"): only that cell's 16 patch tokens matter;
  ``presence`` -- "Is there a bag?" (any of the 10 classes), answered "yes" or "no", balanced, and
  for every class asked about as often "yes" as "no": any cell may matter.
* Model: a stock ``LlavaForConditionalGeneration``: a CLIP vision tower (image 56, patch 7: 8×8 = 64
  patch tokens, CLS dropped by the "default" strategy, features of the last layer), the usual
  two-layer GELU projector and a Llama language model; hidden 128, 3 + 4 layers. A processor
  (``LlavaProcessor`` around a ``CLIPImageProcessorPil``, normalising to [-1, 1]) expands one
  ``<image>`` into exactly 64 image tokens.
* Tokenizer: a byte-level BPE trained on the templated prompts and answers (every answer is one
  token), with ``<image>`` added as a special token (not split: ``split_special_tokens`` is off).
* Training: the evaluation protocol of ``hf_prune.evals.vqa`` exactly: no chat template, so the prompt
  is ``"USER: <image>\\n{question} ASSISTANT:"`` (BOS added by the tokenizer), left-padded batches with
  position ids counted from the first real token (as ``generate`` counts them), the answer then EOS as
  targets, loss on those tokens only. Vision tower, projector and language model are trained end to
  end with AdamW, linear warm-up and cosine decay, a fixed seed and a fixed thread count.

The folder (cached under ``$HF_PRUNE_CACHE`` or ``~/.cache/hf_prune``, subfolder ``vlm-testbed-v1``)
holds the model, the processor, ``data/eval.jsonl`` (400 held-out questions, two per composite, one of
each kind, rows ``{"image", "question", "answers", "kind"}`` for ``evaluate_vqa``), the composites as
PNG files under ``data/images/`` and ``testbed.json``: the recipe, build time, final training loss and
the held-out accuracy (``evaluate_vqa``) overall and per question kind.

    python -m hf_prune.evals.vlm_testbed [--cache DIR] [--assets DIR]

Determinism: the same seed gives the same weights in the same environment (same torch build); float
reductions may differ across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from .training import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    adamw_warmup_cosine,
    cache_root,
    publish_when_done,
    train_byte_level_bpe,
)
from .vqa import build_prompt, evaluate_vqa

# Bump when the recipe changes so stale caches are ignored rather than reused.
VLM_TESTBED_VERSION = "vlm-testbed-v1"

FASHION_MNIST_SUBDIR = "images/fashion-mnist"  # relative to the shared assets folder
#: One short lowercase answer per Fashion-MNIST class (label order), each a single token.
SHORT_NAMES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
#: Grid cells in row-major order: (name, row, column).
CELLS = (("top-left", 0, 0), ("top-right", 0, 1), ("bottom-left", 1, 0), ("bottom-right", 1, 1))
POSITION_QUESTION = "What is in the {cell}?"
PRESENCE_QUESTION = "Is there a {name}?"
KINDS = ("position", "presence")

ITEM_SIZE = 28
IMAGE_SIZE = 2 * ITEM_SIZE
PATCH_SIZE = 7
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64; the CLS token is dropped
IMAGE_TOKEN = "<image>"
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # pixels to [-1, 1]

EVAL_COMPOSITES = 200  # x 2 questions (one per kind) = 400 held-out rows
DATA_SEED = 0  # fixed: the held-out set does not change with the training seed

VOCAB_SIZE = 512  # an upper bound: the BPE runs out of merges (whole words) well before
VISION_HIDDEN, VISION_LAYERS = 128, 3
TEXT_HIDDEN, TEXT_LAYERS = 128, 4
BATCH_SIZE = 32  # composites per step, half with a position question, half with a presence one
TRAIN_STEPS = 1500
PEAK_LR = 2e-3
WARMUP_FRACTION = 0.05
TRAIN_THREADS = 1
EVAL_BATCH_SIZE = 50


def default_assets_dir() -> pathlib.Path:
    """The shared assets beside a source checkout: ``<repo>/../shared/assets``."""
    return pathlib.Path(__file__).resolve().parents[2] / "shared" / "assets"


def vlm_testbed_dir(cache_dir: str | os.PathLike | None = None, *, assets: str | os.PathLike | None = None,
                    progress: bool = True) -> pathlib.Path:
    """Return the folder of the cached VLM testbed, building it first (a few minutes) if missing."""
    root = pathlib.Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / VLM_TESTBED_VERSION
    # The folder only appears through an atomic rename, so its existence means it is complete.
    if not target.is_dir():
        build_vlm_testbed(target, assets=assets if assets is not None else default_assets_dir(), progress=progress)
    return target


# --------------------------------------------------------------------------------------------- data

def load_items(assets: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``(images [N, 28, 28] uint8, labels [N])`` of a split, with a clear error if missing."""
    folder = pathlib.Path(assets) / FASHION_MNIST_SUBDIR
    if not folder.is_dir():
        raise FileNotFoundError(f"VLM testbed: Fashion-MNIST not found at {folder} (shared asset {FASHION_MNIST_SUBDIR})")
    return read_fashion_mnist(folder, split)


def make_composites(items: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """``[..., 4, 28, 28]`` items to ``[..., 56, 56]`` 2×2 composites, cells in ``CELLS`` order."""
    grid = items.reshape(*items.shape[:-3], 2, 2, ITEM_SIZE, ITEM_SIZE)  # [..., row, col, y, x]
    grid = grid.swapaxes(-3, -2)  # [..., row, y, col, x]
    return grid.reshape(*items.shape[:-3], IMAGE_SIZE, IMAGE_SIZE)


def position_question(cell: int, labels) -> tuple[str, str]:
    """The question about one cell and its answer (the short name of the item there)."""
    return POSITION_QUESTION.format(cell=CELLS[cell][0]), SHORT_NAMES[int(labels[cell])]


def presence_question(labels, answer_yes: bool, pick: float) -> tuple[str, str]:
    """A "yes" (a class in the composite) or "no" (a class absent) question; ``pick`` in [0, 1) chooses
    the class uniformly among the candidates, so every class is asked "yes" as often as "no"."""
    present = {int(label) for label in labels}
    candidates = sorted(present if answer_yes else set(range(len(SHORT_NAMES))) - present)
    name = SHORT_NAMES[candidates[int(pick * len(candidates))]]
    return PRESENCE_QUESTION.format(name=name), "yes" if answer_yes else "no"


def eval_questions(labels: np.ndarray, seed: int = DATA_SEED) -> list[dict[str, Any]]:
    """Two questions per composite (labels ``[M, 4]``): a position one (cells in turn: each asked M/4
    times) and a presence one ("yes" for even composites: exactly balanced)."""
    picks = np.random.default_rng(seed).random(len(labels))
    rows = []
    for index, cells in enumerate(labels):
        for kind, (question, answer) in (("position", position_question(index % 4, cells)),
                                         ("presence", presence_question(cells, index % 2 == 0, picks[index]))):
            rows.append({"composite": index, "question": question, "answer": answer, "kind": kind})
    return rows


def write_eval_set(data_dir: pathlib.Path, images: np.ndarray, labels: np.ndarray) -> pathlib.Path:
    """Held-out composites of distinct test items as PNGs and ``eval.jsonl`` (paths relative to it)."""
    from PIL import Image

    chosen = np.random.default_rng(DATA_SEED).permutation(len(images))[:4 * EVAL_COMPOSITES].reshape(-1, 4)
    composites = make_composites(images[chosen])
    (data_dir / "images").mkdir(parents=True)
    for index, composite in enumerate(composites):
        Image.fromarray(composite).convert("RGB").save(data_dir / "images" / f"composite_{index:03d}.png")
    path = data_dir / "eval.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for row in eval_questions(labels[chosen]):
            index = row.pop("composite")
            answer = row.pop("answer")
            record = {"image": f"images/composite_{index:03d}.png", **row, "answers": [answer] * 10,
                      "items": [int(i) for i in chosen[index]], "labels": [int(c) for c in labels[chosen[index]]]}
            handle.write(json.dumps(record) + "\n")
    return path


# ------------------------------------------------------------------------------ tokenizer, processor

def all_questions() -> list[str]:
    return ([POSITION_QUESTION.format(cell=name) for name, _, _ in CELLS]
            + [PRESENCE_QUESTION.format(name=name) for name in SHORT_NAMES])


def build_processor() -> LlavaProcessor:
    """The byte-level BPE (trained on the prompts and answers) with ``<image>``, in a LlavaProcessor."""
    prompts = [f"USER: \n{question} ASSISTANT: {answer}" for question in all_questions()
               for answer in (*SHORT_NAMES, "yes", "no")]
    tokenizer = train_byte_level_bpe(prompts * 4, vocab_size=VOCAB_SIZE, model_max_length=256)
    # A special token, so it is never split (the tokenizer keeps split_special_tokens off).
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN)


def pixel_values(composites: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 56, 56]`` composites to the processor's ``pixel_values`` ``[B, 3, 56, 56]`` (no
    resizing is needed at 56×56: a per-pixel rescale and normalisation), without a PIL round trip."""
    scaled = composites.float() / 255.0
    return ((scaled - IMAGE_MEAN[0]) / IMAGE_STD[0]).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


# -------------------------------------------------------------------------------------- model, train

def _build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=4 * VISION_HIDDEN,
                              num_hidden_layers=VISION_LAYERS, num_attention_heads=4, image_size=IMAGE_SIZE,
                              patch_size=PATCH_SIZE, num_channels=3, projection_dim=VISION_HIDDEN)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=3 * TEXT_HIDDEN,
                       num_hidden_layers=TEXT_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, tie_word_embeddings=False,
                       bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=IMAGE_TOKENS,
                         # The last layer: with -2 the tower's last layer would get no gradient at all.
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


def _question_ids(processor: LlavaProcessor) -> dict[str, list[int]]:
    """Each question's prompt ids exactly as ``evaluate_vqa`` builds them (image tokens expanded)."""
    blank = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return {question: processor(images=blank, text=build_prompt(processor, question))["input_ids"][0]
            for question in all_questions()}


def _answer_ids(tokenizer: PreTrainedTokenizerFast, answer: str) -> list[int]:
    # After "ASSISTANT:" the answer is the word with its leading space, then EOS ends the generation.
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _sample_batch(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, list]:
    """``BATCH_SIZE`` fresh composites of random train items, half asked a position, half a presence question."""
    items = torch.randint(0, len(images), (BATCH_SIZE, 4), generator=generator)
    cells = torch.randint(0, 4, (BATCH_SIZE,), generator=generator).tolist()
    answer_yes = (torch.rand(BATCH_SIZE, generator=generator) < 0.5).tolist()
    picks = torch.rand(BATCH_SIZE, generator=generator).tolist()
    qa = [position_question(cells[b], labels[items[b]]) if b % 2 == 0
          else presence_question(labels[items[b]].tolist(), answer_yes[b], picks[b]) for b in range(BATCH_SIZE)]
    return make_composites(images[items]), qa


def _collate(qa: list[tuple[str, str]], question_ids: Mapping[str, list[int]],
             tokenizer: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    """Left-padded prompt + answer + EOS; labels only on the answer and EOS; positions from the first real token."""
    rows = [(question_ids[question], _answer_ids(tokenizer, answer)) for question, answer in qa]
    width = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (prompt, answer) in enumerate(rows):
        sequence = prompt + answer
        input_ids[b, width - len(sequence):] = torch.tensor(sequence)
        labels[b, width - len(answer):] = torch.tensor(answer)
        mask[b, width - len(sequence):] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate() counts them
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def _train(model: LlavaForConditionalGeneration, processor: LlavaProcessor, images: np.ndarray, labels: np.ndarray,
           steps: int, seed: int, progress: bool) -> dict[str, float]:
    """Train end to end on fresh composites every step; return the mean loss of the last steps."""
    generator = torch.Generator().manual_seed(seed)
    optimizer, scheduler = adamw_warmup_cosine(model, steps=steps, peak_lr=PEAK_LR, warmup_fraction=WARMUP_FRACTION)
    question_ids = _question_ids(processor)
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)
    window = max(20, steps // 20)
    recent: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="training VLM testbed", disable=not progress)
    for _ in bar:
        composites, qa = _sample_batch(images_t, labels_t, generator)
        batch = _collate(qa, question_ids, processor.tokenizer)
        loss = model(**batch, pixel_values=pixel_values(composites), use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-window:]
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return {"train_loss": round(sum(recent) / max(1, len(recent)), 4), "averaged_over_last_steps": window}


def _held_out_accuracy(model, processor, eval_jsonl: pathlib.Path, progress: bool) -> dict[str, Any]:
    """``evaluate_vqa`` on all held-out rows and on each kind's rows alone."""
    rows = [json.loads(line) for line in eval_jsonl.read_text().splitlines()]
    results = {"overall": evaluate_vqa(model, processor, eval_jsonl, batch_size=EVAL_BATCH_SIZE, max_new_tokens=4,
                                       progress=progress)}
    for kind in KINDS:
        subset = eval_jsonl.with_name(f".eval_{kind}.jsonl")
        subset.write_text("".join(json.dumps(row) + "\n" for row in rows if row["kind"] == kind))
        results[kind] = evaluate_vqa(model, processor, subset, batch_size=EVAL_BATCH_SIZE, max_new_tokens=4,
                                     progress=False)
        subset.unlink()
    return {name: {"vqa_accuracy": round(r["vqa_accuracy"], 4), "exact_match": round(r["exact_match"], 4),
                   "num_examples": r["num_examples"]} for name, r in results.items()}


# ------------------------------------------------------------------------------------------- build

def build_vlm_testbed(out_dir: str | os.PathLike, *, assets: str | os.PathLike, seed: int = 0,
                      progress: bool = True, _steps: int | None = None) -> pathlib.Path:
    """Train the tokenizer and the LLaVA, measure it on the held-out questions, save it all to ``out_dir`` atomically.

    Everything is written to a unique temporary sibling folder renamed into place at the end (see
    ``publish_when_done``); if ``out_dir`` exists by then, the fresh copy is discarded. ``_steps``
    overrides the number of training steps (tests use a handful).
    """
    out_dir = pathlib.Path(out_dir)
    steps = TRAIN_STEPS if _steps is None else _steps
    started = time.perf_counter()
    train_images, train_labels = load_items(assets, "train")
    test_images, test_labels = load_items(assets, "test")
    processor = build_processor()
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)  # fixed, for reproducible float reductions
    try:
        model = _build_model(processor.tokenizer, seed)
        losses = _train(model, processor, train_images, train_labels, steps, seed, progress)
        train_seconds = time.perf_counter() - started
        with publish_when_done(out_dir) as tmp_dir:
            model.save_pretrained(tmp_dir)
            processor.save_pretrained(tmp_dir)
            eval_jsonl = write_eval_set(tmp_dir / "data", test_images, test_labels)
            accuracy = _held_out_accuracy(model, processor, eval_jsonl, progress)
            record = {
                "version": VLM_TESTBED_VERSION,
                "seed": seed,
                "steps": steps,
                "seconds": round(time.perf_counter() - started, 1),  # the whole build bar saving
                "training_seconds": round(train_seconds, 1),
                "torch_threads": TRAIN_THREADS,
                "recipe": {
                    "model": "LlavaForConditionalGeneration", "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE,
                    "image_tokens": IMAGE_TOKENS, "vision": f"CLIP, hidden {VISION_HIDDEN}, {VISION_LAYERS} layers, "
                                                            "features of the last layer, CLS dropped",
                    "text": f"Llama, hidden {TEXT_HIDDEN}, {TEXT_LAYERS} layers", "vocab_size": len(processor.tokenizer),
                    "data": "2x2 composites of Fashion-MNIST items: train split for training (fresh every step), "
                            f"test split for the {EVAL_COMPOSITES} held-out composites",
                    "questions": {"position": POSITION_QUESTION, "presence": PRESENCE_QUESTION},
                    "answers": list(SHORT_NAMES) + ["yes", "no"],
                    "prompt": build_prompt(processor, "{question}") + " {answer}</s>",
                    "batch": f"{BATCH_SIZE} composites, half position, half presence", "peak_lr": PEAK_LR,
                    "schedule": f"AdamW, {WARMUP_FRACTION:.0%} linear warm-up, cosine to 10%",
                    "loss": "cross-entropy on the answer and EOS tokens only",
                },
                "final_losses": losses,
                "held_out_accuracy": accuracy,
            }
            (tmp_dir / "testbed.json").write_text(json.dumps(record, indent=2) + "\n")
    finally:
        torch.set_num_threads(threads)
    return out_dir


def summary(record: Mapping[str, Any]) -> str:
    """The headline figures of a ``testbed.json`` record, as text."""
    accuracy = record["held_out_accuracy"]
    lines = [f"VLM testbed {record['version']}: {record['steps']} steps, built in {record['seconds']:.0f} s "
             f"(training {record['training_seconds']:.0f} s), final train loss {record['final_losses']['train_loss']:.3f}"]
    for name, result in accuracy.items():
        lines.append(f"  held-out {name:<9} vqa accuracy {result['vqa_accuracy']:.3f}  exact match "
                     f"{result['exact_match']:.3f}  ({result['num_examples']} questions)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=None, help="cache root (default: $HF_PRUNE_CACHE or ~/.cache/hf_prune)")
    parser.add_argument("--assets", default=None, help=f"shared assets folder (default: {default_assets_dir()})")
    args = parser.parse_args(argv)
    folder = vlm_testbed_dir(args.cache, assets=args.assets)
    print(folder)
    print(summary(json.loads((folder / "testbed.json").read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
