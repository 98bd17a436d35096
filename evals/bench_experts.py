"""Expert pruning on the MoE testbed: per-domain perplexity and search time for every algorithm and budget.

    python -m hf_prune.evals.bench_experts [--keep 0.75 0.5]

Builds (or reuses) the cached testbed of ``hf_prune.evals.moe_testbed`` (needs ../shared/assets the first
time), then runs diep / frequency / router_weight, uniform and non-uniform, at each keep ratio, with the
same calibration batches, and prints perplexity per domain, parameters, experts per layer and seconds.
Prints figures; passes or fails nothing.
"""

from __future__ import annotations

import argparse
import time

from ..adapters import count_parameters, get_adapter
from ..checkpoint import load_model, load_preprocessor
from ..context import PruneContext
from ..recipe import CalibrationConfig, build_dataclass
from ..registry import get_method, run_stage
from .moe_testbed import moe_testbed_dir
from .perplexity import evaluate_perplexity

DOMAINS = ("stories", "shakespeare", "wikitext")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    folder = moe_testbed_dir()
    tokenizer = load_preprocessor(str(folder))
    original = load_model(str(folder))
    adapter = get_adapter(original.config)
    calibration = build_dataclass(CalibrationConfig, {
        "data": str(folder / "data" / "calibration.txt"), "num_samples": args.num_samples, "seq_len": args.seq_len,
        "packing": True}, "calibration")
    context = PruneContext(adapter, tokenizer, calibration, progress=False)
    context.calibration_batches()

    def perplexities(model) -> list[float]:
        return [evaluate_perplexity(model, tokenizer, folder / "data" / f"eval_{d}.txt", seq_len=128,
                                    progress=False)["perplexity"] for d in DOMAINS]

    print(f"testbed {folder}: {count_parameters(original):,} parameters, experts per layer "
          f"{adapter.experts_per_layer(original)}, calibration {sum(b.num_tokens for b in context.calibration_batches()):,} tokens")
    header = f"{'algorithm':<14} {'uniform':<8} {'keep':>5} " + " ".join(f"{d:>12}" for d in DOMAINS)
    print(header + f" {'params':>8} {'seconds':>8}  experts per layer")
    base = perplexities(original)
    print(f"{'original':<14} {'':<8} {1.0:>5.2f} " + " ".join(f"{p:>12.2f}" for p in base) + f" {1.0:>8.1%}")
    for keep in args.keep:
        for algorithm in ("diep", "frequency", "router_weight"):
            for uniform in (True, False):
                model = load_model(str(folder))
                config = build_dataclass(get_method("expert_pruning").config_cls,
                                         {"algorithm": algorithm, "keep_ratio": keep, "uniform": uniform}, "stage")
                started = time.perf_counter()
                report = run_stage(get_method("expert_pruning"), model, config, context)
                seconds = time.perf_counter() - started
                ppl = perplexities(model)
                print(f"{algorithm:<14} {str(uniform):<8} {keep:>5.2f} " + " ".join(f"{p:>12.2f}" for p in ppl)
                      + f" {count_parameters(model) / count_parameters(original):>8.1%} {seconds:>8.2f}  "
                      f"{adapter.experts_per_layer(model)}")
                del model, report


if __name__ == "__main__":
    main()
