"""CARD-Deck: uniform logits are the log of the members' mean softmax, spectral gating picks the members
of the nearest domain, the reference spectra are the formula's, a saved deck reloads in a fresh process
without hf_prune with identical logits, and members that cannot form a deck are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from hf_prune.methods.robust.augmentations import augment
from hf_prune.methods.robust.deck import DeckError, build_card_deck, domain_spectra


def tiny_vit(seed: int, **overrides) -> transformers.ViTForImageClassification:
    settings = dict(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1)
    settings.update(num_attention_heads=2, intermediate_size=32, num_labels=4, **overrides)
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(transformers.ViTConfig(**settings)).eval()


def spectrum_by_hand(pixels: torch.Tensor) -> torch.Tensor:
    """mean over the batch of log(1 + |DFT|), with the DFT written out as matrix products."""
    n_h, n_w = pixels.shape[-2:]
    f_h = torch.exp(-2j * torch.pi * torch.outer(torch.arange(n_h), torch.arange(n_h)) / n_h)
    f_w = torch.exp(-2j * torch.pi * torch.outer(torch.arange(n_w), torch.arange(n_w)) / n_w)
    transform = f_h @ pixels.to(torch.complex64) @ f_w.T
    return torch.log(1 + transform.abs()).mean(dim=0)


def smooth_images(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, 8)
    scale = torch.rand(n, 1, 1, 1, generator=generator)
    return (scale * ramp.view(1, 1, 1, 8) * ramp.view(1, 1, 8, 1)).float()


def noisy_images(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=generator)


def test_uniform_logits_are_the_log_of_the_mean_softmax():
    members = [tiny_vit(seed) for seed in range(3)]
    deck = build_card_deck(members, ["augmix", "gaussian", "augmix"], gating="uniform")
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        logits = deck(pixel_values=x).logits
        outputs = [m(pixel_values=x).logits for m in members]
    by_hand = torch.zeros(5, 4)
    for z in outputs:
        by_hand += torch.exp(z) / torch.exp(z).sum(dim=1, keepdim=True) / 3
    torch.testing.assert_close(logits, torch.log(by_hand))
    assert deck.last_domain is None


def test_spectral_gating_uses_the_members_of_the_nearest_domain():
    members = [tiny_vit(seed) for seed in range(3)]
    spectra = {
        "none": spectrum_by_hand(smooth_images(64, 0)),
        "gaussian": spectrum_by_hand(noisy_images(64, 1)),
    }
    deck = build_card_deck(members, ["gaussian", "none", "gaussian"], gating="spectral", spectra=spectra)
    with torch.no_grad():
        noisy, smooth = noisy_images(6, 7), smooth_images(6, 8)
        z = [m(pixel_values=noisy).logits.softmax(-1) for m in members]
        torch.testing.assert_close(deck(pixel_values=noisy).logits, ((z[0] + z[2]) / 2).log())
        assert deck.last_domain == "gaussian"
        alone = members[1](pixel_values=smooth).logits.log_softmax(-1)
        torch.testing.assert_close(deck(pixel_values=smooth).logits, alone)
        assert deck.last_domain == "none"


def test_reference_spectra_follow_the_formula():
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    spectra = domain_spectra(images, ["none", "gaussian"], lambda x: (x - 0.5) / 0.25, seed=3, batch_size=16)
    torch.testing.assert_close(
        spectra[0], spectrum_by_hand((images.float() / 255 - 0.5) / 0.25), atol=1e-4, rtol=1e-4
    )
    # the gaussian domain: the same images, noised by the seeded family (seed + 1), then normalised
    generator = torch.Generator().manual_seed(4)
    noised = torch.cat(
        [augment(images[i : i + 16].float() / 255, "gaussian", generator) for i in (0, 16, 32)]
    )
    torch.testing.assert_close(spectra[1], spectrum_by_hand((noised - 0.5) / 0.25), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(spectra[0], spectra[1])


RELOAD = r"""
import json, sys, torch
sys.modules["hf_prune"] = None  # hf_prune must not be importable here
from transformers import AutoModelForImageClassification
deck = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
x = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = deck(pixel_values=x).logits
print(json.dumps({"logits": logits.tolist(), "class": type(deck).__name__, "domain": deck.last_domain}))
"""


@pytest.mark.parametrize("gating", ["uniform", "spectral"])
def test_a_saved_deck_reloads_without_hf_prune_with_identical_logits(tmp_path, gating):
    members = [tiny_vit(seed) for seed in range(2)]
    spectra = {
        "none": spectrum_by_hand(smooth_images(16, 0)),
        "gaussian": spectrum_by_hand(noisy_images(16, 1)),
    }
    deck = build_card_deck(members, ["none", "gaussian"], gating=gating, spectra=spectra)
    deck.save_pretrained(tmp_path / "deck")
    assert sorted(p.name for p in (tmp_path / "deck").glob("*.py")) == ["card_deck.py", "patch_classes.py"]
    x = noisy_images(3, 5)
    with torch.no_grad():
        expected = deck(pixel_values=x).logits
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "deck"), json.dumps(x.tolist())],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["class"] == "CardDeckForImageClassification"
    assert torch.equal(torch.tensor(result["logits"]), expected)
    assert result["domain"] == (None if gating == "uniform" else "gaussian")


def test_members_of_different_architectures_are_refused():
    with pytest.raises(DeckError, match="member 1 differs from member 0 in 'hidden_size'"):
        build_card_deck([tiny_vit(0), tiny_vit(1, hidden_size=8)], ["none", "none"])
    resnet = transformers.ResNetForImageClassification(
        transformers.ResNetConfig(
            num_channels=1, embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=4
        )
    )
    with pytest.raises(DeckError, match="member 1 is a ResNetForImageClassification"):
        build_card_deck([tiny_vit(0), resnet], ["none", "none"])


def test_an_empty_deck_and_missing_spectra_are_refused():
    with pytest.raises(DeckError, match="at least 1 member"):
        build_card_deck([], [])
    with pytest.raises(DeckError, match="missing \\['gaussian'\\]"):
        build_card_deck(
            [tiny_vit(0), tiny_vit(1)],
            ["none", "gaussian"],
            gating="spectral",
            spectra={"none": torch.zeros(1, 8, 8)},
        )
    with pytest.raises(DeckError, match="2 domains for 1 members"):
        build_card_deck([tiny_vit(0)], ["none", "gaussian"])


def test_the_image_classification_pipeline_reports_the_ensemble_probabilities(tmp_path):
    """A colour deck saved with an image processor: ``pipeline`` scores are the members' mean softmax."""
    import numpy as np
    from PIL import Image

    labels = {"id2label": {0: "a", 1: "b", 2: "c", 3: "d"}, "label2id": {"a": 0, "b": 1, "c": 2, "d": 3}}
    members = [tiny_vit(seed, num_channels=3, **labels) for seed in range(2)]
    build_card_deck(members, ["none", "gaussian"]).save_pretrained(tmp_path / "deck")
    processor = transformers.ViTImageProcessor(
        do_resize=False, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]
    )
    processor.save_pretrained(tmp_path / "deck")
    pipe = transformers.pipeline("image-classification", model=str(tmp_path / "deck"), trust_remote_code=True)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    scores = {entry["label"]: entry["score"] for entry in pipe(Image.fromarray(pixels, mode="RGB"))}
    x = (torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None] / 255 - 0.5) / 0.25
    with torch.no_grad():
        mean = sum(m(pixel_values=x).logits.softmax(-1) for m in members) / 2
    assert scores == pytest.approx(
        {name: float(mean[0, i]) for i, name in labels["id2label"].items()}, abs=1e-5
    )
