"""Healing after pruning (``heal``: LoRA through peft, merged): perplexity before and after, against held-out
text, and what healing costs as a ratio to the pruning it follows (wall time, peak memory).

    python -m hf_prune.evals.benchmarks.bench_healing [--assets ../shared/assets] [--steps 200]

Cases:

* stories260K with 2 of its 5 layers removed by ReplaceMe (lstsq); calibration and healing text are
  stories the unpruned model samples itself (data-free, cached under ``$HF_PRUNE_CACHE``); perplexity on
  the real TinyStories sample (never trained on).
* the MoE testbed (``evals/testbeds/moe_testbed.py``) with half its experts removed per layer (DiEP,
  non-uniform); healing on the testbed's three training splits, perplexity on each domain's held-out
  split.

Peak memory: sampled process RSS above the RSS before the stage (CPU) or the CUDA allocator's peak.
Prints figures; passes or fails nothing.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from ...adapters import count_parameters, get_adapter
from ...calibration import self_generated_texts
from ...checkpoint import load_model, load_preprocessor
from ...context import PruneContext
from ...recipe import CalibrationConfig, build_dataclass
from ...registry import get_method, run_stage
from ..perplexity import evaluate_perplexity
from ..testbeds.moe_testbed import DOMAINS, moe_testbed_dir
from .bench_replaceme import PeakMemory


def cache_dir() -> Path:
    return Path(os.environ.get("HF_PRUNE_CACHE", Path.home() / ".cache" / "hf_prune")) / "bench-healing-v1"


def stories_training_text(model_dir: Path) -> Path:
    """400 stories sampled from stories260K (seed 1, 256 new tokens each), cached as a blank-line-separated
    text file: the data-free calibration and healing text."""
    path = cache_dir() / "stories260K-self-generated.txt"
    if not path.exists():
        tokenizer = load_preprocessor(str(model_dir))
        model = load_model(str(model_dir), dtype="float32", device="cpu")
        texts = self_generated_texts(
            model, tokenizer, num_samples=400, max_new_tokens=256, seed=1, batch_size=100
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n\n".join(t.strip().replace("\n\n", "\n") for t in texts), encoding="utf-8")
        tmp.replace(path)
    return path


def run_case(
    title: str,
    folder: Path,
    prune_stage: dict,
    heal_stage: dict,
    calibration: dict,
    eval_files: dict[str, Path],
) -> None:
    tokenizer = load_preprocessor(str(folder))
    model = load_model(str(folder), dtype="float32")
    adapter = get_adapter(model.config)
    device = next(model.parameters()).device
    context = PruneContext(
        adapter, tokenizer, build_dataclass(CalibrationConfig, calibration, "calibration"), progress=False
    )
    context.calibration_batches()

    def perplexities() -> dict[str, float]:
        return {
            name: evaluate_perplexity(model, tokenizer, str(path), seq_len=128, progress=False)["perplexity"]
            for name, path in eval_files.items()
        }

    original, params = perplexities(), count_parameters(model)
    measured = {}
    for label, stage in (("prune", prune_stage), ("heal", heal_stage)):
        spec = get_method(stage["method"])
        config = build_dataclass(spec.config_cls, {k: v for k, v in stage.items() if k != "method"}, label)
        with PeakMemory(device) as memory:
            started = time.perf_counter()
            report = run_stage(spec, model, config, context)
            seconds = time.perf_counter() - started
        measured[label] = (seconds, memory.extra_mib, report.details, perplexities())

    print(f"\n## {title}\n")
    print(f"parameters {params:,} -> {count_parameters(model):,}; device {device}")
    names = list(eval_files)
    print("| model | " + " | ".join(f"perplexity {n}" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    rows = [
        ("original", original),
        ("pruned", measured["prune"][3]),
        ("pruned + healed", measured["heal"][3]),
    ]
    for label, values in rows:
        print(f"| {label} | " + " | ".join(f"{values[n]:.2f}" for n in names) + " |")
    heal = measured["heal"][2]
    print(
        f"\nheal's own held-out check ({heal['eval_data']}, {heal['eval_tokens']:,} tokens): perplexity "
        f"{heal['perplexity_before']:.2f} -> {heal['perplexity_after']:.2f}; {heal['lora_parameters']:,} LoRA "
        f"parameters on {heal['adapted_modules']} modules + {heal['adapted_expert_parameters']} fused expert "
        f"parameters; train loss {heal['train_loss_first']:.3f} -> {heal['train_loss_last']:.3f}"
    )
    (prune_s, prune_mib, _, _), (heal_s, heal_mib, _, _) = measured["prune"], measured["heal"]
    print(
        f"wall time: pruning {prune_s:.2f} s, healing {heal_s:.2f} s ({heal_s / prune_s:.1f}x the pruning); "
        f"peak memory above the start: pruning {prune_mib:.1f} MiB, healing {heal_mib:.1f} MiB "
        f"({heal_mib / max(prune_mib, 1e-9):.2f}x)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--assets", type=Path, default=Path("../shared/assets"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip-moe", action="store_true", help="only the stories260K case")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    stories = args.assets / "models" / "stories260K"
    train = stories_training_text(stories)
    heal = {"method": "heal", "steps": args.steps, "seq_len": 128, "batch_size": 16, "learning_rate": 1e-3}
    run_case(
        "stories260K: ReplaceMe removes 2 of 5 layers, then heal",
        stories,
        {"method": "replaceme", "num_layers": 2},
        {**heal, "train_data": str(train), "eval_data": str(args.assets / "text/tinystories/sample.txt")},
        {"data": str(train), "num_samples": 64, "seq_len": 128},
        {"TinyStories sample": args.assets / "text/tinystories/sample.txt"},
    )
    if args.skip_moe:
        return
    folder = moe_testbed_dir(assets=args.assets)
    data = folder / "data"
    mixed = cache_dir() / "moe-testbed-train-mixed.txt"
    if not mixed.exists():
        mixed.parent.mkdir(parents=True, exist_ok=True)
        mixed.write_text(
            "\n\n".join((data / f"train_{d}.txt").read_text(encoding="utf-8") for d in DOMAINS),
            encoding="utf-8",
        )
    run_case(
        "MoE testbed: DiEP removes half the experts of every layer (non-uniform), then heal",
        folder,
        {"method": "expert_pruning", "algorithm": "diep", "keep_ratio": 0.5, "uniform": False},
        {**heal, "train_data": str(mixed), "eval_data": str(data / "calibration.txt")},
        {"data": str(data / "calibration.txt"), "num_samples": 64, "seq_len": 128, "packing": True},
        {d: data / f"eval_{d}.txt" for d in DOMAINS},
    )


if __name__ == "__main__":
    main()
