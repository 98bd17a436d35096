"""A CLIP text tower for the VLM testbed, so CDPruner's ``text_tower:`` relevance can be measured on it.

LLaVA's vision tower is half of a real CLIP, whose text half (contrastively pretrained with it) is what
CDPruner uses for relevance. The testbed's vision tower (``vlm_testbed.py``) was trained from scratch, so
no text tower shares its space: this module trains one, as CLIP's pretraining would have, against the
frozen tower. Each of the testbed's questions (decoded from the prompt exactly as the pruned model
decodes it, "What is in the top-left? ASSISTANT:") should match the visual tokens it is about:

* a position question: the 16 tokens of its cell;
* a presence question: the tokens of every cell holding that class (none when the answer is "no").

A visual token is embedded as the pruned model will embed it: the tower's post-layernorm of its
last-layer feature, then ``visual_projection``; the loss is a binary cross-entropy on a learnt scale and
bias times the cosine (SigLIP-style: a token may match several texts, or none). The result is a
``CLIPModel`` folder whose vision weights are the testbed's own tower, plus a character-level CLIP
tokenizer (the questions are short), cached beside the testbed (``vlm-testbed-v1-clip``); about a minute
on one CPU thread.

    python -m hf_prune.evals.testbeds.vlm_testbed_clip [--cache DIR] [--assets DIR]
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..training import adamw_warmup_cosine, cache_root, default_assets_dir, publish_when_done, testbed_cli
from ..vqa import build_prompt
from .vlm_testbed import (
    CELLS,
    POSITION_QUESTION,
    PRESENCE_CLASSES,
    PRESENCE_QUESTION,
    SHORT_NAMES,
    VLM_TESTBED_VERSION,
    load_items,
    make_composites,
    pixel_values,
    token_cells,
    vlm_testbed_dir,
)

CLIP_VERSION = VLM_TESTBED_VERSION + "-clip"
TEXT_HIDDEN, TEXT_LAYERS, PROJECTION = 64, 2, 64
STEPS, BATCH_SIZE, PEAK_LR = 300, 64, 3e-3
SEED = 0


def vlm_testbed_clip_dir(
    cache_dir: str | os.PathLike | None = None,
    *,
    assets: str | os.PathLike | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """The cached CLIP folder for the testbed (built first, with the testbed if needed)."""
    root = pathlib.Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / CLIP_VERSION
    if not target.is_dir():
        testbed = vlm_testbed_dir(root, assets=assets, progress=progress)
        build_testbed_clip(
            target, testbed, assets=assets if assets is not None else default_assets_dir(), progress=progress
        )
    return target


def character_clip_tokenizer() -> Any:
    """A CLIP tokenizer over single characters (the byte alphabet, word-end variants, no merges)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def question_targets(labels: np.ndarray) -> tuple[list[str], torch.Tensor]:
    """The testbed's questions and, per composite (``labels`` [B, 4]), which of the 64 tokens each is about:
    ``(questions, [B, questions, 64] float)``."""
    cells = token_cells()  # [64]
    questions, targets = [], []
    for index, (name, _, _) in enumerate(CELLS):
        questions.append(POSITION_QUESTION.format(cell=name))
        targets.append((cells == index).float().expand(len(labels), -1))
    for label in PRESENCE_CLASSES:
        questions.append(PRESENCE_QUESTION.format(name=SHORT_NAMES[label]))
        holds = torch.as_tensor(labels == label)  # [B, 4]
        targets.append(holds[:, cells].float())
    return questions, torch.stack(targets, dim=1)


def instruction_text(processor: Any, question: str) -> str:
    """The question as the pruned model hands it to the text tower: its prompt's text after the image."""
    tokenizer = processor.tokenizer
    ids = tokenizer(build_prompt(processor, question))["input_ids"]
    image = ids.index(tokenizer.convert_tokens_to_ids(processor.image_token))
    return tokenizer.decode(ids[image + 1 :], skip_special_tokens=True)


def build_testbed_clip(
    out_dir: pathlib.Path, testbed: pathlib.Path, *, assets: str | os.PathLike, progress: bool = True
) -> dict[str, Any]:
    from transformers import (
        AutoProcessor,
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        LlavaForConditionalGeneration,
    )

    started = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: see vlm_testbed.TRAIN_THREADS
    try:
        llava = LlavaForConditionalGeneration.from_pretrained(
            testbed, dtype=torch.float32, trust_remote_code=False
        ).eval()
        processor = AutoProcessor.from_pretrained(testbed, trust_remote_code=False)
        tokenizer = character_clip_tokenizer()
        vision = llava.model.vision_tower
        text = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=PROJECTION,
        )
        torch.manual_seed(SEED)
        clip = CLIPModel(
            CLIPConfig(
                text_config=text.to_dict(), vision_config=vision.config.to_dict(), projection_dim=PROJECTION
            )
        )
        clip.vision_model.load_state_dict(vision.state_dict())
        clip.vision_model.requires_grad_(False)
        scale_and_bias = torch.nn.Parameter(torch.tensor([np.log(10.0), -5.0]))
        trained = torch.nn.ModuleList([clip.text_model, clip.text_projection, clip.visual_projection])
        trained.register_parameter("scale_and_bias", scale_and_bias)
        optimizer, schedule = adamw_warmup_cosine(trained, steps=STEPS, peak_lr=PEAK_LR, warmup_fraction=0.05)

        images, labels = load_items(assets, "train")
        rng = np.random.default_rng(SEED)
        questions, _ = question_targets(labels[:4][None])
        encoded = tokenizer(
            [instruction_text(processor, q) for q in questions], padding=True, return_tensors="pt"
        )
        layer = llava.config.vision_feature_layer
        losses = []
        for _ in tqdm(range(STEPS), desc="CLIP text tower", disable=not progress):
            items = rng.integers(0, len(labels), size=(BATCH_SIZE, 4))
            with torch.no_grad():
                hidden = vision(
                    pixel_values(torch.as_tensor(make_composites(images[items]))), output_hidden_states=True
                ).hidden_states[layer][:, 1:]
                patches = vision.post_layernorm(hidden)
            _, targets = question_targets(labels[items])  # [B, Q, 64]
            tokens = F.normalize(clip.visual_projection(patches), dim=-1)  # [B, 64, P]
            texts = F.normalize(
                clip.text_projection(clip.text_model(**encoded).pooler_output), dim=-1
            )  # [Q, P]
            logits = scale_and_bias[0].exp() * torch.einsum("btp,qp->bqt", tokens, texts) + scale_and_bias[1]
            loss = F.binary_cross_entropy_with_logits(logits, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        record = {
            "recipe": {
                "text_hidden": TEXT_HIDDEN,
                "text_layers": TEXT_LAYERS,
                "projection": PROJECTION,
                "steps": STEPS,
                "batch_size": BATCH_SIZE,
                "peak_lr": PEAK_LR,
                "seed": SEED,
            },
            "questions": questions,
            "final_loss": float(np.mean(losses[-20:])),
            "build_seconds": round(time.time() - started, 1),
        }
        with publish_when_done(out_dir) as tmp_dir:
            clip.save_pretrained(tmp_dir)
            tokenizer.save_pretrained(tmp_dir)
            (tmp_dir / "testbed.json").write_text(json.dumps(record, indent=2))
        return record
    finally:
        torch.set_num_threads(threads)


def summary(record: dict[str, Any]) -> str:
    return f"final loss {record['final_loss']:.4f}, built in {record['build_seconds']} s"


def main(argv: list[str] | None = None) -> int:
    testbed_cli(argv, __doc__, vlm_testbed_clip_dir, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
