"""Expert pruning by router statistics on ``engine: sequential``: the same experts, weights, config, class
and remote code as in memory on every MoE family, per-layer counts reloading in a fresh process without
hf_prune; a killed run resumes after its last spilled layer."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from engine_recipes import one_stage_recipe as recipe
from fresh_process import generate_after_reload, prune_killed
from safetensors.torch import load_file
from tiny_models import MOE_TYPES, save_tiny_model, write_calibration_file

from hf_prune import prune

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
