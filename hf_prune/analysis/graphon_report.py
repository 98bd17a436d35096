"""Files of ``hf-prune graphon``: PNG heat maps, convergence, spectrum and loss plots, ``report.md`` and
``graphon_results.json``, for the study and for a checkpoint's masks."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from .graphon import cut_distance, estimate_graphon, l2_distance
from .study import SPECTRAL_KEYS

#: Every figure as JSON; its presence marks a folder as an earlier graphon output.
RESULTS_FILE = "graphon_results.json"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _heat_maps(cells: list[tuple[str, torch.Tensor]], columns: int, path: Path) -> None:
    plt = _pyplot()
    rows = math.ceil(len(cells) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, graphon) in zip(axes.flat, cells, strict=False):
        ax.imshow(graphon.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_study_report(results: dict[str, Any], output: Path) -> list[Path]:
    """Write the study's files into ``output``; returns their paths."""
    plt = _pyplot()
    output.mkdir(parents=True, exist_ok=True)
    settings = results["settings"]
    methods, widths, sparsities = settings["methods"], sorted(set(settings["widths"])), settings["sparsities"]
    written = []

    first = sparsities[0]
    cells = [
        (f"{m}, width {w}, {first:.0%} sparse", results["graphons"][(m, first, w)])
        for m in methods
        for w in widths
    ]
    _heat_maps(cells, len(widths), output / "graphons.png")
    widest = [
        (f"{m}, width {widths[-1]}, {s:.0%} sparse", results["graphons"][(m, s, widths[-1])])
        for m in methods
        for s in sparsities
    ]
    _heat_maps(widest, len(sparsities), output / "graphons_widest.png")
    written += [output / "graphons.png", output / "graphons_widest.png"]

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("l2", "cut"), strict=True):
        for method in methods:
            for sparsity in sparsities:
                means = [
                    _mean(results["convergence"], key, method=method, sparsity=sparsity, width=w)
                    for w in widths
                ]
                ax.plot(widths, means, marker="o", label=f"{method} {sparsity:.0%}")
        ax.set(xscale="log", xlabel="width", ylabel=f"{key} distance to width {widths[-1]}", title=key)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output / "convergence.png", dpi=110)
    plt.close(figure)
    written.append(output / "convergence.png")

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in results["trainability"]:
        if run["seed"] != 0:
            continue
        label = f"{run['method']} {run['sparsity']:.0%}"
        eigenvalues = [e for e in run["eigenvalues"] if e > 0]
        axes[0].loglog(range(1, len(eigenvalues) + 1), eigenvalues, label=label)
        axes[1].plot(run["losses"], label=label)
    axes[0].set(xlabel="k", ylabel="λ_k", title=f"Graphon NTK spectrum (width {results['train_width']})")
    axes[1].set(xlabel="step", ylabel="training loss", title="training loss (seed 0)")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output / "spectrum_and_loss.png", dpi=110)
    plt.close(figure)
    written.append(output / "spectrum_and_loss.png")

    figure, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key in zip(axes, SPECTRAL_KEYS, strict=True):
        for config in results["config_means"]:
            ax.scatter(config[key], config["loss_drop"])
            ax.annotate(
                f"{config['method']} {config['sparsity']:.0%}", (config[key], config["loss_drop"]), fontsize=6
            )
        rho = results["spearman"]["loss_drop"][key]
        ax.set(xlabel=key, ylabel="early loss drop", title=f"Spearman ρ = {rho:.2f}")
    figure.tight_layout()
    figure.savefig(output / "spectral_vs_loss.png", dpi=110)
    plt.close(figure)
    written.append(output / "spectral_vs_loss.png")

    (output / "report.md").write_text(_study_markdown(results), encoding="utf-8")
    public = {k: v for k, v in results.items() if k != "graphons"}
    (output / RESULTS_FILE).write_text(json.dumps(public, indent=1), encoding="utf-8")
    return [*written, output / "report.md", output / RESULTS_FILE]


def _mean(rows: list[dict[str, Any]], key: str, **match: Any) -> float:
    return statistics.fmean(r[key] for r in rows if all(r[k] == v for k, v in match.items()))


def _std(rows: list[dict[str, Any]], key: str, **match: Any) -> float:
    values = [r[key] for r in rows if all(r[k] == v for k, v in match.items())]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _study_markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    widths = sorted(set(settings["widths"]))
    lines = [
        "# Graphon study",
        "",
        f"MLPs with {settings['depth']} hidden ReLU layers, pruned at initialisation; data: {results['data']}; "
        f"{settings['seeds']} seeds; graphons on a {settings['bins_used']}×{settings['bins_used']} grid of the "
        "hidden-to-hidden masks (input and output masks left out).",
        *[f"- note: {note}" for note in results["notes"]],
        "",
        "## Convergence: distance of each width's graphon to the widest (mean ± std over seeds and layers)",
        "",
        "| method | sparsity | " + " | ".join(f"L2, width {w}" for w in widths) + " | cut, narrowest |",
        "|---|---|" + "---|" * (len(widths) + 1),
    ]
    for method in settings["methods"]:
        for sparsity in settings["sparsities"]:
            match = {"method": method, "sparsity": sparsity}
            cells = [
                f"{_mean(results['convergence'], 'l2', width=w, **match):.4f} ± "
                f"{_std(results['convergence'], 'l2', width=w, **match):.4f}"
                for w in widths
            ]
            cut = _mean(results["convergence"], "cut", width=widths[0], **match)
            lines.append(f"| {method} | {sparsity:.0%} | " + " | ".join(cells) + f" | {cut:.4f} |")
    lines += [
        "",
        f"## Trainability at width {results['train_width']}: Graphon NTK on {settings['ntk_samples']} samples "
        f"({settings['ntk_bins']} positions per layer), {settings['steps']} Adam steps "
        f"(lr {settings['learning_rate']})",
        "",
        "| method | sparsity | α (decay) | trace/λ₁ | λ₁/λ₂ | top-5 share | early loss drop | relative drop "
        "| final loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["config_means"]:
        lines.append(
            f"| {c['method']} | {c['sparsity']:.0%} | {c['decay_alpha']:.3f} | {c['trace_over_top']:.2f} | "
            f"{c['top1_over_top2']:.2f} | {c['top5_share']:.3f} | {c['loss_drop']:.3f} | "
            f"{c['relative_loss_drop']:.3f} | {c['final_loss']:.3f} |"
        )
    lines += [
        "",
        "Spearman rank correlation over the method × sparsity means (rows: training measure, columns: "
        "spectral quantity):",
        "",
        "| | " + " | ".join(SPECTRAL_KEYS) + " |",
        "|---|" + "---|" * len(SPECTRAL_KEYS),
        *[
            f"| {target} | " + " | ".join(f"{rhos[key]:+.3f}" for key in SPECTRAL_KEYS) + " |"
            for target, rhos in results["spearman"].items()
        ],
    ]
    lines += [
        "",
        "Figures: graphons.png (each width, first sparsity), graphons_widest.png (the widest, each sparsity), "
        "convergence.png, spectrum_and_loss.png, spectral_vs_loss.png.",
        "",
    ]
    return "\n".join(lines)


def write_checkpoint_report(
    source: str, masks: dict[str, torch.Tensor], output: Path, bins: int
) -> list[Path]:
    """Per-layer graphons of a checkpoint's (or a saved state's) masks: heat maps, a table with each layer's
    density and its distances from the constant graphon of that density, and ``graphon_results.json``."""
    output.mkdir(parents=True, exist_ok=True)
    rows, cells = [], []
    for name, mask in masks.items():
        k = min(bins, *mask.shape)
        graphon = estimate_graphon(mask.double(), k)
        constant = torch.full_like(graphon, float(mask.double().mean()))
        rows.append(
            {
                "layer": name,
                "shape": list(mask.shape),
                "density": float(mask.double().mean()),
                "bins": k,
                "l2_from_constant": l2_distance(graphon, constant),
                "cut_from_constant": cut_distance(graphon, constant),
            }
        )
        cells.append((f"{name} ({rows[-1]['density']:.0%})", graphon))
    _heat_maps(cells, min(4, len(cells)), output / "graphons.png")
    lines = [
        f"# Graphons of {source}",
        "",
        "Each pruned layer's mask, degree-sorted and block-averaged. Distance from constant: how far the layer's "
        "structure is from a random mask of the same density (0 for uniform random pruning in the limit).",
        "",
        "| layer | shape | density | bins | L2 from constant | cut from constant |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['layer']} | {r['shape'][0]}×{r['shape'][1]} | {r['density']:.3f} | {r['bins']} | "
            f"{r['l2_from_constant']:.4f} | {r['cut_from_constant']:.4f} |"
            for r in rows
        ],
        "",
        "Figure: graphons.png.",
        "",
    ]
    (output / "report.md").write_text("\n".join(lines), encoding="utf-8")
    (output / RESULTS_FILE).write_text(
        json.dumps({"source": source, "layers": rows}, indent=1), encoding="utf-8"
    )
    return [output / "graphons.png", output / "report.md", output / RESULTS_FILE]
