"""ReplaceMe on the real trained stories260K (5-layer Llama): quality, CLI, reload in a fresh process."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import shared_asset
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_prune
from hf_prune.calibration import self_generated_texts

STORIES = "models/stories260K"
SAMPLE = "text/tinystories/sample.txt"


@pytest.fixture(scope="module")
def generated_calibration(tmp_path_factory):
    """Text stories260K generates itself from BOS with a fixed seed (data-free calibration)."""
    model_dir = shared_asset(STORIES)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = self_generated_texts(model, tokenizer, num_samples=32, max_new_tokens=128, seed=0)
    path = tmp_path_factory.mktemp("calib") / "generated.jsonl"
    with path.open("w") as f:
        for text in texts:
            f.write(json.dumps({"story": text}) + "\n")
    return path


def recipe(method, stage_fields, calibration, output=None):
    return {
        "model": str(shared_asset(STORIES)),
        "output": output,
        "calibration": {"data": str(calibration), "text_field": "story", "num_samples": 32, "seq_len": 128},
        "stages": [{"method": method, **stage_fields}],
        "evaluate": [{"task": "perplexity", "data": str(shared_asset(SAMPLE)), "seq_len": 512}],
    }


@pytest.mark.parametrize("layer", [1, 2, 3, 4])
def test_lstsq_beats_layer_drop_of_the_same_layer(layer, generated_calibration):
    model = AutoModelForCausalLM.from_pretrained(shared_asset(STORIES))
    tokenizer = AutoTokenizer.from_pretrained(shared_asset(STORIES))
    results = {}
    for method in ("replaceme", "layer_drop"):
        r = recipe(method, {"layers": [layer, layer]}, generated_calibration)
        del r["model"], r["output"]
        results[method] = hf_prune.prune(model, r, tokenizer=tokenizer, progress=False).report
    replaceme, drop = (
        results[m]["evaluation"][0]["pruned"]["perplexity"] for m in ("replaceme", "layer_drop")
    )
    original = results["replaceme"]["evaluation"][0]["original"]["perplexity"]
    assert results["replaceme"]["stages"][0]["removed_layers"] == [layer]
    assert original < replaceme < drop, (original, replaceme, drop)
    assert model.config.num_hidden_layers == 5  # the source model is never modified


@pytest.mark.slow
def test_recipe_file_cli_prune_eval_and_fresh_reload(generated_calibration, tmp_path):
    out = tmp_path / "stories-4layers"
    recipe_path = tmp_path / "recipe.json"
    recipe_path.write_text(
        json.dumps(recipe("replaceme", {"num_layers": 1}, generated_calibration, str(out)))
    )
    cli = [sys.executable, "-m", "hf_prune.cli"]
    done = subprocess.run([*cli, "prune", str(recipe_path), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "retained" in done.stdout

    report = json.loads((out / "hf_prune.json").read_text())
    stage = report["stages"][0]
    assert {"recipe", "versions", "params_before", "params_after", "stages"} <= set(report)
    assert (
        stage["method"] == "replaceme" and stage["estimator"] == "lstsq" and len(stage["removed_layers"]) == 1
    )
    assert stage["cuts"][0]["angular_distance"][0] == min(stage["candidate_distances"])
    assert report["params_after"] < report["params_before"] and report["versions"]["transformers"].startswith(
        "5."
    )
    evaluation = report["evaluation"][0]
    assert evaluation["retained"] == pytest.approx(
        evaluation["original"]["perplexity"] / evaluation["pruned"]["perplexity"]
    )
    assert "model-index" in (out / "README.md").read_text()

    # hf-prune eval computes the same figure from the saved checkpoint.
    results_file = tmp_path / "results.json"
    done = subprocess.run(
        [
            *cli,
            "eval",
            str(out),
            "--task",
            "perplexity",
            "--data",
            str(shared_asset(SAMPLE)),
            "--seq-len",
            "512",
            "--output",
            str(results_file),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(results_file.read_text())["perplexity"] == pytest.approx(
        evaluation["pruned"]["perplexity"], rel=1e-5
    )

    # A fresh process with plain transformers (hf_prune never imported) gives the same logits.
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        "ids = torch.tensor([[1, 403, 407, 261, 378, 300, 290]])\n"
        "with torch.no_grad(): logits = m(ids).logits\n"
        "gen = m.generate(ids, max_new_tokens=20, do_sample=False)\n"
        "print(json.dumps({'logits': logits.tolist(), 'gen': gen.tolist(), 'leak': 'hf_prune' in sys.modules,"
        " 'layers': m.config.num_hidden_layers}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout.splitlines()[-1])
    assert fresh["leak"] is False and fresh["layers"] == 4
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 403, 407, 261, 378, 300, 290]])
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(fresh["logits"]), pruned(ids).logits, rtol=0, atol=1e-5)
        # generate with the KV cache matches a step-by-step greedy decode without cache
        seq = ids
        for _ in range(20):
            next_id = pruned(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_id], dim=1)
    assert fresh["gen"] == seq.tolist()


def test_cosine_estimator_runs_and_reports(generated_calibration, tmp_path):
    r = recipe(
        "replaceme",
        {"layers": [3, 3], "estimator": "cosine", "lr": 1e-3, "epochs": 3, "cosine_loss": "full"},
        generated_calibration,
        str(tmp_path / "cos"),
    )
    report = hf_prune.prune(r, progress=False).report
    cut = report["stages"][0]["cuts"][0]
    assert report["stages"][0]["estimator"] == "cosine"
    # Started from the identity, the cosine map must explain more of the removed layer than no map.
    assert cut["relative_error_with_map"] < cut["relative_error_without_map"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run where a GPU is present)")
def test_gpu_path_matches_cpu(generated_calibration, tmp_path):
    reports = {}
    for device in ("cuda", "cpu"):
        r = recipe("replaceme", {"layers": [2, 2]}, generated_calibration, str(tmp_path / device))
        r["device"], r["dtype"] = device, "float32"
        result = hf_prune.prune(r, progress=False)
        assert next(result.model.parameters()).device.type == device
        reports[device] = result.report
    gpu, cpu = (reports[d]["evaluation"][0]["pruned"]["perplexity"] for d in ("cuda", "cpu"))
    assert gpu == pytest.approx(cpu, rel=1e-3)
