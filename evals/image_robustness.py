"""Accuracy of an image classifier under distribution shift: the clean test images and the same images
under each CIFAR-10-C corruption (``hf_prune.evals.corruptions``) at each severity.

The images are read with ``hf_prune.image_data.read_image_set`` (an IDX folder such as Fashion-MNIST, or
one sub-folder per class), each corrupted set is made once for the whole set from the seed (so the figures
do not depend on ``batch_size``), turned into the model's pixel values (``pixel_values``: [0, 1], then the
image processor's mean and std when the model has one) and scored in eval mode without gradients; the
predicted class is the argmax of the logits and the shipped ``accuracy`` metric aggregates.

    result = evaluate_corruption_robustness(model, processor, "../shared/assets/images/fashion-mnist", limit=1000)
    plot_corruption_robustness([("dense", dense_result), ("80% sparse", sparse_result)], "robustness.png")
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import DataError
from ..image_data import pixel_values, read_image_set
from .corruptions import CORRUPTIONS, SEVERITIES, check_corruption, check_severity, corrupt
from .metrics import load_metric


def evaluate_corruption_robustness(
    model: Any,
    processor: Any,
    data: str | os.PathLike,
    *,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    batch_size: int = 64,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Clean and corrupted accuracy of ``model`` on the test images of ``data``.

    Args:
        model: an image classifier (``*ForImageClassification``) taking ``pixel_values`` and returning
            logits ``[batch, num_labels]``.
        processor: its image processor (mean / std), or None (pixel values are the images in [0, 1]).
        data: an IDX folder or a folder of class sub-folders (``split="test"`` is read).
        corruptions: names from ``CORRUPTIONS`` (None: all of them, in table order).
        severities: severities 1..5 to run (default all five).
        batch_size: images per forward pass.
        limit: the first ``limit`` test images only.
        seed: seed of the random corruptions (the noises).
        progress: show a tqdm bar over the image sets (clean, then each corruption × severity).

    Returns:
        ``clean_accuracy``, ``mean_corrupted_accuracy`` (mean over every corruption × severity),
        ``relative_robustness`` (mean corrupted / clean; None when clean is 0), ``per_corruption`` (name →
        mean over severities), ``per_corruption_severity`` (name → accuracy per severity, in ``severities``
        order), ``corruptions``, ``severities``, ``examples``, ``seed``, ``data``, ``seconds``.

    Raises:
        DataError: an unknown corruption, a severity outside 1..5, images whose channels or labels the
            model cannot take, unreadable data (named by path).
        ValueError: a bad ``batch_size``; logits that are not ``[batch, num_labels]``.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = list(CORRUPTIONS) if corruptions is None else list(corruptions)
    for name in names:
        check_corruption(name)
    levels = [check_severity(s) for s in severities]
    for what, chosen in (("corruption", names), ("severity", levels)):
        if not chosen or len(set(chosen)) != len(chosen):
            raise DataError(f"corruption_robustness needs distinct {what} values, at least one; got {chosen}")
    images = read_image_set(data, split="test", limit=limit)
    num_labels = _check_fits(model, images.images, images.labels, os.fspath(data))

    metric = load_metric("accuracy")
    parameter = next(model.parameters())
    labels = images.labels.tolist()
    bar = tqdm(
        total=1 + len(names) * len(levels), desc="corruption_robustness", unit="set", disable=not progress
    )

    def accuracy(batch_images: torch.Tensor) -> float:
        for start in range(0, len(labels), batch_size):
            pixels = pixel_values(batch_images[start : start + batch_size], processor)
            logits = model(pixel_values=pixels.to(parameter.device, parameter.dtype)).logits
            if logits.dim() != 2 or (num_labels and logits.shape[-1] != num_labels):
                raise ValueError(
                    f"corruption_robustness needs an image classifier: {type(model).__name__} returned logits "
                    f"of shape {tuple(logits.shape)}, expected [batch, {num_labels}]"
                )
            metric.add_batch(
                predictions=logits.argmax(dim=-1).tolist(), references=labels[start : start + batch_size]
            )
        bar.update(1)
        return float(metric.compute()["accuracy"])

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            clean = accuracy(images.images)
            table = {
                name: [accuracy(corrupt(images.images, name, level, seed)) for level in levels]
                for name in names
            }
    finally:
        model.train(was_training)
        bar.close()

    per_corruption = {name: sum(values) / len(values) for name, values in table.items()}
    mean_corrupted = sum(per_corruption.values()) / len(per_corruption)
    return {
        "clean_accuracy": clean,
        "mean_corrupted_accuracy": mean_corrupted,
        "relative_robustness": mean_corrupted / clean if clean > 0 else None,
        "per_corruption": per_corruption,
        "per_corruption_severity": table,
        "corruptions": names,
        "severities": levels,
        "examples": len(labels),
        "seed": seed,
        "data": os.fspath(data),
        "seconds": time.perf_counter() - started,
    }


def _check_fits(model: Any, images: torch.Tensor, labels: torch.Tensor, data: str) -> int:
    """``num_labels`` of the model, after checking it takes the images' channels and every label."""
    config = getattr(model, "config", None)
    num_labels = int(getattr(config, "num_labels", 0) or 0)
    channels = getattr(config, "num_channels", None)
    if isinstance(channels, int) and channels != images.shape[1]:
        raise DataError(
            f"image data {data}: the images have {images.shape[1]} channel(s), the model takes {channels} "
            "(num_channels in its config)"
        )
    if num_labels and int(labels.max()) >= num_labels:
        raise DataError(
            f"image data {data}: label {int(labels.max())} is out of range; the model has {num_labels} labels "
            f"(0..{num_labels - 1})"
        )
    return num_labels


def plot_corruption_robustness(
    results: dict[str, Any] | Sequence[tuple[str, dict[str, Any]]], path: str | os.PathLike
) -> Path:
    """A PNG of accuracy against severity, one panel per corruption and one for the mean over them, one
    line per model with its clean accuracy as a dashed line of the same colour. ``results``: one result of
    ``evaluate_corruption_robustness``, or (label, result) pairs to compare several models."""
    from .report import _pyplot, _save

    runs = [("model", results)] if isinstance(results, dict) else list(results)
    if not runs:
        raise ValueError("plot_corruption_robustness needs at least one result")
    names = list(dict.fromkeys(name for _, result in runs for name in result["per_corruption_severity"]))
    panels = [*names, "mean over corruptions"]
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    plt = _pyplot()
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, panel in enumerate(panels):
        ax = axes[index // columns][index % columns]
        for run_index, (label, result) in enumerate(runs):
            colour = colours[run_index % len(colours)]
            levels = result["severities"]
            table = result["per_corruption_severity"]
            if panel in table:
                values = table[panel]
            elif panel == panels[-1]:
                values = [sum(table[n][i] for n in table) / len(table) for i in range(len(levels))]
            else:
                continue
            ax.plot(levels, values, marker="o", color=colour, label=label)
            ax.axhline(result["clean_accuracy"], color=colour, linestyle="--", linewidth=1)
        ax.set_title(panel.replace("_", " "), fontsize=9)
        ax.set_xticks(list(SEVERITIES))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if index % columns == 0:
            ax.set_ylabel("accuracy")
        if index >= len(panels) - columns:
            ax.set_xlabel("severity")
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].axis("off")
    axes[0][0].legend(fontsize=7, title="dashed: clean", title_fontsize=7)
    fig.suptitle("Accuracy under corruptions (CIFAR-10-C style)", fontsize=10)
    return _save(fig, Path(path))


__all__ = ["evaluate_corruption_robustness", "plot_corruption_robustness"]
