"""Benchmark ReplaceMe (lstsq, cosine) against layer_drop: time, peak memory, parameters, quality.

    python -m hf_prune.evals.benchmarks.bench_replaceme [--assets ../shared/assets] \
        [--large-layers 16 --large-hidden 512]

Cases: the real stories260K (quality on TinyStories text; calibrated on text it generates itself) and a
larger random Llama (timing and memory only: its perplexity means nothing). Times are ratios to the
floor: plain forward passes over the same calibration batches, measured in the same run. Prints figures;
it passes or fails nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import threading
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ...activations import capture_outputs, run_decoder
from ...adapters import count_parameters, get_adapter
from ...calibration import CalibrationBatch, self_generated_texts, tokenize_calibration
from ...context import PruneContext
from ...recipe import CalibrationConfig, build_dataclass
from ...registry import get_method, run_stage
from ..perplexity import DEFAULT_DOCUMENT_SEPARATOR, evaluate_perplexity

VARIANTS = [
    ("replaceme", {"estimator": "lstsq"}),
    ("replaceme", {"estimator": "cosine"}),  # official settings: lr 1e-4, 10 epochs
    ("replaceme", {"estimator": "cosine", "lr": 1e-3, "cosine_loss": "full"}),
    ("layer_drop", {}),
]


class PeakMemory:
    """Peak memory during a block: the CUDA allocator on GPU, sampled process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            process = psutil.Process()
            self.base = self.peak = process.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, process.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def forward_floor(model, adapter, batches: list[CalibrationBatch], depth: int) -> float:
    """Seconds for plain forward passes through the first ``depth`` decoder layers."""
    layers = adapter.layers(model)
    start = time.perf_counter()
    for batch in batches:
        with capture_outputs({}, stop_after=layers[depth - 1]):
            run_decoder(adapter.decoder(model), batch)
    return time.perf_counter() - start


def run_case(
    title: str,
    model,
    tokenizer,
    texts: list[str],
    calibration: CalibrationConfig,
    num_layers: int,
    eval_file: Path | None,
) -> None:
    adapter = get_adapter(model.config)
    batches = tokenize_calibration(texts, tokenizer, calibration)
    total_layers = adapter.num_layers(model.config)
    forward_floor(model, adapter, batches[:1], total_layers)  # warm-up
    floor = min(forward_floor(model, adapter, batches, total_layers) for _ in range(3))
    tokens = sum(b.num_tokens for b in batches)
    print(
        f"\n## {title}: {total_layers} layers, {count_parameters(model):,} parameters, "
        f"remove {num_layers}; calibration {len(batches)} batches, {tokens:,} tokens"
    )
    print(f"floor (one full forward pass over the calibration data, best of 3): {floor:.2f}s")
    baseline_ppl = None
    if eval_file is not None:
        baseline_ppl = _perplexity(model, tokenizer, eval_file)
        print(f"original perplexity on {eval_file.name}: {baseline_ppl:.3f}")
    header = f"{'method':<52} {'removed':>16} {'params':>8} {'time':>7} {'x floor':>8} {'peak MiB':>9} {'rel.err':>8}"
    print(header + ("  perplexity  retained" if eval_file else ""))
    for method, fields in VARIANTS:
        pruned = copy.deepcopy(model)
        config = build_dataclass(get_method(method).config_cls, {"num_layers": num_layers, **fields}, method)
        context = PruneContext(adapter, tokenizer, calibration, progress=False, _batches=batches)
        with PeakMemory(next(model.parameters()).device) as memory:
            report = run_stage(get_method(method), pruned, config, context).to_dict()
        cut = report["cuts"][0]
        error = cut.get("relative_error_with_map", cut.get("relative_error_without_map"))
        label = method + "".join(f" {k}={v}" for k, v in fields.items())
        line = (
            f"{label:<52} {str(report['removed_layers']):>16} "
            f"{count_parameters(pruned) / count_parameters(model):>8.1%} {report['seconds']:>6.2f}s "
            f"{report['seconds'] / floor:>8.2f} {memory.extra_mib:>9.1f} "
            f"{'' if error is None else f'{error:.3f}':>8}"
        )
        if eval_file is not None:
            ppl = _perplexity(pruned, tokenizer, eval_file)
            line += f"  {ppl:>10.3f}  {baseline_ppl / ppl:>8.1%}"
        print(line)


def _perplexity(model, tokenizer, path: Path) -> float:
    return evaluate_perplexity(
        model, tokenizer, path, seq_len=512, progress=False, document_separator=DEFAULT_DOCUMENT_SEPARATOR
    )["perplexity"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--assets", default=str(Path(__file__).resolve().parents[3] / "shared" / "assets"))
    parser.add_argument("--large-layers", type=int, default=16)
    parser.add_argument("--large-hidden", type=int, default=512)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    assets = Path(args.assets)
    stories = assets / "models" / "stories260K"
    tokenizer = AutoTokenizer.from_pretrained(stories, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(stories, trust_remote_code=False).to(device).eval()
    texts = self_generated_texts(model, tokenizer, num_samples=args.num_samples, max_new_tokens=args.seq_len)
    calibration = build_dataclass(
        CalibrationConfig,
        {"data": "self-generated", "num_samples": args.num_samples, "seq_len": args.seq_len, "batch_size": 8},
        "calibration",
    )
    sample = assets / "text" / "tinystories" / "sample.txt"
    for removed in (1, 2):
        run_case(
            f"stories260K (self-generated calibration, eval {sample.name})",
            model,
            tokenizer,
            texts,
            calibration,
            removed,
            sample,
        )

    hidden = args.large_hidden
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=args.large_layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    large = LlamaForCausalLM(config).to(device).eval()
    run_case(
        f"random Llama {args.large_layers}x{hidden} (timing and memory only)",
        large,
        tokenizer,
        texts,
        calibration,
        args.large_layers // 4,
        None,
    )


if __name__ == "__main__":
    main()
