"""A tiny LLaVA trained offline on Fashion-MNIST composites: the testbed for visual token pruning.

Visual token pruning drops image tokens before the language model. On an untrained model no image
token matters, so no method can beat chance; this module trains a small stock LLaVA whose answers
depend on *which* image tokens it sees, and on the question, deterministically and in about five
minutes on 2 CPU cores:

* Images: real Fashion-MNIST items (``images/fashion-mnist`` in the shared assets), four 28×28
  items in a 2×2 grid: a 56×56 grayscale composite, handled as RGB. Training composites are drawn
  afresh every step from the *train* split; the held-out ones come from the *test* split.
* Questions, templated, so that the tokens that matter depend on the instruction:
  ``position``, "What is in the top-left?" (or another cell), answered by a short class name
  ("tshirt", "trouser", ..., "boot"): the 16 patch tokens of one cell matter;
  ``presence``, "Is there a bag?" (about a trouser, a sneaker or a bag), answered "yes" or "no",
  balanced for every class asked about: the matching cell matters, or every cell when the answer
  is "no". (Asked about all 10 classes, presence stayed near chance, 57-62% held-out, in the time
  budget: the answer hinges on matching the question word with the image, which a small language
  model learns slowly; about 3 classes it reaches ~90%.)
* Model: a stock ``LlavaForConditionalGeneration``: a CLIP vision tower (image 56, patch 7: 8×8 = 64
  patch tokens, CLS dropped by the "default" strategy, last-layer features), the two-layer GELU
  projector and a 2-layer Llama with tied embeddings. The processor (``LlavaProcessor`` around a
  ``CLIPImageProcessorPil`` normalising to [-1, 1]) turns one ``<image>`` into 64 image tokens.
* Tokenizer: a byte-level BPE trained on the templated prompts and answers (every answer is one
  token), plus ``<image>`` as a special token (never split: ``split_special_tokens`` stays off) and
  the four cell names as added tokens (one token each, like a class name).
* Training, in two stages, with fixed seeds and one torch thread:
  1. vision pretraining, standing in for LLaVA's pretrained CLIP: read through the language model's
     final norm and tied output embedding, every image token must name its cell's class (an answer
     word) and its cell (a question word); the vision tower, projector, final norm and embeddings
     learn (see ``_pretrain_vision`` for why);
  2. instruction tuning on the evaluation protocol of ``hf_prune.evals.vqa`` exactly: no chat
     template, so the prompt is ``"USER: <image>\n{question} ASSISTANT:"`` (BOS from the tokenizer),
     left-padded batches with position ids counted from the first real token as ``generate`` counts
     them, the answer then EOS as targets, loss on those tokens only; projector and language model
     learn, the vision tower stays frozen (``VISION_STAGE2_PEAK_LR``: unfreezing it gained little and
     cost more time than the budget has).

The folder (cached under ``$HF_PRUNE_CACHE`` or ``~/.cache/hf_prune``, subfolder ``vlm-testbed-v1``)
holds the model, the processor, ``data/eval.jsonl`` (400 held-out questions, two per composite, one of
each kind; rows ``{"image", "question", "answers", "kind", "items", "labels"}`` as ``evaluate_vqa``
reads them), the composites as PNG files under ``data/images/`` and ``testbed.json``: the recipe, build
time, final training losses and held-out accuracy (``evaluate_vqa``) overall and per question kind.

    python -m hf_prune.evals.testbeds.vlm_testbed [--cache DIR] [--assets DIR]

Determinism: the same seed gives the same weights in the same environment (same torch build); float
reductions may differ across machines.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import AddedToken
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

from ..training import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    adamw_warmup_cosine,
    cache_root,
    default_assets_dir,
    publish_when_done,
    testbed_cli,
    train_byte_level_bpe,
)
from ..vqa import build_prompt, evaluate_vqa
from .fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist

# Bump when the recipe changes so stale caches are ignored rather than reused.
VLM_TESTBED_VERSION = "vlm-testbed-v1"

FASHION_MNIST_SUBDIR = "images/fashion-mnist"  # relative to the shared assets folder
#: One short lowercase answer per Fashion-MNIST class (label order of FASHION_MNIST_CLASSES).
SHORT_NAMES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
assert len(SHORT_NAMES) == len(FASHION_MNIST_CLASSES)
#: Grid cells in row-major order: (name, row, column).
CELLS = (("top-left", 0, 0), ("top-right", 0, 1), ("bottom-left", 1, 0), ("bottom-right", 1, 1))
POSITION_QUESTION = "What is in the {cell}?"
PRESENCE_QUESTION = "Is there a {name}?"
#: Classes that presence questions ask about: trouser, sneaker, bag.
PRESENCE_CLASSES = (1, 7, 8)
KINDS = ("position", "presence")

ITEM_SIZE = 28
IMAGE_SIZE = 2 * ITEM_SIZE
PATCH_SIZE = 7
GRID = IMAGE_SIZE // PATCH_SIZE  # 8 x 8 patches
IMAGE_TOKENS = GRID * GRID  # 64; the CLS token is dropped
IMAGE_TOKEN = "<image>"
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # pixels to [-1, 1]

EVAL_COMPOSITES = 200  # x 2 questions (one per kind) = 400 held-out rows
DATA_SEED = 0  # fixed: the held-out set does not change with the training seed

VOCAB_SIZE = 512  # an upper bound: the BPE runs out of merges (whole words) well before
VISION_HIDDEN, VISION_LAYERS = 128, 3
TEXT_HIDDEN, TEXT_LAYERS = 128, 2
WARMUP_FRACTION = 0.05
VISION_BATCH_SIZE = 64  # composites per stage-1 step
VISION_STEPS = 300
VISION_PEAK_LR = 2e-3
BATCH_SIZE = 32  # questions per stage-2 step
# Every 4th question of a batch is a presence one: presence is learnt in ~200 steps, position is the slow
# part (measured, 1,400 steps: with half of each, seed 0 reached 38% on position, seed 1 70%; with a
# quarter, seeds 0 and 2 reached 82% and 81%, presence 91% and 93%).
PRESENCE_EVERY = 4
TRAIN_STEPS = 1400
PEAK_LR = 3e-3
# 0: the vision tower stays frozen in stage 2. The fresh language model's gradients wreck it at the full
# rate (unfrozen for the last 15% at the decayed rate: 4 points below frozen); a tenth of the rate, 3e-4,
# gained 3 points (77% -> 80%, 2,000 steps, an older stage 1) but made stage 2 1.45x slower.
VISION_STAGE2_PEAK_LR = 0.0
TRAIN_THREADS = 1  # tiny matmuls: a second thread only adds waiting (measured: ~2x slower on 2 busy cores)
EVAL_BATCH_SIZE = 50


def vlm_testbed_dir(
    cache_dir: str | os.PathLike | None = None,
    *,
    assets: str | os.PathLike | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Return the folder of the cached VLM testbed, building it first (about five minutes) if missing."""
    root = pathlib.Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / VLM_TESTBED_VERSION
    # The folder only appears through an atomic rename, so its existence means it is complete.
    if not target.is_dir():
        build_vlm_testbed(
            target, assets=assets if assets is not None else default_assets_dir(), progress=progress
        )
    return target


# --------------------------------------------------------------------------------------------- data


def load_items(assets: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``(images [N, 28, 28] uint8, labels [N])`` of a split; a clear error when missing."""
    folder = pathlib.Path(assets) / FASHION_MNIST_SUBDIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"VLM testbed: Fashion-MNIST (shared asset {FASHION_MNIST_SUBDIR}) not found at {folder}"
        )
    return read_fashion_mnist(folder, split)


def make_composites(items: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """``[..., 4, 28, 28]`` items to ``[..., 56, 56]`` 2×2 composites, cells in ``CELLS`` order."""
    grid = items.reshape(*items.shape[:-3], 2, 2, ITEM_SIZE, ITEM_SIZE)  # [..., row, col, y, x]
    return grid.swapaxes(-3, -2).reshape(*items.shape[:-3], IMAGE_SIZE, IMAGE_SIZE)  # [..., row, y, col, x]


def position_question(cell: int, cell_labels: Sequence[int]) -> tuple[str, str]:
    """The question about one cell and its answer (the short name of the item there)."""
    return POSITION_QUESTION.format(cell=CELLS[cell][0]), SHORT_NAMES[int(cell_labels[cell])]


def presence_question(label: int, yes: bool) -> tuple[str, str]:
    return PRESENCE_QUESTION.format(name=SHORT_NAMES[label]), "yes" if yes else "no"


def require_presence(
    items: Sequence[int],
    labels: np.ndarray,
    label: int,
    yes: bool,
    cell: int,
    draw: Callable[[int, bool], int],
) -> list[int]:
    """The 4 item indices edited so that class ``label`` is present (one put in ``cell`` unless one is
    there already) or absent (each such item replaced). ``draw(label, same)`` gives an item of that
    class (``same``) or of any other class."""
    items = [int(i) for i in items]
    if yes and all(labels[i] != label for i in items):
        items[cell] = draw(label, True)
    if not yes:
        items = [draw(label, False) if labels[i] == label else i for i in items]
    return items


def eval_rows(labels: np.ndarray, seed: int = DATA_SEED) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The held-out composites (test item indices ``[EVAL_COMPOSITES, 4]``, all distinct) and their
    questions: per composite a position one (cells in turn) and a presence one (classes in turn, "yes"
    for even composites: balanced for every class)."""
    order = iter(np.random.default_rng(seed).permutation(len(labels)).tolist())
    composites, rows = [], []

    def draw(label: int, same: bool) -> int:  # the next unused test item of (or not of) that class
        return next(i for i in order if (labels[i] == label) == same)

    first = [[next(order) for _ in range(4)] for _ in range(EVAL_COMPOSITES)]
    for index, items in enumerate(first):
        label, yes = PRESENCE_CLASSES[(index // 2) % len(PRESENCE_CLASSES)], index % 2 == 0
        items = require_presence(items, labels, label, yes, cell=(index // 2) % 4, draw=draw)
        composites.append(items)
        for kind, (question, answer) in (
            ("position", position_question(index % 4, labels[items])),
            ("presence", presence_question(label, yes)),
        ):
            rows.append({"composite": index, "question": question, "answer": answer, "kind": kind})
    return np.array(composites), rows


def write_eval_set(data_dir: pathlib.Path, images: np.ndarray, labels: np.ndarray) -> pathlib.Path:
    """The held-out composites as PNGs under ``data_dir/images`` and ``data_dir/eval.jsonl`` (relative paths)."""
    from PIL import Image

    composites, rows = eval_rows(labels)
    (data_dir / "images").mkdir(parents=True)
    for index, composite in enumerate(make_composites(images[composites])):
        Image.fromarray(composite).convert("RGB").save(data_dir / "images" / f"composite_{index:03d}.png")
    path = data_dir / "eval.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            items = composites[row["composite"]]
            record = {
                "image": f"images/composite_{row['composite']:03d}.png",
                "question": row["question"],
                "answers": [row["answer"]] * 10,
                "kind": row["kind"],
                "items": items.tolist(),
                "labels": labels[items].tolist(),
            }
            handle.write(json.dumps(record) + "\n")
    return path


# ------------------------------------------------------------------------------ tokenizer, processor


def all_questions() -> list[str]:
    return [POSITION_QUESTION.format(cell=name) for name, _, _ in CELLS] + [
        presence_question(label, True)[0] for label in PRESENCE_CLASSES
    ]


def build_processor() -> LlavaProcessor:
    """The byte-level BPE (trained on the prompts and answers) with ``<image>``, in a LlavaProcessor."""
    texts = [
        f"USER: \n{question} ASSISTANT: {answer}"
        for question in all_questions()
        for answer in (*SHORT_NAMES, "yes", "no")
    ]
    tokenizer = train_byte_level_bpe(texts * 4, vocab_size=VOCAB_SIZE, model_max_length=256)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    # Each cell name one token (the byte-level pre-tokenizer would cut "top-left" at the hyphen), so that
    # a position question names its cell with one token, as a presence question names its class.
    tokenizer.add_tokens([AddedToken(" " + name, normalized=False) for name, _, _ in CELLS])
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )


def pixel_values(composites: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 56, 56]`` composites to the processor's ``pixel_values`` ``[B, 3, 56, 56]`` without a PIL
    round trip (at 56×56 the processor neither resizes nor crops: it rescales and normalises)."""
    scaled = composites.float() / 255.0
    return ((scaled - IMAGE_MEAN[0]) / IMAGE_STD[0]).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def answer_ids(tokenizer: PreTrainedTokenizerFast, answer: str) -> list[int]:
    """The tokens ``generate`` should produce after "ASSISTANT:": the word with its leading space, then EOS."""
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


# ---------------------------------------------------------------------------------------------- model


def _build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=4 * VISION_HIDDEN,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        projection_dim=VISION_HIDDEN,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=3 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=IMAGE_TOKENS,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
        # The last layer: with -2 the tower's last layer would get no gradient at all.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


def _image_tokens(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """The projected image tokens as the language model receives them: ``[B, 64, H]``."""
    config = model.config
    features = model.model.get_image_features(
        pixels,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    return torch.stack(features.pooler_output)


def token_cells() -> torch.Tensor:
    """The cell (index into ``CELLS``) of each of the 64 image tokens, in token order."""
    return torch.tensor([2 * (y * 2 // GRID) + x * 2 // GRID for y in range(GRID) for x in range(GRID)])


# ------------------------------------------------------------------------------------------ training


def _pretrain_vision(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    images: np.ndarray,
    labels: np.ndarray,
    steps: int,
    seed: int,
    progress: bool,
) -> float:
    """Stage 1: read through the language model's final norm and tied output embedding, every image token
    (and each cell's mean token) must name its cell's class among the 10 answer words, and its cell among
    the 4 cell-name tokens of the position questions. Trains the vision tower, the projector, the final
    norm and the embeddings; returns the mean loss of the last steps.

    Why (measured with this recipe's sizes): trained end to end from scratch, the LLaVA learns the answer
    priors in ~50 steps, then stays at chance for over 1,000 steps (held-out 13% / 50%): the vision tower
    gets next to no gradient through an untrained language model, and a higher rate kills it. With only
    each cell's mean token classified, the language model still barely learns where to look (position
    loss 1.7 after 1,500 steps). With every token naming its class and cell in the words the questions
    use, a question's cell or class word can find its image tokens by matching embeddings.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    language_model = model.model.language_model
    trained = torch.nn.ModuleDict(
        {
            "vision": model.model.vision_tower,
            "projector": model.model.multi_modal_projector,
            "norm": language_model.norm,
            "embeddings": language_model.embed_tokens,
        }
    )
    optimizer, scheduler = adamw_warmup_cosine(
        trained, steps=steps, peak_lr=VISION_PEAK_LR, warmup_fraction=WARMUP_FRACTION
    )
    class_ids = [answer_ids(tokenizer, name)[0] for name in SHORT_NAMES]
    cell_ids = tokenizer.convert_tokens_to_ids([" " + name for name, _, _ in CELLS])
    cells = token_cells()
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels).long()
    recent: list[float] = []
    bar = tqdm(range(steps), desc="VLM testbed, stage 1 (vision)", disable=not progress)
    for _ in bar:
        items = torch.randint(0, len(images_t), (VISION_BATCH_SIZE, 4), generator=generator)
        cell_labels = labels_t[items]  # [B, 4]
        tokens = language_model.norm(_image_tokens(model, pixel_values(make_composites(images_t[items]))))
        cell_means = tokens.view(-1, 2, GRID // 2, 2, GRID // 2, TEXT_HIDDEN).mean(dim=(2, 4)).flatten(1, 2)
        logits = model.lm_head(tokens).flatten(0, 1)  # [B * 64, vocab]
        loss = (
            F.cross_entropy(model.lm_head(cell_means)[..., class_ids].flatten(0, 1), cell_labels.flatten())
            + F.cross_entropy(logits[:, class_ids], cell_labels[:, cells].flatten())
            + F.cross_entropy(logits[:, cell_ids], cells.repeat(len(items)))
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return round(sum(recent) / len(recent), 4) if recent else float("nan")


def _sample_batch(
    images: torch.Tensor,
    labels: np.ndarray,
    pools: Mapping[tuple[int, bool], torch.Tensor],
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    """``BATCH_SIZE`` fresh composites of random train items with their (kind, question, answer): every
    ``PRESENCE_EVERY``-th a presence question ("yes" and "no" alternating), the others a position one."""

    def randint(high: int) -> int:
        return int(torch.randint(0, high, (), generator=generator))

    def draw(label: int, same: bool) -> int:
        pool = pools[label, same]
        return int(pool[randint(len(pool))])

    rows, qa = [], []
    for b in range(BATCH_SIZE):
        items = torch.randint(0, len(images), (4,), generator=generator).tolist()
        cell = randint(4)
        if b % PRESENCE_EVERY != PRESENCE_EVERY - 1:
            qa.append(("position", *position_question(cell, labels[items])))
        else:
            label, yes = PRESENCE_CLASSES[randint(len(PRESENCE_CLASSES))], (b // PRESENCE_EVERY) % 2 == 0
            items = require_presence(items, labels, label, yes, cell, draw)
            qa.append(("presence", *presence_question(label, yes)))
        rows.append(items)
    return make_composites(images[torch.tensor(rows)]), qa


def _collate(
    qa: Sequence[tuple[str, str]], question_ids: Mapping[str, list[int]], tokenizer: PreTrainedTokenizerFast
) -> dict[str, torch.Tensor]:
    """Left-padded prompt + answer + EOS; labels only on the answer and EOS; positions from the first real token."""
    rows = [(question_ids[question], answer_ids(tokenizer, answer)) for question, answer in qa]
    width = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for b, (prompt, answer) in enumerate(rows):
        input_ids[b, width - len(prompt) - len(answer) :] = torch.tensor(prompt + answer)
        labels[b, width - len(answer) :] = torch.tensor(answer)
    mask = (torch.arange(width) >= width - torch.tensor([len(p) + len(a) for p, a in rows])[:, None]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() counts them under left padding
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def _train(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: np.ndarray,
    labels: np.ndarray,
    steps: int,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """Stage 2: instruction tuning on fresh composites every step; return the mean losses of the last steps."""
    blank = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    # Each question's prompt ids exactly as evaluate_vqa builds them (image tokens expanded by the processor).
    question_ids = {
        question: processor(images=blank, text=build_prompt(processor, question))["input_ids"][0]
        for question in all_questions()
    }
    pools = {
        (label, same): torch.from_numpy(np.flatnonzero((labels == label) == same))
        for label in PRESENCE_CLASSES
        for same in (True, False)
    }
    images_t = torch.from_numpy(images)
    generator = torch.Generator().manual_seed(seed)
    language_side = torch.nn.ModuleDict(
        {"projector": model.model.multi_modal_projector, "language_model": model.model.language_model}
    )  # + the tied LM head
    model.model.vision_tower.requires_grad_(VISION_STAGE2_PEAK_LR > 0)
    optimizers = [
        adamw_warmup_cosine(module, steps=steps, peak_lr=lr, warmup_fraction=WARMUP_FRACTION)
        for module, lr in ((language_side, PEAK_LR), (model.model.vision_tower, VISION_STAGE2_PEAK_LR))
        if lr > 0
    ]
    window = max(20, steps // 20)
    recent: dict[str, list[float]] = {kind: [] for kind in ("loss", *KINDS)}
    model.train()
    bar = tqdm(range(steps), desc="VLM testbed, stage 2 (instructions)", disable=not progress)
    for _ in bar:
        composites, qa = _sample_batch(images_t, labels, pools, generator)
        batch = _collate([(q, a) for _, q, a in qa], question_ids, processor.tokenizer)
        outputs = model(**batch, pixel_values=pixel_values(composites), use_cache=False)
        for optimizer, _ in optimizers:
            optimizer.zero_grad(set_to_none=True)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for optimizer, scheduler in optimizers:
            optimizer.step()
            scheduler.step()
        with torch.no_grad():  # each question's loss on its (one-token) answer, EOS left out, for the record
            row_loss = F.cross_entropy(
                outputs.logits[:, -3].float(), batch["labels"][:, -2], reduction="none"
            ).tolist()
        values = {
            "loss": [outputs.loss.item()],
            **{kind: [v for (k, _, _), v in zip(qa, row_loss, strict=True) if k == kind] for kind in KINDS},
        }
        for key, new in values.items():
            recent[key] = (recent[key] + new)[-window * len(new) :]
        bar.set_postfix(loss=f"{outputs.loss.item():.3f}")
    model.eval()

    def mean(key: str) -> float:
        return round(sum(recent[key]) / max(1, len(recent[key])), 4)

    return {
        "train_loss": mean("loss"),
        "answer_loss_by_kind": {kind: mean(kind) for kind in KINDS},
        "averaged_over_last_steps": window,
    }


def _held_out_accuracy(model, processor, eval_jsonl: pathlib.Path, progress: bool) -> dict[str, Any]:
    """``evaluate_vqa`` on all held-out rows, and on each kind's rows alone."""
    rows = [json.loads(line) for line in eval_jsonl.read_text().splitlines()]
    results = {
        "overall": evaluate_vqa(
            model, processor, eval_jsonl, batch_size=EVAL_BATCH_SIZE, max_new_tokens=4, progress=progress
        )
    }
    for kind in KINDS:
        subset = eval_jsonl.with_name(f".eval_{kind}.jsonl")
        subset.write_text("".join(json.dumps(row) + "\n" for row in rows if row["kind"] == kind))
        try:
            results[kind] = evaluate_vqa(
                model, processor, subset, batch_size=EVAL_BATCH_SIZE, max_new_tokens=4, progress=False
            )
        finally:
            subset.unlink()
    return {
        name: {
            "vqa_accuracy": round(r["vqa_accuracy"], 4),
            "exact_match": round(r["exact_match"], 4),
            "num_examples": r["num_examples"],
        }
        for name, r in results.items()
    }


# --------------------------------------------------------------------------------------------- build


def build_vlm_testbed(
    out_dir: str | os.PathLike,
    *,
    assets: str | os.PathLike,
    seed: int = 0,
    progress: bool = True,
    _steps: int | None = None,
) -> pathlib.Path:
    """Train the tokenizer and the LLaVA, measure it on the held-out questions, save it all to ``out_dir`` atomically.

    Everything is written to a unique temporary sibling folder renamed into place at the end (see
    ``publish_when_done``); if ``out_dir`` exists by then, the fresh copy is discarded. ``_steps``
    overrides the number of steps of each training stage (tests use a handful).
    """
    out_dir = pathlib.Path(out_dir)
    vision_steps, steps = (VISION_STEPS, TRAIN_STEPS) if _steps is None else (_steps, _steps)
    started = mark = time.perf_counter()
    seconds_by_stage: dict[str, float] = {}

    def lap(stage: str) -> None:
        nonlocal mark
        seconds_by_stage[stage], mark = round(time.perf_counter() - mark, 1), time.perf_counter()

    train_images, train_labels = load_items(assets, "train")
    test_images, test_labels = load_items(assets, "test")
    processor = build_processor()
    lap("data")
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)  # fixed, for reproducible float reductions
    try:
        model = _build_model(processor.tokenizer, seed)
        vision_loss = _pretrain_vision(
            model, processor.tokenizer, train_images, train_labels, vision_steps, seed, progress
        )
        lap("vision_pretraining")
        losses = _train(model, processor, train_images, train_labels, steps, seed, progress)
        lap("instruction_tuning")
        with publish_when_done(out_dir) as tmp_dir:
            model.save_pretrained(tmp_dir)
            processor.save_pretrained(tmp_dir)
            accuracy = _held_out_accuracy(
                model, processor, write_eval_set(tmp_dir / "data", test_images, test_labels), progress
            )
            lap("evaluation")
            record = {
                "version": VLM_TESTBED_VERSION,
                "seed": seed,
                "vision_steps": vision_steps,
                "steps": steps,
                "seconds": round(time.perf_counter() - started, 1),
                "seconds_by_stage": seconds_by_stage,
                "torch_threads": TRAIN_THREADS,
                "recipe": {
                    "model": "LlavaForConditionalGeneration",
                    "image_size": IMAGE_SIZE,
                    "patch_size": PATCH_SIZE,
                    "image_tokens": IMAGE_TOKENS,
                    "vision": f"CLIP, hidden {VISION_HIDDEN}, {VISION_LAYERS} layers, last-layer features, CLS dropped",
                    "text": f"Llama, hidden {TEXT_HIDDEN}, {TEXT_LAYERS} layers, tied embeddings",
                    "vocab_size": len(processor.tokenizer),
                    "data": "2x2 composites of Fashion-MNIST items: train split for training (fresh every step), "
                    f"test split for the {EVAL_COMPOSITES} held-out composites (distinct items)",
                    "questions": {"position": POSITION_QUESTION, "presence": PRESENCE_QUESTION},
                    "presence_classes": [SHORT_NAMES[label] for label in PRESENCE_CLASSES],
                    "answers": [*SHORT_NAMES, "yes", "no"],
                    "prompt": build_prompt(processor, "{question}") + " {answer}</s>",
                    "stage_1": f"{vision_steps} steps x {VISION_BATCH_SIZE} composites, peak lr {VISION_PEAK_LR}: "
                    "every image token (and cell mean) names its class and cell through the LM head",
                    "stage_2": f"{steps} steps x {BATCH_SIZE} questions (1 in {PRESENCE_EVERY} presence), peak lr "
                    f"{PEAK_LR}, vision tower peak lr {VISION_STAGE2_PEAK_LR} (0: frozen), "
                    "loss on the answer and EOS only",
                    "schedule": f"AdamW, {WARMUP_FRACTION:.0%} linear warm-up, cosine to 10% (each stage)",
                },
                "final_losses": {"vision_pretraining": vision_loss, **losses},
                "held_out_accuracy": accuracy,
            }
            (tmp_dir / "testbed.json").write_text(json.dumps(record, indent=2) + "\n")
    finally:
        torch.set_num_threads(threads)
    return out_dir


def summary(record: Mapping[str, Any]) -> str:
    """The headline figures of a ``testbed.json`` record, as text."""
    losses = record["final_losses"]
    lines = [
        f"VLM testbed {record['version']}: {record['vision_steps']} + {record['steps']} steps, built in "
        f"{record['seconds']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in record['seconds_by_stage'].items())})",
        f"final train loss {losses['train_loss']:.3f} (answer token: "
        + ", ".join(f"{k} {v:.3f}" for k, v in losses["answer_loss_by_kind"].items())
        + ")",
    ]
    for name, result in record["held_out_accuracy"].items():
        lines.append(
            f"held-out {name:<9} vqa accuracy {result['vqa_accuracy']:.3f}, exact match "
            f"{result['exact_match']:.3f} ({result['num_examples']} questions)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    testbed_cli(argv, __doc__, vlm_testbed_dir, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
