"""Expert pruning and depth pruning in one recipe, both orders: the checkpoint reloads in fresh processes."""

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import save_tiny_model, write_calibration_file

import hf_prune

RELOAD = r"""
import json, sys, torch
folder, mode, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
trust = mode == "remote"  # "plain": stock class, no hf_prune; "hf_prune": registered by the import
if mode == "hf_prune":
    import hf_prune
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust).eval()
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].tolist()
generated = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0].tolist()
print(json.dumps({"logits": logits, "generated": generated, "model_type": model.config.model_type,
                  "hf_prune_imported": "hf_prune" in sys.modules}))
"""

EXPERTS = {"method": "expert_pruning", "algorithm": "router_weight", "uniform": False, "keep_ratio": 0.75}
DEPTH = {"method": "replaceme", "num_layers": 1}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("order", ["experts_then_depth", "depth_then_experts"])
def test_two_stage_recipe_reloads(family, order, tmp_path):
    source = save_tiny_model(family, tmp_path / "src")
    calibration = write_calibration_file(tmp_path / "calib.txt")
    stages = [EXPERTS, DEPTH] if order == "experts_then_depth" else [DEPTH, EXPERTS]
    result = hf_prune.prune(
        {
            "model": str(source),
            "output": str(tmp_path / "out"),
            "stages": stages,
            "calibration": {"data": str(calibration), "num_samples": 8, "seq_len": 32},
        },
        progress=False,
    )
    config = result.model.config
    assert config.num_hidden_layers == 3
    assert result.report["params_after"] < result.report["params_before"]
    ids = result.tokenizer("The for statement iterates over a sequence.")["input_ids"]
    with torch.no_grad():
        expected = result.model(torch.tensor([ids])).logits[0]
        expected_generation = result.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0]
    if order == "experts_then_depth":  # global ranking leaves different counts per layer on these models
        assert config.model_type == f"hf_prune_{family}" and len(config.experts_per_layer) == 3
    modes = ["hf_prune", "remote"] if config.model_type.startswith("hf_prune_") else ["plain"]
    for mode in modes:
        done = subprocess.run(
            [sys.executable, "-c", RELOAD, str(result.output), mode, json.dumps(ids)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        reloaded = json.loads(done.stdout.strip().splitlines()[-1])
        assert reloaded["model_type"] == config.model_type
        assert reloaded["hf_prune_imported"] == (mode == "hf_prune")
        torch.testing.assert_close(torch.tensor(reloaded["logits"]), expected, atol=1e-5, rtol=0)
        assert reloaded["generated"] == expected_generation.tolist()
