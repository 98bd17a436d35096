"""Expert pruning on the MoE testbed: per-domain perplexity, search time, and what the checkpoints cost to load.

    python -m hf_prune.evals.benchmarks.bench_experts [--keep 0.75 0.5] [--skip-quality] [--skip-load]

Builds (or reuses) the cached testbed of ``hf_prune.evals.testbeds.moe_testbed`` (needs ../shared/assets the first
time), then

1. runs diep (official defaults, and with β starting at 1.0) / frequency / router_weight, uniform and
   non-uniform, at each keep ratio, on the same calibration batches, and prints perplexity per domain,
   parameters, experts per layer and seconds;
2. prints where DiEP's time goes (caching, reconstruction per MoE layer, language-model loss);
3. saves the original-sized testbed, a uniform and a non-uniform 50% checkpoint through the recipe
   pipeline and loads each in a fresh process (the non-uniform one after ``import hf_prune`` and with
   ``trust_remote_code=True`` without it), printing parameters, safetensors bytes and the peak RSS the
   load adds, as ratios to the original's; then the same for a random Mixtral of ~0.1B parameters
   (the testbed's shape widened), where the load is large enough to measure clearly.

Prints figures; passes or fails nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ...adapters import count_parameters, get_adapter
from ...checkpoint import load_model, load_preprocessor
from ...context import PruneContext
from ...pipeline import prune
from ...recipe import CalibrationConfig, build_dataclass
from ...registry import get_method, run_stage
from ..perplexity import evaluate_perplexity
from ..testbeds.moe_testbed import moe_testbed_dir

DOMAINS = ("stories", "shakespeare", "wikitext")
#: (label, stage fields) of every row; "diep β₀=1" shows the official β schedule's effect.
ALGORITHMS = (
    ("diep", {"algorithm": "diep"}),
    ("diep β₀=1", {"algorithm": "diep", "beta_init": 1.0}),
    ("frequency", {"algorithm": "frequency"}),
    ("router_weight", {"algorithm": "router_weight"}),
)

# Peak RSS added by one from_pretrained and then reading every weight, in a fresh process, sampled every
# millisecond; the modeling code is imported before the baseline is read, so only the load counts.
# Reading matters: safetensors tensors loaded as is stay memory-mapped and count only once touched.
_LOAD_PROBE = """
import json, sys, threading, time
import psutil, torch, transformers
from transformers import AutoModelForCausalLM
if sys.argv[2] == "hf_prune":
    import hf_prune  # noqa: F401
transformers.MixtralForCausalLM  # import the stock modeling module before the baseline
rss = psutil.Process().memory_info
base = peak = rss().rss
done = threading.Event()
def sample():
    global peak
    while not done.is_set():
        peak = max(peak, rss().rss)
        time.sleep(0.001)
thread = threading.Thread(target=sample)
thread.start()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[2] == "remote")
loaded = max(peak, rss().rss)
with torch.no_grad():  # weights mapped from the file count only once read: read every one
    for tensor in model.state_dict().values():
        tensor.float().sum()
done.set()
thread.join()
peak = max(peak, rss().rss)
print(json.dumps({"peak_mib": (peak - base) / 2**20, "load_mib": (loaded - base) / 2**20, "class": type(model).__name__,
                  "parameters": sum(p.numel() for p in model.parameters())}))
"""


def load_peak_mib(folder: Path, how: str) -> dict:
    """Peak RSS increase (MiB) of ``AutoModelForCausalLM.from_pretrained(folder)`` in a fresh process:
    ``load_mib`` right after loading, ``peak_mib`` once every weight has been read as well.

    ``how``: ``plain`` (no hf_prune), ``hf_prune`` (imported first) or ``remote`` (``trust_remote_code``).
    """
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_PROBE, str(folder), how],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--skip-quality", action="store_true", help="skip the perplexity table (steps 1 and 2)"
    )
    parser.add_argument(
        "--skip-load", action="store_true", help="skip the checkpoint save / load measurements"
    )
    args = parser.parse_args(argv)
    folder = moe_testbed_dir()
    tokenizer = load_preprocessor(str(folder))
    original = load_model(str(folder))
    adapter = get_adapter(original.config)
    calibration_fields = {
        "data": str(folder / "data" / "calibration.txt"),
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "packing": True,
    }
    calibration = build_dataclass(CalibrationConfig, calibration_fields, "calibration")
    context = PruneContext(adapter, tokenizer, calibration, progress=False)
    context.calibration_batches()

    if not args.skip_quality:
        print_quality_table(folder, original, context, args.keep)
    if not args.skip_load:
        print_checkpoint_costs(folder, calibration_fields, "MoE testbed checkpoints")
        with tempfile.TemporaryDirectory(prefix="bench-experts-large-") as tmp:
            large = save_large_random_mixtral(folder, Path(tmp) / "mixtral-512x8")
            print_checkpoint_costs(
                large, calibration_fields, "random Mixtral, hidden 512, 8 layers, 8 experts"
            )


def print_quality_table(folder: Path, original, context: PruneContext, keeps: list[float]) -> None:
    """Steps 1 and 2: every algorithm and budget on the testbed, then DiEP's time breakdown."""
    tokenizer, adapter = context.tokenizer, context.adapter

    def perplexities(model) -> list[float]:
        return [
            evaluate_perplexity(
                model, tokenizer, folder / "data" / f"eval_{d}.txt", seq_len=128, progress=False
            )["perplexity"]
            for d in DOMAINS
        ]

    print(
        f"testbed {folder}: {count_parameters(original):,} parameters, experts per layer "
        f"{adapter.experts_per_layer(original)}, calibration "
        f"{sum(b.num_tokens for b in context.calibration_batches()):,} tokens"
    )
    header = f"{'algorithm':<14} {'uniform':<8} {'keep':>5} " + " ".join(f"{d:>12}" for d in DOMAINS)
    print(header + f" {'params':>8} {'seconds':>8}  experts per layer")
    base = perplexities(original)
    print(f"{'original':<14} {'':<8} {1.0:>5.2f} " + " ".join(f"{p:>12.2f}" for p in base) + f" {1.0:>8.1%}")
    diep_reports = {}
    for keep in keeps:
        for label, fields in ALGORITHMS:
            for uniform in (True, False):
                model = load_model(str(folder))
                config = build_dataclass(
                    get_method("expert_pruning").config_cls,
                    {**fields, "keep_ratio": keep, "uniform": uniform},
                    "stage",
                )
                started = time.perf_counter()
                report = run_stage(get_method("expert_pruning"), model, config, context)
                seconds = time.perf_counter() - started
                ppl = perplexities(model)
                print(
                    f"{label:<14} {str(uniform):<8} {keep:>5.2f} "
                    + " ".join(f"{p:>12.2f}" for p in ppl)
                    + f" {count_parameters(model) / count_parameters(original):>8.1%} {seconds:>8.2f}  "
                    f"{adapter.experts_per_layer(model)}"
                )
                if label == "diep" and not uniform:
                    diep_reports[keep] = report.details
                del model, report

    for keep, details in diep_reports.items():
        seconds = details["diep"]["seconds"]
        per_layer = ", ".join(f"layer {e['layer']} {e['scoring_seconds']:.2f}" for e in details["layers"])
        print(
            f"\nDiEP search time, keep {keep} (non-uniform, {details['diep']['cached_tokens']:,} cached tokens, "
            f"{details['calibration_tokens']:,} calibration tokens): total {seconds['total']:.2f} s = caching "
            f"{seconds['cache']:.2f} s + reconstruction per layer ({per_layer}) + language-model loss "
            f"{seconds['lm_loss']:.2f} s"
        )


def print_checkpoint_costs(folder: Path, calibration_fields: dict, title: str) -> None:
    """Save uniform / non-uniform 50% checkpoints of ``folder`` through the pipeline; print sizes and load memory."""
    with tempfile.TemporaryDirectory(prefix="bench-experts-") as tmp:
        outputs = {}
        for name, uniform in (("uniform", True), ("non-uniform", False)):
            out = Path(tmp) / name
            prune(
                {
                    "model": str(folder),
                    "calibration": calibration_fields,
                    "output": str(out),
                    "stages": [
                        {
                            "method": "expert_pruning",
                            "algorithm": "frequency",
                            "keep_ratio": 0.5,
                            "uniform": uniform,
                        }
                    ],
                },
                progress=False,
            )
            outputs[name] = out
        rows = [
            ("original", folder, "plain"),
            ("frequency 50% uniform", outputs["uniform"], "plain"),
            ("frequency 50% non-uniform", outputs["non-uniform"], "hf_prune"),
            ("frequency 50% non-uniform", outputs["non-uniform"], "remote"),
        ]
        print(
            f"\n{title}: ratios are parameters / disk / peak against the original (peak: after reading every weight)"
        )
        print(
            f"{'checkpoint':<27} {'load path':<9} {'class':<34} {'params':>12} {'disk MiB':>9} "
            f"{'load MiB':>9} {'peak MiB':>9}"
        )
        base = None
        for name, path, how in rows:
            probe = load_peak_mib(path, how)
            disk = disk_bytes(path)
            base = base or (probe["parameters"], disk, probe["peak_mib"])
            print(
                f"{name:<27} {how:<9} {probe['class']:<34} {probe['parameters']:>12,} {disk / 2**20:>9.2f} "
                f"{probe['load_mib']:>9.1f} {probe['peak_mib']:>9.1f}   "
                f"{probe['parameters'] / base[0]:.3f} / {disk / base[1]:.3f} / "
                f"{probe['peak_mib'] / base[2]:.3f}"
            )


def save_large_random_mixtral(testbed: Path, out: Path) -> Path:
    """The testbed's architecture and tokenizer, widened to hidden 512 / 8 layers (~0.1B parameters), random weights."""
    config = AutoConfig.from_pretrained(testbed, trust_remote_code=False)
    config.update(
        {
            "hidden_size": 512,
            "intermediate_size": 1024,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 64,
        }
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    load_preprocessor(str(testbed)).save_pretrained(out)
    return out


if __name__ == "__main__":
    main()
