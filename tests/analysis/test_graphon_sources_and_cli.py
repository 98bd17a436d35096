"""Masks read from checkpoints and saved callback states, and ``hf-prune graphon`` end to end (the study
at toy scale, a checkpoint's layers, bad input)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build_tiny_model, build_tokenizer

from hf_prune.analysis import GraphonError, masks_from_checkpoint, masks_from_state_file
from hf_prune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STUDY = [
    "--widths",
    "16",
    "32",
    "--sparsity",
    "0.8",
    "--seeds",
    "1",
    "--depth",
    "2",
    "--bins",
    "8",
    "--steps",
    "3",
    "--ntk-samples",
    "16",
    "--ntk-bins",
    "4",
    "--quiet",
]


@pytest.fixture(scope="module")
def sparse_llama(tmp_path_factory):
    """A tiny Llama with 60% of one projection and half of another zeroed by hand."""
    model = build_tiny_model("llama", build_tokenizer())
    with torch.no_grad():
        q = model.model.layers[0].self_attn.q_proj.weight
        q[torch.rand(q.shape, generator=torch.Generator().manual_seed(0)) < 0.6] = 0.0
        model.model.layers[1].mlp.down_proj.weight[:, ::2] = 0.0
    folder = tmp_path_factory.mktemp("graphon") / "sparse-llama"
    model.save_pretrained(folder)
    return folder, model


def test_checkpoint_masks_are_the_exact_zeros_of_pruned_layers(sparse_llama):
    folder, model = sparse_llama
    masks = masks_from_checkpoint(folder)
    assert sorted(masks) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(
        masks["model.layers.0.self_attn.q_proj.weight"], model.model.layers[0].self_attn.q_proj.weight != 0
    )
    assert float(masks["model.layers.1.mlp.down_proj.weight"].float().mean()) == 0.5


def test_expert_weights_are_read_per_expert(tmp_path):
    # transformers writes Mixtral's experts one 2-D tensor each (w1 / w2 / w3 per expert).
    model = build_tiny_model("mixtral", build_tokenizer())
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[1, :, ::2] = 0.0
    model.save_pretrained(tmp_path / "moe")
    assert list(masks_from_checkpoint(tmp_path / "moe")) == [
        "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    ]
    # A fused 3-D tensor [experts, out, in] on disk is read one expert slice at a time.
    fused = torch.randn(3, 8, 6)
    fused[2, :, :3] = 0.0
    save_file({"mlp.experts.down_proj": fused}, tmp_path / "model.safetensors")
    masks = masks_from_checkpoint(tmp_path)
    assert list(masks) == ["mlp.experts.down_proj[2]"] and torch.equal(
        masks["mlp.experts.down_proj[2]"], fused[2] != 0
    )


def test_a_checkpoint_with_nothing_pruned_is_refused(tmp_path):
    build_tiny_model("llama", build_tokenizer()).save_pretrained(tmp_path / "dense")
    with pytest.raises(GraphonError, match="no prunable layer with pruned weights"):
        masks_from_checkpoint(tmp_path / "dense")


def test_a_sparsity_callbacks_saved_masks_are_read(tmp_path):
    mask = torch.rand(8, 6, generator=torch.Generator().manual_seed(1)) < 0.3
    save_file(
        {"mask.layer.weight": mask.to(torch.uint8), "mask.bias": torch.ones(6, dtype=torch.uint8)},
        tmp_path / "state.safetensors",
        metadata={"step": "4"},
    )
    masks = masks_from_state_file(tmp_path / "state.safetensors")
    assert list(masks) == ["layer.weight"] and torch.equal(masks["layer.weight"], mask)


def test_study_writes_figures_report_and_results(tmp_path):
    output = tmp_path / "study"
    assert main(["graphon", "--method", "random", "synflow", "--output", str(output), *STUDY]) == 0
    for name in (
        "graphons.png",
        "convergence.png",
        "spectrum_and_loss.png",
        "spectral_vs_loss.png",
        "report.md",
    ):
        assert (output / name).stat().st_size > 0, name
    results = json.loads((output / "graphon_results.json").read_text())
    assert len(results["convergence"]) == 2 * 2  # methods × widths (one sparsity, one seed)
    widest = [row for row in results["convergence"] if row["width"] == 32]
    assert all(row["l2"] == 0.0 and row["cut"] == 0.0 for row in widest)  # the widest against itself
    assert [len(run["losses"]) for run in results["trainability"]] == [3, 3]
    assert set(results["spearman"]) == {"loss_drop", "relative_loss_drop", "final_loss"}
    assert set(results["spearman"]["final_loss"]) == {
        "decay_alpha",
        "trace_over_top",
        "top1_over_top2",
        "top5_share",
    }
    run = results["trainability"][0]
    start = end = sum(run["losses"]) / 3  # 3 steps: the first 5 and the last 5 are all of them
    assert run["loss_drop"] == pytest.approx(start - end) and run["final_loss"] == pytest.approx(end)
    report = (output / "report.md").read_text()
    assert "| random | 80% |" in report and "| synflow | 80% |" in report


def test_random_masks_converge_as_width_grows(tmp_path):
    from hf_prune.analysis.study import StudySettings, run_study

    settings = StudySettings(
        methods=["random"],
        widths=[32, 64, 128, 256, 512],
        sparsities=[0.8],
        seeds=2,
        depth=3,
        bins=16,
        steps=1,
        ntk_samples=8,
        ntk_bins=4,
    )
    results = run_study(settings, progress=False)
    means = [sum(r["l2"] for r in results["convergence"] if r["width"] == w) / 2 for w in (32, 64, 128, 256)]
    assert means == sorted(means, reverse=True) and means[-1] < 0.6 * means[0]


def test_checkpoint_report_lists_each_pruned_layer(sparse_llama, tmp_path):
    folder, _ = sparse_llama
    output = tmp_path / "layers"
    assert main(["graphon", str(folder), "--output", str(output), "--bins", "8", "--quiet"]) == 0
    layers = json.loads((output / "graphon_results.json").read_text())["layers"]
    assert [row["layer"] for row in layers] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    assert layers[1]["density"] == 0.5
    # Every other column of down_proj zeroed: after degree-sorting, a two-block graphon (1 | 0), far from
    # the constant 0.5: L2 distance 0.5 exactly.
    assert layers[1]["l2_from_constant"] == pytest.approx(0.5)
    assert (output / "graphons.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--sparsity", "1.5"], "--sparsity: every value must be in (0, 1)"),
        (["--ntk-bins", "64"], "--ntk-bins: 64 is larger than the widest network's width"),
        (["--data", "no/such/folder"], "--data: no/such/folder is not a folder of IDX files"),
        (["--device", "tpu"], "--device: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ],
)
def test_bad_study_options_exit_2_with_one_line(argv, words, tmp_path, capsys):
    options = [*STUDY, *argv]
    assert main(["graphon", "--output", str(tmp_path / "out"), *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_not_ours_is_not_replaced(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["graphon", "--output", str(tmp_path / "mine"), *STUDY]) == 2
    assert "already exists and is not an earlier hf-prune output" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_dense_checkpoint_exits_2(tmp_path, capsys):
    build_tiny_model("llama", build_tokenizer()).save_pretrained(tmp_path / "dense")
    assert main(["graphon", str(tmp_path / "dense"), "--output", str(tmp_path / "out")]) == 2
    assert "no prunable layer with pruned weights" in capsys.readouterr().err


def test_early_training_measures_by_hand():
    from hf_prune.analysis.study import early_training, spearman

    # First 5 losses average 8, last 5 average 3.
    assert early_training([10, 9, 8, 7, 6, 5, 4, 3, 2, 1]) == {
        "loss_drop": 5.0,
        "relative_loss_drop": 0.625,
        "final_loss": 3.0,
    }
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ranks 1, 2.5, 2.5, 4 against 1, 3, 2, 4: Pearson of the ranks = 4.5 / √(4.5 · 5).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
