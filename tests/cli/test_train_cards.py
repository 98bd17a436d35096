"""``hf-prune train`` on image classifiers: a ``cards`` recipe saves a CARD-Deck (loading through
``AutoModelForImageClassification`` with remote code) and each CARD as a stock checkpoint; gmp trains an
image classifier on an image folder; recipes that mix image and text models fail before loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tiny_models import save_tiny_model

from hf_prune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A class-per-folder set of 8×8 grey PNGs: class "dark" near 40, class "light" near 200."""
    root = tmp_path_factory.mktemp("images") / "set"
    generator = np.random.default_rng(0)
    for label, level in (("dark", 40), ("light", 200)):
        (root / label).mkdir(parents=True)
        for i in range(24):
            pixels = np.clip(level + generator.normal(0, 20, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / label / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
    config = transformers.ResNetConfig(
        num_channels=1,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=2,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "resnet"
    transformers.ResNetForImageClassification(config).save_pretrained(folder)
    return folder


def write_recipe(path, model, output, data, stage, evaluate=(), **train):
    arguments = {"max_steps": 4, "learning_rate": 5e-3, "per_device_train_batch_size": 16, "seed": 0}
    recipe = {
        "model": str(model),
        "output": str(output),
        "train": {"data": str(data), "arguments": arguments, **train},
        "stages": [stage],
        "evaluate": list(evaluate),
    }
    path.write_text(json.dumps(recipe))
    return str(path)


def test_cards_saves_a_deck_and_every_card(tiny_resnet, image_folder, tmp_path, capsys):
    out = tmp_path / "deck"
    stage = {"method": "cards", "members": 3, "final_sparsity": 0.36, "gating": "uniform"}
    robustness = {"task": "corruption_robustness", "data": str(image_folder), "corruptions": ["contrast"]}
    recipe = write_recipe(tmp_path / "r.json", tiny_resnet, out, image_folder, stage, evaluate=[robustness])
    assert main(["train", recipe, "--quiet"]) == 0
    assert "stage cards: sparsity 36.0%" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hf_prune_card_deck" and config["member_domains"] == [
        "augmix",
        "gaussian",
        "augmix",
    ]
    members = sorted((out / "cards").iterdir())
    assert [m.name for m in members] == ["member-0-augmix", "member-1-gaussian", "member-2-augmix"]
    x = torch.rand(5, 1, 8, 8)
    probabilities = []
    for folder in members:  # stock checkpoints: no remote code
        member = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
        weights = [m.weight for m in member.modules() if isinstance(m, torch.nn.Conv2d)]
        zeros = sum(int((w == 0).sum()) for w in weights)
        assert zeros > 0.2 * sum(w.numel() for w in weights)  # the convolutions are sparse (head dense)
        with torch.no_grad():
            probabilities.append(member(pixel_values=x).logits.softmax(-1))
    deck = transformers.AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(deck(pixel_values=x).logits, (sum(probabilities) / 3).log())
    report = json.loads((out / "hf_prune.json").read_text())
    stage = report["stages"][0]
    assert stage["method"] == "cards" and stage["rounds"] == 2 and len(stage["members"]) == 3
    assert report["params_after"] == 3 * report["params_before"]
    assert "a CARD-Deck of 3 lottery tickets (LRR" in (out / "README.md").read_text()
    # The deck's robustness in the report is what hf-prune eval measures on the saved folder
    entry = report["evaluation"][0]
    assert entry["task"] == "corruption_robustness" and set(entry["pruned"]["per_corruption"]) == {"contrast"}
    command = f"eval {out} --task corruption_robustness --data {image_folder} --corruptions contrast --quiet"
    assert main([*command.split(), "--output", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["mean_corrupted_accuracy"] == entry["pruned"]["mean_corrupted_accuracy"]


def test_gmp_trains_an_image_classifier_from_an_image_folder(tiny_resnet, image_folder, tmp_path):
    out = tmp_path / "sparse"
    stage = {"method": "gmp", "final_sparsity": 0.5, "end_step": 2, "frequency": 1}
    assert (
        main(["train", write_recipe(tmp_path / "r.json", tiny_resnet, out, image_folder, stage), "--quiet"])
        == 0
    )
    model = transformers.AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "ResNetForImageClassification"
    report = json.loads((out / "hf_prune.json").read_text())
    assert report["stages"][0]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_cards_on_a_causal_lm_is_refused_before_loading(tmp_path, image_folder, capsys):
    llama = save_tiny_model("llama", tmp_path / "llama")
    recipe = write_recipe(tmp_path / "r.json", llama, tmp_path / "o", image_folder, {"method": "cards"})
    assert main(["train", recipe]) == 2
    assert "cards trains image classifiers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_text_task_on_an_image_classifier_is_refused(tiny_resnet, image_folder, tmp_path, capsys):
    stage = {"method": "gmp", "final_sparsity": 0.5, "end_step": 2}
    recipe = write_recipe(
        tmp_path / "r.json", tiny_resnet, tmp_path / "o", image_folder, stage, task="causal_lm"
    )
    assert main(["train", recipe]) == 2
    assert "train.task: causal_lm needs a causal LM" in capsys.readouterr().err


def test_a_folder_without_images_is_named(tiny_resnet, tmp_path, capsys):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    stage = {"method": "cards", "members": 1, "final_sparsity": 0.2}
    recipe = write_recipe(tmp_path / "r.json", tiny_resnet, tmp_path / "o", tmp_path / "empty", stage)
    assert main(["train", recipe]) == 2
    assert "class folder(s) with no images: a" in capsys.readouterr().err
