"""``hf-prune graphon``: the graphon study of pruning-at-initialisation scorers, or the per-layer graphons of
a pruned checkpoint (``hf_prune.analysis``). Kept apart from ``cli.py``, which registers it."""

from __future__ import annotations

import argparse
from pathlib import Path

from .analysis.graphon import GraphonError
from .analysis.graphon_report import RESULTS_FILE
from .analysis.mask_sources import masks_from_checkpoint, masks_from_state_file
from .analysis.pai_scorers import SCORERS
from .checkpoint import atomic_write_dir
from .output_safety import check_output_folder

EXAMPLES = """examples:
  hf-prune graphon --method random snip synflow --widths 128 512 --sparsity 0.8 --output out/graphon
  hf-prune graphon --data ../shared/assets/images/fashion-mnist --sparsity 0.5 0.8 0.95 --seeds 3 --output out/g
  hf-prune graphon out/stories-sparse80 --output out/stories-graphons          # a pruned checkpoint's zeros
  hf-prune graphon out/run.checkpoints/checkpoint-100 --output out/masks        # a sparsity callback's masks

Without CHECKPOINT: MLPs (ReLU, no biases) of each width are pruned at initialisation by each scorer;
report.md gives the distance of each width's hidden-layer graphons to the widest one's, and at the widest
width the Graphon NTK's spectral quantities against the early training-loss drop (Spearman). --data is a
folder of MNIST-format IDX files (train-images-idx3-ubyte.gz, ...); without it, synthetic clusters.
Writes PNG figures, report.md and graphon_results.json into --output."""

STATE_FILE = "hf_prune_method_state.safetensors"  # integrations.training_callback.STATE_FILE


def add_graphon_arguments(sub: argparse.ArgumentParser) -> None:
    from .cli import positive_int

    sub.add_argument(
        "checkpoint",
        nargs="?",
        help="a pruned checkpoint folder, a Trainer checkpoint-N folder holding a sparsity callback's "
        f"{STATE_FILE}, or that file; without it, run the study",
    )
    sub.add_argument("--output", required=True, help="folder for the figures, report.md and results")
    sub.add_argument("--method", nargs="+", default=list(SCORERS), choices=SCORERS, help="scorers to study")
    sub.add_argument("--widths", nargs="+", type=positive_int, default=[64, 128, 256, 512], help="MLP widths")
    sub.add_argument("--sparsity", nargs="+", type=float, default=[0.8], help="sparsities in (0, 1)")
    sub.add_argument("--seeds", type=positive_int, default=2, help="seeds per configuration")
    sub.add_argument("--depth", type=positive_int, default=4, help="hidden layers of the MLPs")
    sub.add_argument("--bins", type=positive_int, default=64, help="graphon grid K (K×K blocks)")
    sub.add_argument("--steps", type=positive_int, default=200, help="Adam steps for the early loss drop")
    sub.add_argument("--ntk-samples", type=positive_int, default=256, help="inputs of the NTK Gram matrix")
    sub.add_argument("--ntk-bins", type=positive_int, default=16, help="positions per layer in the NTK")
    sub.add_argument(
        "--data", default=None, help="folder of MNIST-format IDX gzip files (default: synthetic)"
    )
    sub.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda | cuda:N")
    sub.add_argument(
        "--min-sparsity", type=float, default=0.01, help="CHECKPOINT: a weight with fewer zeros is not pruned"
    )
    sub.add_argument("--overwrite", action="store_true", help="replace an --output folder that is not ours")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GraphonError(f"--device: {name} asked for, but this machine has no CUDA device")
    if name != "cpu" and not name.startswith("cuda"):
        raise GraphonError(f"--device: must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def run_graphon(args: argparse.Namespace) -> int:
    from .analysis.graphon_report import write_checkpoint_report, write_study_report
    from .analysis.study import StudySettings, run_study

    output = Path(args.output).expanduser()
    protected = [
        (name, path) for name, path in (("CHECKPOINT", args.checkpoint), ("--data", args.data)) if path
    ]
    earlier = (output / RESULTS_FILE).is_file()
    check_output_folder(output, overwrite=args.overwrite or earlier, protected_files=protected)
    if args.checkpoint is not None:
        source = Path(args.checkpoint).expanduser()
        if source.is_file() or (source / STATE_FILE).is_file():
            masks = masks_from_state_file(source if source.is_file() else source / STATE_FILE)
        else:
            masks = masks_from_checkpoint(source, min_sparsity=args.min_sparsity)

        atomic_write_dir(
            output, lambda folder: write_checkpoint_report(source.name, masks, folder, args.bins)
        )
        print(f"{len(masks)} pruned layers of {source.name}: report.md and graphons.png in {output}")
        return 0
    if args.data is not None and not Path(args.data).expanduser().is_dir():
        raise GraphonError(f"--data: {args.data} is not a folder of IDX files")
    settings = StudySettings(
        methods=args.method,
        widths=args.widths,
        sparsities=args.sparsity,
        seeds=args.seeds,
        depth=args.depth,
        bins=args.bins,
        steps=args.steps,
        ntk_samples=args.ntk_samples,
        ntk_bins=args.ntk_bins,
        data=None if args.data is None else str(Path(args.data).expanduser()),
        device=_device(args.device),
    )
    settings.check()
    results = run_study(settings, progress=not args.quiet)
    atomic_write_dir(output, lambda folder: write_study_report(results, folder))
    rho = ", ".join(f"{k} {v:+.2f}" for k, v in results["spearman"]["loss_drop"].items())
    print(f"graphon study written to {output} (Spearman vs early loss drop: {rho})")
    return 0
