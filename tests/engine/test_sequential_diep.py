"""DiEP on ``engine: sequential`` (layer-wise forward, head, layer-wise backward; see
``methods/experts/diep_sequential.py``): the same α, β, kept experts and weights as in memory on every MoE
family, with the language-model term alone (only the layer-wise backward carries it) and with the
reconstruction term alone; a run killed after an epoch restarts from it and ends where an uninterrupted one
does."""

from __future__ import annotations

import re

import pytest
import torch
from engine_recipes import one_stage_recipe
from fresh_process import prune_killed
from safetensors.torch import load_file
from tiny_models import MOE_TYPES, save_tiny_model, write_calibration_file

from hf_prune import prune
from hf_prune.engine.activation_store import ActivationStore
from hf_prune.methods.experts.diep import DiepTraining

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return write_calibration_file(tmp_path_factory.mktemp("data") / "calib.txt")


DIEP = {"method": "expert_pruning", "algorithm": "diep", "keep_ratio": 0.5, "epochs": 3}


def recipe(model, output, calibration, stage, engine, **extra):
    settings = one_stage_recipe(model, output, calibration, stage, engine, **extra)
    settings["calibration"]["seq_len"] = 24  # not the hidden size (32): a transposed [B, S, H] would show
    return settings


def trained(report):
    """Per MoE layer: (α, β) as the stage report gives them (6 significant digits)."""
    return [(layer["alpha"], layer["beta"]) for layer in report["stages"][0]["layers"]]


def assert_same_training(one, two):
    for (alpha_a, beta_a), (alpha_b, beta_b) in zip(trained(one), trained(two), strict=True):
        assert alpha_b == pytest.approx(alpha_a, rel=1e-5, abs=1e-6)
        assert beta_b == pytest.approx(beta_a, rel=1e-5, abs=1e-6)
    kept = [layer["kept"] for layer in one["stages"][0]["layers"]]
    assert [layer["kept"] for layer in two["stages"][0]["layers"]] == kept


@pytest.mark.parametrize(
    ("model_type", "terms"),
    [(t, {}) for t in MOE_TYPES]
    + [
        ("mixtral", {"lambda_recon": 0.0}),
        ("qwen2_moe", {"lm_loss_weight": 0.0}),
        ("olmoe", {"lm_loss_weight": 0.0, "max_cached_tokens": 2}),  # one cached token per step
    ],
    ids=[*MOE_TYPES, "mixtral-lm-only", "qwen2_moe-reconstruction-only", "olmoe-one-cached-token-per-step"],
)
def test_sequential_diep_equals_in_memory(model_type, terms, calibration, tmp_path):
    source = save_tiny_model(model_type, tmp_path / "source")
    stage = {**DIEP, **terms}
    memory = prune(recipe(source, tmp_path / "memory", calibration, stage, "in_memory"), progress=False)
    sequential = prune(
        recipe(source, tmp_path / "seq", calibration, stage, "sequential", activation_memory_gb=0),
        progress=False,
    )
    assert sequential.report["engine"]["name"] == "sequential"
    assert_same_training(memory.report, sequential.report)
    # α moved away from its start: a step that carried no gradient would leave it at 1
    assert any(abs(a - 1) > 1e-3 for alpha, _ in trained(sequential.report) for a in alpha)
    for term in ("lm_loss", "reconstruction"):  # None / 0.0 for a term switched off, as in memory
        history = [h[term] for h in sequential.report["stages"][0]["diep"]["history"]]
        assert history == pytest.approx([h[term] for h in memory.report["stages"][0]["diep"]["history"]])
    a, b = (
        load_file(str(tmp_path / "memory/model.safetensors")),
        load_file(str(tmp_path / "seq/model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("budget", [0, None], ids=["everything-spilled", "activations-in-memory"])
def test_interrupted_diep_run_restarts_after_its_last_epoch(
    budget, calibration, tmp_path, monkeypatch, capsys
):
    # in process: an error after epoch 1's α/β reached the cache (on disk even when activations fit in
    # memory); the restart trains epoch 2 only
    source = save_tiny_model("mixtral", tmp_path / "source")
    reference = prune(recipe(source, tmp_path / "reference", calibration, DIEP, "sequential"), progress=False)
    extra = {"activation_memory_gb": budget} if budget is not None else {}
    settings = recipe(source, tmp_path / "out", calibration, DIEP, "sequential", **extra)
    original_put = ActivationStore.put

    def put_then_fail(self, key, tensors, **options):
        original_put(self, key, tensors, **options)
        if key == "diep-state" and len(tensors[-1]) == 2:  # two epochs of history
            raise KeyboardInterrupt

    monkeypatch.setattr(ActivationStore, "put", put_then_fail)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        prune(settings, progress=False)
    assert "DiEP" not in capsys.readouterr().err  # no bar unless asked
    monkeypatch.undo()
    epochs = []
    original_begin = DiepTraining.begin_epoch
    monkeypatch.setattr(
        DiepTraining, "begin_epoch", lambda self, e: (epochs.append(e), original_begin(self, e))
    )
    capsys.readouterr()
    restarted = prune(settings, progress=True)
    assert epochs == [2]
    err = capsys.readouterr().err
    # the bar of the one epoch left × 2 batches; the cached MoE inputs/outputs reused when they were spilled
    assert re.search(r"\rDiEP: +0%\|.*\| 0/2 ", err), err
    assert ("DiEP: cache MoE inputs/outputs" in err) == (budget is None)
    stage = restarted.report["stages"][0]
    reused = ["DiEP epochs 0-1"] if budget is None else ["DiEP MoE inputs/outputs", "DiEP epochs 0-1"]
    assert stage["activations"]["reused_after_restart"] == reused
    assert stage["diep"]["history"] == reference.report["stages"][0]["diep"]["history"]
    assert_same_training(reference.report, restarted.report)


@pytest.mark.slow  # a fresh process
def test_killed_diep_run_restarts_after_its_last_epoch(calibration, tmp_path):
    source = save_tiny_model("qwen2_moe", tmp_path / "source")  # layers 1 and 3 are MoE
    reference = prune(recipe(source, tmp_path / "reference", calibration, DIEP, "sequential"), progress=False)
    settings = recipe(source, tmp_path / "out", calibration, DIEP, "sequential", activation_memory_gb=0)
    # puts: the inputs/outputs of layers 1 and 3; epoch 0: 2 steps, each keeping the inputs of layers 1-3
    # for its backward; then α/β after epoch 0 (the 9th put), and die
    killed = prune_killed(settings, 9)
    assert killed.returncode == 137, killed.stderr.decode()[-2000:]
    restarted = prune(settings, progress=False)
    stage = restarted.report["stages"][0]
    assert stage["activations"]["reused_after_restart"] == ["DiEP MoE inputs/outputs", "DiEP epochs 0-0"]
    assert stage["diep"]["history"] == reference.report["stages"][0]["diep"]["history"]
    assert_same_training(reference.report, restarted.report)
