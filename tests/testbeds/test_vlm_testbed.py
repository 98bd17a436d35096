"""Fast checks of the VLM testbed recipe: tiny builds (2 steps per stage, 12 held-out composites) into tmp_path."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import shared_asset
from hf_prune.evals.testbeds import vlm_testbed
from hf_prune.evals.testbeds.fashion_mnist import read_fashion_mnist
from hf_prune.evals.vqa import build_prompt
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TINY_STEPS = 2
TINY_COMPOSITES = 12  # a multiple of 4 cells and of 2 x 3 presence classes: every count stays balanced


def _assets():
    shared_asset(vlm_testbed.FASHION_MNIST_SUBDIR)  # skips (or fails) without the shared assets
    return shared_asset(".")


def _tiny_build(out_dir, seed=0):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vlm_testbed, "EVAL_COMPOSITES", TINY_COMPOSITES)
        return vlm_testbed.build_vlm_testbed(
            out_dir, assets=_assets(), seed=seed, progress=False, _steps=TINY_STEPS
        )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _tiny_build(tmp_path_factory.mktemp("vlm") / "testbed")


@pytest.fixture(scope="module")
def test_split():
    return read_fashion_mnist(_assets() / vlm_testbed.FASHION_MNIST_SUBDIR, "test")


def _rows(folder):
    return [json.loads(line) for line in (folder / "data" / "eval.jsonl").read_text().splitlines()]


def _cell(composite, cell):
    _, row, col = vlm_testbed.CELLS[cell]
    size = vlm_testbed.ITEM_SIZE
    return composite[..., row * size : (row + 1) * size, col * size : (col + 1) * size]


def test_composites_put_each_item_in_its_cell():
    items = np.random.default_rng(0).integers(0, 256, size=(3, 4, 28, 28), dtype=np.uint8)
    composites = vlm_testbed.make_composites(items)
    assert composites.shape == (3, 56, 56)
    for cell in range(4):
        assert np.array_equal(_cell(composites, cell), items[:, cell])
    assert np.array_equal(vlm_testbed.make_composites(torch.from_numpy(items)).numpy(), composites)
    # The image tokens of a cell are the 4 x 4 patches over it.
    cells = vlm_testbed.token_cells().view(8, 8)
    assert [int(cells[y, x]) for y, x in ((0, 0), (0, 7), (7, 0), (7, 7), (3, 4), (4, 3))] == [
        0,
        1,
        2,
        3,
        1,
        2,
    ]
    assert Counter(cells.flatten().tolist()) == {0: 16, 1: 16, 2: 16, 3: 16}


def test_require_presence():
    labels = np.array([0, 1, 8, 8, 5, 2])
    draws = []

    def draw(label, same):
        draws.append((label, same))
        return 2 if same else 5

    assert vlm_testbed.require_presence([0, 1, 4, 5], labels, 8, True, 1, draw) == [
        0,
        2,
        4,
        5,
    ]  # a bag put in cell 1
    assert vlm_testbed.require_presence([0, 2, 4, 5], labels, 8, True, 3, draw) == [
        0,
        2,
        4,
        5,
    ]  # one is there already
    assert vlm_testbed.require_presence([2, 1, 3, 0], labels, 8, False, 0, draw) == [
        5,
        1,
        5,
        0,
    ]  # every bag replaced
    assert draws == [(8, True), (8, False), (8, False)]


def test_held_out_questions_are_balanced_and_correct(test_split):
    images, labels = test_split
    composites, rows = vlm_testbed.eval_rows(labels)
    n = vlm_testbed.EVAL_COMPOSITES
    assert (
        composites.shape == (n, 4) and len(set(composites.flatten().tolist())) == 4 * n
    )  # distinct test items
    assert Counter(row["kind"] for row in rows) == {"position": n, "presence": n}
    position = [row for row in rows if row["kind"] == "position"]
    presence = [row for row in rows if row["kind"] == "presence"]
    assert set(Counter(row["question"] for row in position).values()) == {n // 4}
    per_class = Counter((row["question"], row["answer"]) for row in presence)
    asked = {row["question"] for row in presence}
    assert len(asked) == len(vlm_testbed.PRESENCE_CLASSES)
    assert all(
        per_class[question, "yes"] == per_class[question, "no"] for question in asked
    )  # balanced per class
    assert max(per_class.values()) - min(per_class.values()) <= 1  # and classes asked in turn
    for row in position:
        cell = [name for name, _, _ in vlm_testbed.CELLS].index(row["question"].split("the ")[1].rstrip("?"))
        assert row["answer"] == vlm_testbed.SHORT_NAMES[labels[composites[row["composite"]][cell]]]
    for row in presence:
        present = {vlm_testbed.SHORT_NAMES[label] for label in labels[composites[row["composite"]]]}
        assert row["answer"] == ("yes" if row["question"][len("Is there a ") : -1] in present else "no")


def test_training_batches_are_balanced():
    labels = np.random.default_rng(0).integers(0, 10, size=500)
    images = torch.zeros((500, 28, 28), dtype=torch.uint8)
    pools = {
        (label, same): torch.from_numpy(np.flatnonzero((labels == label) == same))
        for label in vlm_testbed.PRESENCE_CLASSES
        for same in (True, False)
    }
    composites, qa = vlm_testbed._sample_batch(images, labels, pools, torch.Generator().manual_seed(0))
    assert composites.shape == (vlm_testbed.BATCH_SIZE, 56, 56)
    kinds = Counter(kind for kind, _, _ in qa)
    presence = vlm_testbed.BATCH_SIZE // vlm_testbed.PRESENCE_EVERY
    assert kinds == {"position": vlm_testbed.BATCH_SIZE - presence, "presence": presence}
    assert Counter(answer for kind, _, answer in qa if kind == "presence") == {
        "yes": kinds["presence"] // 2,
        "no": kinds["presence"] // 2,
    }


def test_collate_left_pads_and_labels_only_the_answer():
    processor = vlm_testbed.build_processor()
    tokenizer = processor.tokenizer
    question_ids = {"q1": [1, 10, 11], "q2": [1, 10, 11, 12, 13]}
    batch = vlm_testbed._collate([("q1", "bag"), ("q2", "no")], question_ids, tokenizer)
    bag, no = (vlm_testbed.answer_ids(tokenizer, word) for word in ("bag", "no"))
    assert len(bag) == len(no) == 2 and bag[-1] == no[-1] == tokenizer.eos_token_id  # one word token + EOS
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[pad, pad, 1, 10, 11, *bag], [1, 10, 11, 12, 13, *no]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert batch["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3, 4], list(range(7))]
    assert batch["labels"].tolist() == [[-100] * 5 + bag, [-100] * 5 + no]


def test_tiny_build_folder(tiny_dir, test_split):
    for name in (
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "testbed.json",
        "data/eval.jsonl",
    ):
        assert (tiny_dir / name).is_file(), name
    assert not list(tiny_dir.parent.glob(".testbed.tmp-*"))  # published atomically, nothing left behind
    images, labels = test_split
    rows = _rows(tiny_dir)
    assert len(rows) == 2 * TINY_COMPOSITES
    for row in rows:
        assert set(row) == {"image", "question", "answers", "kind", "items", "labels"}
        assert not row["image"].startswith("/") and len(set(row["answers"])) == 1
        assert row["labels"] == labels[row["items"]].tolist()
        with Image.open(tiny_dir / "data" / row["image"]) as image:
            assert image.mode == "RGB" and image.size == (56, 56)
            pixels = np.asarray(image)
        assert (pixels == pixels[..., :1]).all()  # grayscale saved as RGB
        for cell, item in enumerate(row["items"]):
            assert np.array_equal(_cell(pixels[..., 0], cell), images[item])

    record = json.loads((tiny_dir / "testbed.json").read_text())
    assert record["version"] == vlm_testbed.VLM_TESTBED_VERSION
    assert (record["vision_steps"], record["steps"]) == (TINY_STEPS, TINY_STEPS)
    assert record["seconds"] > 0 and set(record["seconds_by_stage"]) == {
        "data",
        "vision_pretraining",
        "instruction_tuning",
        "evaluation",
    }
    accuracy = record["held_out_accuracy"]
    assert set(accuracy) == {"overall", "position", "presence"}
    assert accuracy["overall"]["num_examples"] == 2 * TINY_COMPOSITES
    assert accuracy["position"]["num_examples"] == accuracy["presence"]["num_examples"] == TINY_COMPOSITES
    assert all(0 <= result["vqa_accuracy"] <= 1 for result in accuracy.values())
    assert set(record["final_losses"]["answer_loss_by_kind"]) == set(vlm_testbed.KINDS)
    assert "testbed" in vlm_testbed.summary(record)


def test_tiny_build_reloads_as_a_stock_llava(tiny_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert (
        type(model).__name__ == "LlavaForConditionalGeneration"
        and type(processor).__name__ == "LlavaProcessor"
    )
    config = model.config
    assert config.vision_feature_select_strategy == "default" and config.image_seq_length == 64
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (56, 56 // 8)
    assert processor.chat_template is None  # evaluate_vqa uses the fallback prompt the model was trained on

    tokenizer = processor.tokenizer
    assert tokenizer.tokenize("USER: <image>\nIs there a bag?").count("<image>") == 1  # not split
    row = _rows(tiny_dir)[0]
    with Image.open(tiny_dir / "data" / row["image"]) as image:
        image = image.convert("RGB")
    inputs = processor(images=image, text=build_prompt(processor, row["question"]), return_tensors="pt")
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == vlm_testbed.IMAGE_TOKENS == 64
    assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id
    # Training feeds pixels without the processor: they must be exactly what it gives.
    gray = torch.from_numpy(np.asarray(image)[..., 0].copy())[None]
    assert torch.allclose(inputs["pixel_values"], vlm_testbed.pixel_values(gray), atol=1e-6)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_same_seed_same_weights(tiny_dir, tmp_path):
    again = load_file(_tiny_build(tmp_path / "again") / "model.safetensors")
    first = load_file(tiny_dir / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(torch.equal(again[name], first[name]) for name in first)
    other = load_file(_tiny_build(tmp_path / "other", seed=1) / "model.safetensors")
    assert any(not torch.equal(other[name], first[name]) for name in first)


def test_missing_assets_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST"):
        vlm_testbed.load_items(tmp_path, "train")


def test_testbed_dir_builds_only_when_missing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(vlm_testbed, "build_vlm_testbed", lambda out, **kw: calls.append((out, kw)) or out)
    target = tmp_path / vlm_testbed.VLM_TESTBED_VERSION
    assert vlm_testbed.vlm_testbed_dir(tmp_path, assets="somewhere", progress=False) == target
    assert calls == [(target, {"assets": "somewhere", "progress": False})]
    target.mkdir()
    assert vlm_testbed.vlm_testbed_dir(tmp_path) == target and len(calls) == 1
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path / "cache"))
    vlm_testbed.vlm_testbed_dir()
    assert calls[-1] == (
        tmp_path / "cache" / vlm_testbed.VLM_TESTBED_VERSION,
        {"assets": vlm_testbed.default_assets_dir(), "progress": True},
    )


# ---- the CLIP text tower trained for the testbed (evals/testbeds/vlm_testbed_clip.py) ----


def test_clip_targets_mark_the_tokens_each_question_is_about():
    from hf_prune.evals.testbeds import vlm_testbed_clip

    labels = np.array([[8, 1, 8, 0], [2, 3, 4, 5]])
    questions, targets = vlm_testbed_clip.question_targets(labels)
    assert targets.shape == (2, len(questions), 64)
    cells = vlm_testbed.token_cells()
    top_right = questions.index("What is in the top-right?")
    assert torch.equal(targets[0, top_right], (cells == 1).float())
    bag = questions.index("Is there a bag?")
    assert torch.equal(targets[0, bag], ((cells == 0) | (cells == 2)).float())
    assert targets[1, bag].sum() == 0  # no bag: the question is about no token


def test_testbed_clip_builds_and_drives_cdpruner(tiny_dir, tmp_path):
    from hf_prune.evals.testbeds import vlm_testbed_clip

    import hf_prune

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vlm_testbed_clip, "STEPS", TINY_STEPS)
        vlm_testbed_clip.build_testbed_clip(tmp_path / "clip", tiny_dir, assets=_assets(), progress=False)
    result = hf_prune.prune(
        {
            "model": str(tiny_dir),
            "output": str(tmp_path / "pruned"),
            "stages": [{"method": "visual_token_pruning", "budget": 8, "text_tower": str(tmp_path / "clip")}],
        },
        progress=False,
    )
    report = result.report["stages"][0]
    assert report["relevance"] == "clip_text_tower" and report["text_tower_matches_vision_tower"] is True
    # The text tower was trained on the very string the pruned model decodes from a prompt.
    processor = AutoProcessor.from_pretrained(tiny_dir)
    question = "Is there a bag?"
    inputs = processor(
        images=[Image.new("RGB", (56, 56))], text=[build_prompt(processor, question)], return_tensors="pt"
    )
    model = result.model
    image_mask = inputs["input_ids"] == model.config.image_token_id
    runs = [(0, torch.nonzero(image_mask[0]).squeeze(1))]
    ids = model._instruction_ids(inputs["input_ids"], inputs["attention_mask"], image_mask, runs, None)[0]
    decoded = model.relevance_tokenizers["language"].decode(ids.tolist(), skip_special_tokens=True)
    assert decoded == vlm_testbed_clip.instruction_text(processor, question)
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1] - 64 + 8
