"""Token pruning stages on ``engine: sequential``: training-free token pruning (visual: every algorithm;
causal-LM prompts: attention, random) needs no calibration, so the engine copies the weights shard by
shard under the token-pruning class; the checkpoint equals the in-memory one (files, config, remote code)
and follows a depth stage in the same recipe. What needs the whole model is refused before loading."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tiny_models import save_tiny_model, write_calibration_file

from hf_prune import RecipeError, prune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VISUAL = {"method": "visual_token_pruning", "algorithm": "cdpruner", "keep_ratio": 0.25}
PROMPT = {"method": "text_token_pruning", "algorithm": "attention", "layer": 1, "keep_ratio": 0.5}


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return write_calibration_file(tmp_path_factory.mktemp("data") / "calib.txt")


def recipe(model, output, stages, engine, calibration=None):
    settings = {"model": str(model), "output": str(output), "engine": engine, "stages": stages}
    if calibration is not None:
        settings["calibration"] = {
            "data": str(calibration),
            "num_samples": 8,
            "seq_len": 32,
            "batch_size": 4,
            "packing": True,
        }
    return settings


def assert_same_checkpoint(a, b):
    config_a, config_b = (json.loads((f / "config.json").read_text()) for f in (a, b))
    config_a.pop("transformers_version", None)
    config_b.pop("transformers_version", None)
    assert config_a == config_b
    assert sorted(p.name for p in a.glob("*.py")) == sorted(p.name for p in b.glob("*.py"))
    for name in (p.name for p in a.glob("*.py")):
        assert (a / name).read_text() == (b / name).read_text()
    tensors_a, tensors_b = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)


@pytest.mark.parametrize(
    ("model_type", "stages", "with_calibration"),
    [
        ("llava", [VISUAL], False),
        ("llava_next", [{**VISUAL, "algorithm": "fastv", "fastv_layer": 1}], False),
        ("llama", [PROMPT], False),
        ("llama", [{"method": "replaceme", "num_layers": 1}, PROMPT], True),
    ],
    ids=["llava-cdpruner", "llava_next-fastv", "llama-prompt", "llama-replaceme-then-prompt"],
)
def test_sequential_token_pruning_equals_in_memory(
    model_type, stages, with_calibration, calibration, tmp_path
):
    source = save_tiny_model(model_type, tmp_path / "source")
    data = calibration if with_calibration else None
    memory = prune(recipe(source, tmp_path / "memory", stages, "in_memory", data), progress=False)
    sequential = prune(recipe(source, tmp_path / "seq", stages, "sequential", data), progress=False)
    assert sequential.report["engine"]["name"] == "sequential"
    assert sequential.report["stages"][-1]["token_pruning"] == memory.report["stages"][-1]["token_pruning"]
    assert json.loads((tmp_path / "seq/config.json").read_text())["model_type"].startswith("hf_prune_")
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "seq")


def test_sequential_prompt_pruning_generates_like_in_memory(tmp_path):
    source = save_tiny_model("llama", tmp_path / "source")
    prune(recipe(source, tmp_path / "seq", [PROMPT], "sequential"), progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "seq", trust_remote_code=True).eval()
    ids = torch.tensor([[1, 7, 9, 11, 13, 17, 19, 23]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
        )
    assert out.shape == (1, 12)
    assert model.config.token_pruning["keep_ratio"] == 0.5


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            {"method": "text_token_pruning", "algorithm": "adtp", "train_data": "x.txt"},
            r"stages\[0\].method: text_token_pruning \(algorithm adtp\) has no layer-by-layer variant",
        ),
        (
            {**VISUAL, "text_tower": "clip"},
            r"stages\[0\].method: visual_token_pruning \(algorithm cdpruner\) has no layer-by-layer variant",
        ),
    ],
    ids=["adtp-trains-a-retainer", "clip-text-tower"],
)
def test_token_stages_that_need_the_whole_model_are_refused(stage, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("hello world\n" * 50)
    (tmp_path / "clip").mkdir()
    model_type = "llama" if stage["method"] == "text_token_pruning" else "llava"
    source = save_tiny_model(model_type, tmp_path / "source")
    with pytest.raises(RecipeError, match=message):
        prune(recipe(source, tmp_path / "out", [stage], "sequential"), progress=False)
    assert not (tmp_path / "out").exists()
