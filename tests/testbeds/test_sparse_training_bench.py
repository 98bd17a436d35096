"""The sparse-training benchmark runs end to end on its Fashion-MNIST testbed (a few steps): every method
reaches its sparsity in the weights it reports, and the small-dense model is about as large."""

from __future__ import annotations

import json

import pytest
from conftest import shared_asset
from hf_prune.evals.benchmarks import bench_sparse_training

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_fashion_grid_reaches_each_sparsity(tmp_path, capsys):
    shared_asset("images/fashion-mnist/train-images-idx3-ubyte.gz")
    out = tmp_path / "rows.json"
    argv = [
        "fashion",
        "--steps",
        "8",
        "--train-limit",
        "256",
        "--eval-limit",
        "100",
        "--sparsities",
        "0.9",
        "--output",
        str(out),
        "--plot",
        str(tmp_path / "plot.png"),
    ]
    assert bench_sparse_training.main(argv) == 0
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    total = rows["dense"]["nonzero"]  # every targeted weight is non-zero in the dense model
    for method in ("gmp", "granet", "lottery"):
        assert abs(rows[method]["nonzero"] - round(0.1 * total)) <= 0.002 * total, method
        assert 0.0 <= rows[method]["accuracy"] <= 1.0
    assert abs(rows["small_dense"]["nonzero"] - 0.1 * total) <= 0.1 * total  # about as many weights
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert "| 0.9 |" in capsys.readouterr().out
