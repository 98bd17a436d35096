"""A recipe's ``evaluate:`` section on ``engine: sequential``: the original and the pruned checkpoints are
loaded with accelerate's disk offload (a zero memory budget: every module read from disk during the
forward) and give the in-memory path's figures; the report, report.md and the model card carry them."""

from __future__ import annotations

import json

import pytest
from tiny_models import save_tiny_model, write_calibration_file

from hf_prune import prune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sequential_evaluation_equals_in_memory(tmp_path):
    source = save_tiny_model("qwen2_moe", tmp_path / "source")
    text = write_calibration_file(tmp_path / "text.txt")
    settings = {
        "model": str(source),
        "calibration": {"data": str(text), "num_samples": 8, "seq_len": 32, "batch_size": 4, "packing": True},
        "stages": [{"method": "replaceme", "num_layers": 1}],
        "evaluate": [{"task": "perplexity", "data": str(text), "seq_len": 32, "limit": 4}],
    }
    memory = prune({**settings, "output": str(tmp_path / "memory"), "engine": "in_memory"}, progress=False)
    sequential = prune(
        {**settings, "output": str(tmp_path / "seq"), "engine": "sequential", "activation_memory_gb": 0},
        progress=False,
    )
    one, two = memory.report["evaluation"][0], sequential.report["evaluation"][0]
    for side in ("original", "pruned"):
        assert two[side]["perplexity"] == pytest.approx(one[side]["perplexity"], rel=1e-5)
        assert two[side]["num_tokens"] == one[side]["num_tokens"] > 0
    assert abs(two["pruned"]["perplexity"] - two["original"]["perplexity"]) > 1e-3  # not the original again
    assert two["retained"] == pytest.approx(one["retained"], rel=1e-5)
    saved = json.loads((tmp_path / "seq/hf_prune.json").read_text())
    assert saved["evaluation"][0]["pruned"]["perplexity"] == two["pruned"]["perplexity"]
    assert "perplexity" in (tmp_path / "seq/report.md").read_text()
    assert f"{two['pruned']['perplexity']:.2f}" in (tmp_path / "seq/README.md").read_text()
    # the offload folders are gone with the activation cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "seq", "source", "text.txt"]
