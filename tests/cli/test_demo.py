"""`hf-prune demo` end to end, on a demo model trained for a few steps only (the real one takes ~70 s)."""

import json

import pytest
from hf_prune.evals.demo_model import build_demo_model

from hf_prune import demo

pytestmark = pytest.mark.slow  # builds a testbed or runs fresh processes


@pytest.fixture
def quick_demo_model(tmp_path, monkeypatch):
    folder = build_demo_model(tmp_path / "demo-model", progress=False, _steps=3)
    monkeypatch.setattr(demo, "demo_model_dir", lambda: folder)
    return folder


def test_demo_prunes_evaluates_saves_and_reloads(quick_demo_model, tmp_path, capsys):
    outcome = demo.run_demo(tmp_path / "out", progress=False)
    printed = capsys.readouterr().out
    for row in ("original", "replaceme", "layer_drop"):
        assert row in printed
    assert outcome["reloaded"]["hf_prune_imported"] is False
    assert outcome["reloaded"]["layers"] == 4
    assert outcome["max_logit_diff"] < 1e-5
    report = json.loads((tmp_path / "out" / "replaceme" / "hf_prune.json").read_text())
    assert report["stages"][0]["layers_before"] == 6 and len(report["stages"][0]["removed_layers"]) == 2
    assert report["evaluation"][0]["pruned"]["perplexity"] > 0
    # layer_drop removes the same layers (same angular-distance choice) without the map.
    drop = json.loads((tmp_path / "out" / "layer_drop" / "hf_prune.json").read_text())
    assert drop["stages"][0]["removed_layers"] == report["stages"][0]["removed_layers"]
    summary = (tmp_path / "out" / "report.md").read_text()
    assert "| replaceme |" in summary and "| layer_drop |" in summary
    assert (tmp_path / "out" / "quality_vs_compression.png").stat().st_size > 10_000
