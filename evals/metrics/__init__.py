"""Metrics shipped with hf_prune, loadable offline.

``evaluate.load("perplexity")`` would fetch the metric script from the Hub; loading the folder
that ships with this package by path needs no network.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import evaluate

_METRICS_DIR = Path(__file__).resolve().parent


def shipped_metric_names() -> list[str]:
    """Names of the metric folders next to this file (each holds ``<name>/<name>.py``)."""
    return sorted(entry.name for entry in _METRICS_DIR.iterdir() if (entry / f"{entry.name}.py").is_file())


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load a shipped metric by name, from its local folder, without touching the Hub."""
    available = shipped_metric_names()
    if name not in available:
        raise ValueError(f"unknown metric {name!r}; shipped metrics: {', '.join(available) or '(none)'}")
    # In-memory storage plus a unique experiment id: evaluate otherwise writes Arrow files and
    # lock files under a shared cache path, which concurrent processes would contend for.
    return evaluate.load(
        str(_METRICS_DIR / name),
        keep_in_memory=True,
        experiment_id=uuid.uuid4().hex,
    )


__all__ = ["load_metric", "shipped_metric_names"]
