"""``report.md`` and PNG plots for a pruning run or an ``hf-prune eval --compare``.

Plots (matplotlib, Agg backend, written only when there is something to show):
- ``quality_vs_compression.png``: retained quality per task against the fraction of parameters kept,
  one point per run (method), the original at (1, 1);
- ``latency_vs_seq_len.png``: prefill latency against sequence length for each benchmarked model;
- ``expert_counts.png``: experts per decoder layer, original against pruned, for MoE models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPORT_FILE = "report.md"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_quality_vs_compression(runs: list[dict[str, Any]], path: Path) -> Path | None:
    points = [
        (run, entry)
        for run in runs
        for entry in run.get("evaluation", [])
        if entry.get("retained") is not None
    ]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([1.0], [1.0], marker="*", s=160, color="black", label="original", zorder=3)
    markers = dict(zip(sorted({e["task"] for _, e in points}), "osD^v<>", strict=False))
    for run, entry in points:
        kept = run["params_after"] / run["params_before"]
        ax.scatter(
            [kept],
            [entry["retained"]],
            marker=markers[entry["task"]],
            s=60,
            zorder=3,
            label=f"{run['label']} ({entry['task']})"
            if entry["task"] == entry["metric"]
            else f"{run['label']} ({entry['task']}: {entry['metric']})",
        )
        ax.annotate(
            run["label"], (kept, entry["retained"]), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
    ax.set_xlabel("parameters kept (fraction of original)")
    ax.set_ylabel("quality retained (fraction of original)")
    ax.set_title("Quality vs compression")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_latency_vs_seq_len(latency_ms: dict[str, dict[int, float]], path: Path) -> Path | None:
    """``latency_ms``: model label -> {sequence length: median prefill latency in ms}."""
    if not latency_ms:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, by_len in latency_ms.items():
        lengths = sorted(by_len)
        ax.plot(lengths, [by_len[n] for n in lengths], marker="o", label=label)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("prefill latency, median (ms)")
    ax.set_title("Prefill latency vs sequence length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_expert_counts(counts: dict[str, list[int]], path: Path) -> Path | None:
    """``counts``: model label -> experts in each decoder layer (0 for a dense layer)."""
    if not counts or not any(any(layer for layer in c) for c in counts.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(counts)
    for i, (label, per_layer) in enumerate(counts.items()):
        ax.bar([layer + i * width for layer in range(len(per_layer))], per_layer, width=width, label=label)
    num_layers = max(len(per_layer) for per_layer in counts.values())
    ax.set_xticks(
        [layer + width * (len(counts) - 1) / 2 for layer in range(num_layers)], labels=range(num_layers)
    )
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("experts")
    ax.set_title("Experts per layer")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_kept_tokens(image: Any, kept: Any, path: Path, *, title: str = "Kept visual tokens") -> Path:
    """Heat map of which image patches a token-pruning method kept, over the image itself.

    ``image``: an H×W or H×W×3 array (or PIL image); ``kept``: a [rows, cols] grid of 0/1 (or scores) over
    the patch grid, e.g. the keep mask of a 24×24 LLaVA patch grid. Dropped patches are dimmed.
    """
    import numpy as np

    plt = _pyplot()
    pixels = np.asarray(image, dtype=np.float32)
    grid = np.asarray(kept, dtype=np.float32)
    if grid.ndim != 2:
        raise ValueError(f"kept must be a [rows, cols] grid over the image patches, got shape {grid.shape}")
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.8))
    axes[0].imshow(pixels / max(float(pixels.max()), 1.0), cmap="gray" if pixels.ndim == 2 else None)
    axes[0].set_title("image")
    height, width = pixels.shape[:2]
    axes[1].imshow(pixels / max(float(pixels.max()), 1.0), cmap="gray" if pixels.ndim == 2 else None)
    # Pixel centres sit on integers, so the image spans -0.5 … size-0.5; the grid must span the same.
    axes[1].imshow(
        grid,
        cmap="viridis",
        alpha=0.55,
        extent=(-0.5, width - 0.5, height - 0.5, -0.5),
        interpolation="nearest",
        vmin=0.0,
        vmax=max(float(grid.max()), 1.0),
    )
    axes[1].set_title(f"{title} ({int((grid > 0).sum())} of {grid.size})")
    for axis in axes:
        axis.axis("off")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(
    folder: str | Path,
    *,
    title: str,
    runs: list[dict[str, Any]],
    latency_ms: dict[str, dict[int, float]] | None = None,
    expert_counts: dict[str, list[int]] | None = None,
    bench_table: str | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write ``report.md`` and the plots that have data into ``folder``; return the report's path.

    Each run: ``{"label", "params_before", "params_after", "evaluation": [entries as in hf_prune.json]}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    lines += [
        "| run | parameters | kept | task | metric | data | original | pruned | retained |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        kept = run["params_after"] / run["params_before"]
        entries = run.get("evaluation") or [None]
        for entry in entries:
            cells = [run["label"], f"{run['params_after']:,}", f"{kept:.1%}"]
            if entry is None:
                cells += ["", "", "", "", "", ""]
            else:
                metric = entry["metric"]
                cells += [
                    entry["task"],
                    metric,
                    Path(entry["data"]).name,
                    f"{entry['original'][metric]:.4g}",
                    f"{entry['pruned'][metric]:.4g}",
                    format_retained(entry["retained"]),
                ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += scoring_notes(runs)
    plots = [
        plot_quality_vs_compression(runs, folder / "quality_vs_compression.png"),
        plot_latency_vs_seq_len(latency_ms or {}, folder / "latency_vs_seq_len.png"),
        plot_expert_counts(expert_counts or {}, folder / "expert_counts.png"),
    ]
    for plot in plots:
        if plot is not None:
            lines += ["", f"![{plot.stem.replace('_', ' ')}]({plot.name})"]
    if bench_table:
        lines += ["", "## Benchmark", "", "```", bench_table.rstrip(), "```"]
    for note in notes or []:
        lines += ["", note]
    path = folder / REPORT_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def scoring_notes(runs: list[dict[str, Any]]) -> list[str]:
    """Lines saying how each evaluated model was scored, for results that say (``protocol``: perplexity's
    context split, scored tokens, where the context_len came from); none otherwise."""
    lines = []
    for run in runs:
        for entry in run.get("evaluation") or []:
            described = {
                label: entry[label]
                for label in ("original", "pruned")
                if isinstance(entry.get(label), dict) and entry[label].get("protocol")
            }
            if not described:
                continue
            lines += ["", f"How {run['label']} / {entry['task']} was scored:", ""]
            for label, result in described.items():
                figures = [
                    f"{key} {result[key]}"
                    for key in ("seq_len", "context_len", "scored_tokens")
                    if key in result
                ]
                source = (
                    f" context_len {result['context_len_source']}."
                    if result.get("context_len_source")
                    else ""
                )
                lines.append(f"- {label}: {', '.join(figures)}: {result['protocol']}.{source}")
    return lines


def format_retained(retained: float | None) -> str:
    """The retained fraction as a percentage, or why there is none (an original scoring 0)."""
    return "n/a (original scores 0)" if retained is None else f"{retained:.1%}"
