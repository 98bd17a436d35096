"""The paper's two experiments at CPU scale, on MLPs with ReLU and no biases (``hf-prune graphon``):

1. **Convergence**: for each scorer, sparsity and seed, MLPs of every width (``depth`` hidden layers) are
   pruned at initialisation; the graphon of each hidden-to-hidden mask is estimated (the input and output
   masks are left out, as in the paper) and compared with the widest network's estimate of the same layer.
2. **Trainability**: at one width, each pruned MLP's Graphon NTK (``graphon_ntk.py``) is computed from its
   own masks on a data sample, with its four spectral quantities, and the MLP is trained for ``steps``
   Adam steps (pruned weights held at zero); the spectral quantities are set against the early loss drop
   (mean loss of the first 5 steps − mean of the last 5), that drop relative to the starting loss, and the
   loss reached, by Spearman rank correlation over the scorer × sparsity configurations (seed means).

For the NTK the masks are read with one node order per layer, so that a neuron keeps its position as the
output of one layer and the input of the next: each hidden layer's neurons by descending in-degree (row
sums of the mask feeding them), the input coordinates by descending out-degree (column sums of the first
mask), then block-averaged on an ``ntk_bins`` grid; the readout's density is its mask's mean over outputs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .graphon import GraphonError, block_average, cut_distance, estimate_graphon, l2_distance
from .graphon_ntk import graphon_ntk, spectral_summary
from .idx_images import read_idx_image_set
from .pai_scorers import SCORERS, apply_masks_, prune_at_init

SPECTRAL_KEYS = ("decay_alpha", "trace_over_top", "top1_over_top2", "top5_share")
#: How fast a run trains early: the loss drop (absolute), the drop as a share of the starting loss (a
#: network pruned into huge initial outputs drops by thousands), and the loss reached.
TRAINING_KEYS = ("loss_drop", "relative_loss_drop", "final_loss")


@dataclass
class StudySettings:
    methods: list[str]
    widths: list[int]
    sparsities: list[float]
    seeds: int = 3
    depth: int = 4
    bins: int = 64
    steps: int = 200
    batch_size: int = 128
    learning_rate: float = 1e-3
    ntk_samples: int = 256
    ntk_bins: int = 16
    data: str | None = None
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in SCORERS]
        if unknown:
            raise GraphonError(f"--method: unknown {unknown[0]!r} (allowed: {', '.join(SCORERS)})")
        if any(not 0 < s < 1 for s in self.sparsities):
            raise GraphonError(f"--sparsity: every value must be in (0, 1), got {self.sparsities}")
        if any(w < 2 for w in self.widths):
            raise GraphonError(f"--widths: every width must be at least 2, got {self.widths}")
        if self.depth < 2:
            raise GraphonError(
                f"--depth: needs at least 2 hidden layers (one hidden-to-hidden mask), got {self.depth}"
            )
        for name in ("seeds", "bins", "steps", "batch_size", "ntk_samples", "ntk_bins"):
            if getattr(self, name) < 1:
                raise GraphonError(
                    f"--{name.replace('_', '-')}: must be a positive integer, got {getattr(self, name)}"
                )
        if self.ntk_bins > min(self.widths):
            raise GraphonError(f"--ntk-bins: {self.ntk_bins} is larger than the widest network's width")


def study_data(folder: str | None, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(inputs [N, d], labels [N], description): an MNIST-format IDX folder's training split, standardised,
    or, without one, 10 seeded Gaussian clusters in 784 dimensions."""
    if folder is not None:
        images, labels = read_idx_image_set(folder, "train", limit=20_000)
        x = torch.from_numpy(images).reshape(len(images), -1).to(torch.float32) / 255.0
        x = (x - x.mean()) / x.std()
        return (
            x.to(device),
            torch.from_numpy(labels).long().to(device),
            f"{Path(folder).name} (train, 20,000)",
        )
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, 784, generator=generator)
    labels = torch.randint(0, 10, (20_000,), generator=generator)
    x = centres[labels] + 3.0 * torch.randn(20_000, 784, generator=generator)
    return (x / x.std()).to(device), labels.to(device), "synthetic: 10 Gaussian clusters in 784 dimensions"


def build_mlp(inputs: int, width: int, depth: int, outputs: int, seed: int) -> nn.Sequential:
    """``depth`` hidden ReLU layers of ``width``; Kaiming-normal weights (std √(2 / fan_in)), no biases."""
    torch.manual_seed(seed)
    sizes = [inputs, *([width] * depth)]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out, bias=False), nn.ReLU()]
    layers.append(nn.Linear(width, outputs, bias=False))
    for module in layers:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=math.sqrt(2.0 / module.in_features))
    return nn.Sequential(*layers)


def _masks(model: nn.Module, method: str, sparsity: float, x: torch.Tensor, y: torch.Tensor, seed: int):
    batch = slice(0, 256)

    # GraSP's authors score with the logits divided by a temperature of 200.
    temperature = 200.0 if method == "grasp" else 1.0

    def loss(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x[batch]) / temperature, y[batch])

    return prune_at_init(model, method, sparsity, loss=loss, seed=seed)


def ordered_graphons(
    masks: list[torch.Tensor], bins: int
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(graphons of the input and hidden masks, readout densities, input order) with one node order per
    layer (see the module docstring)."""
    input_order = torch.sort(-masks[0].float().sum(dim=0), stable=True).indices
    orders = [input_order]
    graphons = []
    for mask in masks[:-1]:
        rows = torch.sort(-mask.float().sum(dim=1), stable=True).indices
        graphons.append(block_average(mask.double()[rows][:, orders[-1]], bins, bins))
        orders.append(rows)
    readout = block_average(masks[-1].double()[:, orders[-1]], 1, bins)[0]
    return graphons, readout, input_order


def train_losses(model: nn.Module, masks: dict[str, torch.Tensor], x, y, settings: StudySettings, seed: int):
    """Per-step training loss of ``steps`` Adam steps; pruned weights are zeroed after every step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    losses = []
    for _ in range(settings.steps):
        index = torch.randint(0, len(x), (settings.batch_size,), generator=generator).to(x.device)
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        apply_masks_(model, masks)
        losses.append(loss.item())
    return losses


def early_training(losses: list[float]) -> dict[str, float]:
    """The ``TRAINING_KEYS`` of one loss curve: start and end are the means of its first and last 5 steps."""
    start, end = statistics.fmean(losses[:5]), statistics.fmean(losses[-5:])
    return {"loss_drop": start - end, "relative_loss_drop": (start - end) / start, "final_loss": end}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((p - ma) * (q - mb) for p, q in zip(ra, rb, strict=True))
    norm = math.sqrt(sum((p - ma) ** 2 for p in ra) * sum((q - mb) ** 2 for q in rb))
    return cov / norm if norm else math.nan


def run_study(settings: StudySettings, *, progress: bool = True) -> dict[str, Any]:
    """Both experiments; returns every figure (``write_study_report`` turns it into files)."""
    settings.check()
    x, y, described = study_data(settings.data, settings.device)
    widths = sorted(set(settings.widths))
    bins = min(settings.bins, widths[0])
    if bins < settings.bins:
        settings.notes.append(f"bins lowered from {settings.bins} to {bins}, the narrowest width")
    train_width = widths[-1]
    ntk_x = x[: settings.ntk_samples].double().cpu()
    convergence: list[dict[str, Any]] = []
    trainability: list[dict[str, Any]] = []
    graphons: dict[tuple[str, float, int], torch.Tensor] = {}
    total = len(settings.methods) * len(settings.sparsities) * settings.seeds * len(widths)
    bar = tqdm(total=total, desc="graphon study", disable=not progress)
    for method in settings.methods:
        for sparsity in settings.sparsities:
            for seed in range(settings.seeds):
                estimates = {}
                for width in widths:
                    model = build_mlp(x.shape[1], width, settings.depth, 10, seed).to(settings.device)
                    masks = _masks(model, method, sparsity, x, y, seed)
                    ordered = [masks[name].cpu() for name in masks]
                    estimates[width] = [estimate_graphon(m.double(), bins) for m in ordered[1:-1]]
                    if seed == 0:
                        graphons[(method, sparsity, width)] = estimates[width][len(estimates[width]) // 2]
                    if width == train_width:
                        layer_graphons, readout, order = ordered_graphons(ordered, settings.ntk_bins)
                        gram = graphon_ntk(ntk_x[:, order], layer_graphons, readout=readout)
                        apply_masks_(model, masks)
                        losses = train_losses(model, masks, x, y, settings, seed)
                        trainability.append(
                            {
                                "method": method,
                                "sparsity": sparsity,
                                "seed": seed,
                                "losses": losses,
                                "eigenvalues": torch.linalg.eigvalsh(gram).flip(0).tolist(),
                                **early_training(losses),
                                **spectral_summary(gram),
                            }
                        )
                    bar.update()
                for width in widths:
                    widest = estimates[train_width]
                    convergence.append(
                        {
                            "method": method,
                            "sparsity": sparsity,
                            "seed": seed,
                            "width": width,
                            "l2": statistics.fmean(
                                l2_distance(a, b) for a, b in zip(estimates[width], widest, strict=True)
                            ),
                            "cut": statistics.fmean(
                                cut_distance(a, b) for a, b in zip(estimates[width], widest, strict=True)
                            ),
                        }
                    )
    bar.close()
    configs = _config_means(trainability)
    correlations = {
        target: {
            key: spearman([c[key] for c in configs], [c[target] for c in configs]) for key in SPECTRAL_KEYS
        }
        for target in TRAINING_KEYS
    }
    return {
        "settings": {k: v for k, v in vars(settings).items() if k != "notes"} | {"bins_used": bins},
        "data": described,
        "train_width": train_width,
        "convergence": convergence,
        "trainability": trainability,
        "config_means": configs,
        "spearman": correlations,
        "graphons": graphons,
        "notes": settings.notes,
    }


def _config_means(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed means of the spectral quantities and the loss drop, per (method, sparsity)."""
    keys = sorted({(r["method"], r["sparsity"]) for r in runs}, key=lambda k: (k[0], k[1]))
    means = []
    for method, sparsity in keys:
        group = [r for r in runs if (r["method"], r["sparsity"]) == (method, sparsity)]
        means.append(
            {"method": method, "sparsity": sparsity}
            | {k: statistics.fmean(r[k] for r in group) for k in (*SPECTRAL_KEYS, *TRAINING_KEYS)}
        )
    return means
