"""Data-parallel calibration: two gloo processes launched by torchrun, each on half the calibration
batches, give the one-process result (to float tolerance) for ReplaceMe, in memory and layer by layer,
and for expert scoring; only rank 0 writes. Methods whose statistics are not sums are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_model, write_calibration_file

from hf_prune import prune

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # torchrun launches


def launch(recipe, path, processes=2, check=True):
    """``torchrun -m hf_prune prune RECIPE`` with ``processes`` gloo processes."""
    path.write_text(json.dumps(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    done = subprocess.run(
        [*command, "-m", "hf_prune", "prune", str(path), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp")
    return save_tiny_model("qwen2_moe", folder / "model"), write_calibration_file(folder / "calib.txt")


def recipe(source, output, stage, **extra):
    model, calibration = source
    return {
        "model": str(model),
        "output": str(output),
        # 4 batches: 2 per process
        "calibration": {
            "data": str(calibration),
            "num_samples": 8,
            "seq_len": 32,
            "batch_size": 2,
            "packing": True,
        },
        "stages": [stage],
        **extra,
    }


def assert_close_weights(a, b):
    a, b = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("engine", ["in_memory", "sequential"])
def test_two_processes_equal_one_for_replaceme(engine, source, tmp_path):
    stage = {"method": "replaceme", "num_layers": 1}
    single = prune(recipe(source, tmp_path / "one", stage, engine=engine), progress=False)
    done = launch(recipe(source, tmp_path / "two", stage, engine=engine), tmp_path / "recipe.json")
    assert done.stdout.count("saved to") == 1  # rank 0 only
    report = json.loads((tmp_path / "two" / "hf_prune.json").read_text())
    assert report["engine"] == {**single.report["engine"], "processes": 2}
    one, two = single.report["stages"][0], report["stages"][0]
    assert two["removed_layers"] == one["removed_layers"]
    assert two["cuts"][0]["calibration_tokens"] == one["cuts"][0]["calibration_tokens"]  # all the tokens
    assert two["candidate_distances"] == pytest.approx(one["candidate_distances"], abs=2e-6)
    assert_close_weights(tmp_path / "one", tmp_path / "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "recipe.json", "two"]  # no cache left


@pytest.mark.parametrize("engine", ["in_memory", "sequential"])
def test_two_processes_equal_one_for_expert_scores(engine, source, tmp_path):
    stage = {"method": "expert_pruning", "algorithm": "router_weight", "keep_ratio": 0.625, "uniform": False}
    single = prune(recipe(source, tmp_path / "one", stage, engine=engine), progress=False)
    launch(recipe(source, tmp_path / "two", stage, engine=engine), tmp_path / "recipe.json")
    one = single.report["stages"][0]
    two = json.loads((tmp_path / "two" / "hf_prune.json").read_text())["stages"][0]
    assert two["calibration_tokens"] == one["calibration_tokens"]
    for a, b in zip(one["layers"], two["layers"], strict=True):
        assert b["kept"] == a["kept"]
        assert b["scores"] == pytest.approx(a["scores"], rel=1e-5)  # router weights summed in another order
    assert two["removal"]["experts_per_layer"] == one["removal"]["experts_per_layer"]
    assert_close_weights(tmp_path / "one", tmp_path / "two")


def test_diep_is_refused_under_a_launcher(source, tmp_path):
    stage = {"method": "expert_pruning", "algorithm": "diep", "keep_ratio": 0.5, "epochs": 1}
    done = launch(recipe(source, tmp_path / "out", stage), tmp_path / "recipe.json", check=False)
    assert done.returncode != 0
    assert "stages: expert_pruning cannot calibrate data-parallel" in done.stderr
    assert not (tmp_path / "out").exists()


def test_fewer_batches_than_processes_is_refused(source, tmp_path):
    settings = recipe(source, tmp_path / "out", {"method": "replaceme", "num_layers": 1})
    settings["calibration"]["batch_size"] = 8  # one batch of 8 sequences, for two processes
    done = launch(settings, tmp_path / "recipe.json", check=False)
    assert done.returncode != 0
    assert "gives 1 batch(es) for 2 processes: each process needs one" in done.stderr
    assert not (tmp_path / "out").exists()
