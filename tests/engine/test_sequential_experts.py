"""Expert pruning by router statistics on ``engine: sequential``: the same experts, weights, config, class
and remote code as in memory on every MoE family, per-layer counts reloading in a fresh process without
hf_prune; a killed run resumes after its last spilled layer."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from engine_recipes import one_stage_recipe as recipe
from fresh_process import generate_after_reload, prune_killed
from safetensors.torch import load_file
from tiny_models import MOE_TYPES, save_tiny_model, write_calibration_file

from hf_prune import prune
from hf_prune.engine.activation_store import ActivationStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return write_calibration_file(tmp_path_factory.mktemp("data") / "calib.txt")


NONUNIFORM = {"method": "expert_pruning", "algorithm": "frequency", "keep_ratio": 0.625, "uniform": False}
UNIFORM = {"method": "expert_pruning", "algorithm": "router_weight", "keep_experts": 2, "uniform": True}


def comparable_config(folder):
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    return config


@pytest.mark.parametrize("model_type", MOE_TYPES)
@pytest.mark.parametrize(
    "stage", [NONUNIFORM, UNIFORM], ids=["frequency-nonuniform", "router-weight-uniform"]
)
def test_sequential_expert_pruning_equals_in_memory(model_type, stage, calibration, tmp_path):
    source = save_tiny_model(model_type, tmp_path / "source")
    memory = prune(recipe(source, tmp_path / "memory", calibration, stage, "in_memory"), progress=False)
    sequential = prune(
        recipe(source, tmp_path / "seq", calibration, stage, "sequential", activation_memory_gb=0),
        progress=False,
    )
    one, two = memory.report["stages"][0], sequential.report["stages"][0]
    assert [layer["kept"] for layer in two["layers"]] == [layer["kept"] for layer in one["layers"]]
    assert [layer["scores"] for layer in two["layers"]] == [layer["scores"] for layer in one["layers"]]
    assert two["removal"]["experts_per_layer"] == one["removal"]["experts_per_layer"]
    assert two["calibration_tokens"] == one["calibration_tokens"]
    assert (two["top_k"], two["uniform"], two["algorithm"]) == (
        one["top_k"],
        one["uniform"],
        one["algorithm"],
    )
    assert comparable_config(tmp_path / "seq") == comparable_config(tmp_path / "memory")
    code = sorted(p.name for p in (tmp_path / "memory").glob("*.py"))
    assert sorted(p.name for p in (tmp_path / "seq").glob("*.py")) == code
    assert bool(code) == (not two["removal"]["uniform"])  # per-layer counts travel with their remote code
    # The same files: tensor names and layout as save_pretrained writes them (per-expert keys included).
    a, b = (
        load_file(str(tmp_path / "memory/model.safetensors")),
        load_file(str(tmp_path / "seq/model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a fresh process
def test_per_layer_counts_reload_in_a_fresh_process(calibration, tmp_path):
    source = save_tiny_model("mixtral", tmp_path / "source")
    prune(recipe(source, tmp_path / "seq", calibration, NONUNIFORM, "sequential"), progress=False)
    assert len(set(json.loads((tmp_path / "seq/config.json").read_text())["experts_per_layer"])) > 1
    ids = {"input_ids": torch.tensor([[1, 7, 9, 11]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    reloaded = generate_after_reload(tmp_path / "seq", ids, cwd=tmp_path)
    assert (
        reloaded["remote"]["hf_prune"] is False
        and reloaded["remote"]["tokens"] == reloaded["hf_prune"]["tokens"]
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "seq").eval()
    with torch.no_grad():
        expected = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert reloaded["remote"]["tokens"] == expected.tolist()


@pytest.mark.slow  # a fresh process
def test_killed_expert_run_resumes_after_its_last_layer(calibration, tmp_path):
    source = save_tiny_model("qwen2_moe", tmp_path / "source")  # layers 1 and 3 are MoE
    reference = prune(
        recipe(source, tmp_path / "reference", calibration, NONUNIFORM, "sequential"), progress=False
    )
    settings = recipe(source, tmp_path / "out", calibration, NONUNIFORM, "sequential", activation_memory_gb=0)
    # puts: h0, r1, h1, h2, then die: layers 0-2 are on disk with layer 1's router counts
    killed = prune_killed(settings, 4)
    assert killed.returncode == 137, killed.stderr.decode()[-2000:]
    restarted = prune(settings, progress=False)
    stage = restarted.report["stages"][0]
    assert stage["activations"]["reused_after_restart"] == ["layers 0-2"]
    assert stage["layers"] == reference.report["stages"][0]["layers"]
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "reference").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_padded_batches_count_only_real_tokens_like_in_memory(calibration, tmp_path):
    # unpacked sequences of different lengths: each batch's own pad mask must reach its router counts
    source = save_tiny_model("mixtral", tmp_path / "source")

    def unpacked(output, engine):
        settings = recipe(source, tmp_path / output, calibration, NONUNIFORM, engine, activation_memory_gb=0)
        settings["calibration"].update(packing=False, num_samples=12)  # 3 batches of 4
        return settings

    memory = prune(unpacked("memory", "in_memory"), progress=False)
    sequential = prune(unpacked("seq", "sequential"), progress=False)
    one, two = memory.report["stages"][0], sequential.report["stages"][0]
    assert two["calibration_tokens"] == one["calibration_tokens"] < 12 * 32  # padding was left out
    assert [layer["scores"] for layer in two["layers"]] == [layer["scores"] for layer in one["layers"]]


@pytest.mark.parametrize("budget", [0, None], ids=["spilled", "in-memory"])
def test_interrupted_expert_run_resumes_after_its_last_spilled_layer(
    budget, calibration, tmp_path, monkeypatch, capsys
):
    # in process: an error right after layer 2's output was cached; spilled layers are reused on restart
    source = save_tiny_model("qwen2_moe", tmp_path / "source")  # layers 1 and 3 are MoE
    reference = prune(
        recipe(source, tmp_path / "reference", calibration, NONUNIFORM, "sequential"), progress=False
    )
    extra = {"activation_memory_gb": budget} if budget is not None else {}
    settings = recipe(source, tmp_path / "out", calibration, NONUNIFORM, "sequential", **extra)
    original_put = ActivationStore.put

    def put_then_fail(self, key, tensors, **options):
        original_put(self, key, tensors, **options)
        if key == "h2":
            raise KeyboardInterrupt

    monkeypatch.setattr(ActivationStore, "put", put_then_fail)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        prune(settings, progress=False)
    assert "layers" not in capsys.readouterr().err  # no bar unless asked
    monkeypatch.undo()
    restarted = prune(settings, progress=True)
    err = capsys.readouterr().err
    stage = restarted.report["stages"][0]
    if budget == 0:  # layers 0-2 on disk: only layer 3 runs again
        assert stage["activations"]["reused_after_restart"] == ["layers 0-2"]
        assert re.search(r"\rlayers: +0%\|.*\| 0/1 ", err), err
    else:  # nothing was spilled: all four layers again
        assert stage["activations"]["reused_after_restart"] == []
        assert re.search(r"\rlayers: +0%\|.*\| 0/4 ", err), err
    assert stage["layers"] == reference.report["stages"][0]["layers"]
    assert stage["calibration_tokens"] == reference.report["stages"][0]["calibration_tokens"]
