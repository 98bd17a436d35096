"""Data-parallel calibration: two gloo processes launched by torchrun, each on half the calibration
batches, give the one-process result (to float tolerance) for ReplaceMe, in memory and layer by layer,
and for expert scoring (router statistics; DiEP with each process on half of every batch's sequences);
only rank 0 writes. Methods whose statistics are not sums are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from engine_recipes import PROMPT_RETAINER
from hf_prune.model_patches.prompt_retainer import PromptRetainer
from safetensors.torch import load_file
from tiny_models import save_tiny_model, write_calibration_file

from hf_prune import prune

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # torchrun launches


def launch(recipe, path, processes=2, check=True, launcher="torchrun"):
    """``torchrun -m hf_prune prune RECIPE`` (or ``accelerate launch``) with ``processes`` gloo processes."""
    path.write_text(json.dumps(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    if launcher == "accelerate":
        # --multi_gpu runs torch's elastic launcher (as torchrun does); without a GPU the group uses gloo.
        # (accelerate's CPU-only multi-process launch goes through mpirun instead.)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"]
        command += ["--num_processes", str(processes), "--mixed_precision", "no", "--dynamo_backend", "no"]
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


@pytest.mark.parametrize(
    ("engine", "launcher"),
    [("in_memory", "torchrun"), ("sequential", "torchrun"), ("sequential", "accelerate")],
)
def test_two_processes_equal_one_for_expert_scores(engine, launcher, source, tmp_path):
    stage = {"method": "expert_pruning", "algorithm": "router_weight", "keep_ratio": 0.625, "uniform": False}
    single = prune(recipe(source, tmp_path / "one", stage, engine=engine), progress=False)
    launch(
        recipe(source, tmp_path / "two", stage, engine=engine), tmp_path / "recipe.json", launcher=launcher
    )
    saved = json.loads((tmp_path / "two" / "hf_prune.json").read_text())
    assert saved["engine"]["processes"] == 2
    one = single.report["stages"][0]
    two = saved["stages"][0]
    assert two["calibration_tokens"] == one["calibration_tokens"]
    for a, b in zip(one["layers"], two["layers"], strict=True):
        assert b["kept"] == a["kept"]
        assert b["scores"] == pytest.approx(a["scores"], rel=1e-5)  # router weights summed in another order
    assert two["removal"]["experts_per_layer"] == one["removal"]["experts_per_layer"]
    assert_close_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("engine", ["in_memory", "sequential"])
def test_two_processes_equal_one_for_diep(engine, source, tmp_path):
    # each process takes one of the two sequences of every batch; every 3rd token's MoE input is cached
    stage = {"method": "expert_pruning", "algorithm": "diep", "keep_ratio": 0.5, "epochs": 3}
    stage["max_cached_tokens"] = 100
    single = prune(recipe(source, tmp_path / "one", stage, engine=engine), progress=False)
    launch(recipe(source, tmp_path / "two", stage, engine=engine), tmp_path / "recipe.json")
    one = single.report["stages"][0]
    two = json.loads((tmp_path / "two" / "hf_prune.json").read_text())["stages"][0]
    assert two["calibration_tokens"] == one["calibration_tokens"]
    assert two["diep"]["cached_tokens"] == one["diep"]["cached_tokens"] == 86  # ceil(256 / 3)
    for a, b in zip(one["layers"], two["layers"], strict=True):
        assert b["kept"] == a["kept"]
        assert b["alpha"] == pytest.approx(a["alpha"], rel=1e-5, abs=1e-6)
        assert b["beta"] == pytest.approx(a["beta"], rel=1e-5, abs=1e-6)
    for a, b in zip(one["diep"]["history"], two["diep"]["history"], strict=True):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5)
        assert b["reconstruction"] == pytest.approx(a["reconstruction"], rel=1e-5)
    assert_close_weights(tmp_path / "one", tmp_path / "two")


def test_diep_needs_a_sequence_per_process_in_every_batch(source, tmp_path):
    stage = {"method": "expert_pruning", "algorithm": "diep", "keep_ratio": 0.5, "epochs": 1}
    settings = recipe(source, tmp_path / "out", stage)
    settings["calibration"]["batch_size"] = 1
    done = launch(settings, tmp_path / "recipe.json", check=False)
    assert done.returncode != 0
    assert "batch 0 has 1 sequence(s) for 2 processes" in done.stderr
    assert not (tmp_path / "out").exists()


def test_training_free_token_pruning_runs_under_a_launcher(tmp_path):
    # nothing to calibrate: every process makes the same change, rank 0 writes it
    model = save_tiny_model("llama", tmp_path / "llama")
    stage = {"method": "text_token_pruning", "algorithm": "random", "layer": 1, "keep_ratio": 0.5}
    settings = {"model": str(model), "stages": [stage], "engine": "sequential"}
    single = prune({**settings, "output": str(tmp_path / "one")}, progress=False)
    launch({**settings, "output": str(tmp_path / "two")}, tmp_path / "recipe.json")
    saved = json.loads((tmp_path / "two" / "hf_prune.json").read_text())
    assert saved["engine"]["processes"] == 2
    assert saved["stages"][0]["token_pruning"] == single.report["stages"][0]["token_pruning"]
    assert_close_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("engine", ["in_memory", "sequential"])
def test_two_processes_equal_one_for_the_prompt_retainer(engine, source, tmp_path):
    """Each process takes half the rows of every batch; gradients all-reduced: the one-process retainer."""
    model = save_tiny_model("llama", tmp_path / "llama")
    stage = {**PROMPT_RETAINER, "train_data": str(source[1])}
    settings = {"model": str(model), "stages": [stage], "engine": engine}
    single = prune({**settings, "output": str(tmp_path / "one")}, progress=False)
    launch({**settings, "output": str(tmp_path / "two")}, tmp_path / "recipe.json")
    saved = json.loads((tmp_path / "two" / "hf_prune.json").read_text())
    assert saved["engine"]["processes"] == 2
    one, two = single.report["stages"][0]["training"], saved["stages"][0]["training"]
    assert one["chosen_ratios"] == two["chosen_ratios"]
    for term in ("task", "distill", "flops", "ratio"):
        assert two["final"][term] == pytest.approx(one["final"][term], rel=1e-3, abs=1e-4), term
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two"))
    assert a.keys() == b.keys()
    for name in a:  # the retainer trained alike (float sums in another order); the rest copied
        if name != "retainer.saliency.2.bias":  # its exact gradient is 0 (a shift of every saliency moves
            # no threshold): AdamW turns the float noise in it into full steps, of either sign
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    torch.manual_seed(0)  # the stage's seed: the retainer training starts from
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    candidates = saved["stages"][0]["token_pruning"]["candidate_ratios"]
    untrained = PromptRetainer(hidden, len(candidates), 64).state_dict()
    assert any(not torch.equal(b[f"retainer.{k}"], v) for k, v in untrained.items())


def test_a_prompt_retainer_batch_needs_a_row_per_process(source, tmp_path):
    model = save_tiny_model("llama", tmp_path / "llama")
    stage = {**PROMPT_RETAINER, "train_data": str(source[1]), "batch_size": 1}
    settings = {"model": str(model), "stages": [stage], "output": str(tmp_path / "out")}
    done = launch(settings, tmp_path / "recipe.json", check=False)
    assert done.returncode != 0
    assert "batch_size: each of the 2 processes needs a row of every batch; batch_size is 1" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_method_without_summed_statistics_is_refused_under_a_launcher(source, tmp_path):
    stage = {"method": "heal", "steps": 1, "train_data": str(source[1])}
    done = launch(recipe(source, tmp_path / "out", stage), tmp_path / "recipe.json", check=False)
    assert done.returncode != 0
    assert "stages: heal cannot calibrate data-parallel" in done.stderr
    assert not (tmp_path / "out").exists()


def test_fewer_batches_than_processes_is_refused(source, tmp_path):
    settings = recipe(source, tmp_path / "out", {"method": "replaceme", "num_layers": 1})
    settings["calibration"]["batch_size"] = 8  # one batch of 8 sequences, for two processes
    done = launch(settings, tmp_path / "recipe.json", check=False)
    assert done.returncode != 0
    assert "gives 1 batch(es) for 2 processes: each process needs one" in done.stderr
    assert not (tmp_path / "out").exists()
