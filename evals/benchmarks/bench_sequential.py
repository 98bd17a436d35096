"""Benchmark the layer-by-layer engine: peak memory against the weights, wall time against the in-memory
path, data-parallel processes, and ReplaceMe's cut chosen by residual.

    python -m hf_prune.evals.benchmarks.bench_sequential [--big-gb 4] [--cases fits,cut,llama,mixtral]
        [--processes 2]

(``--cases retainer``: the prompt retainer trained layer by layer, ``bench_sequential_retainer``.)

Every prune runs in a child process (``python -m hf_prune prune RECIPE``, or under torchrun) that reports
its own peak RSS; ratios are against figures measured in the same run. The random models are built once,
deterministically, under ``$HF_PRUNE_CACHE/bench`` (default ``~/.cache/hf_prune/bench``), outside the repo.
Prints figures; it passes or fails nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from ...activations import capture_outputs, run_decoder
from ...adapters import get_adapter
from ...calibration import build_calibration
from ...recipe import CalibrationConfig, build_dataclass
from ..training import cache_root, default_assets_dir

CHILD = """
import json, resource, sys, threading, time
peak_anon = [0]

def sample():  # anonymous memory (RssAnon): RSS less the file pages mapped from disk (reclaimable)
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
from hf_prune.cli import main
started = time.perf_counter()
code = main(sys.argv[1:])
print("\\nCHILD " + json.dumps({"code": code, "seconds": time.perf_counter() - started, "peak_anon": peak_anon[0],
                               "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
sys.exit(code)
"""
BASELINE = """
import json, resource
import hf_prune.cli, transformers, torch  # what every child imports before it prunes
print("CHILD " + json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_child(recipe: dict, work: Path, processes: int = 1) -> dict:
    """Prune ``recipe`` in a fresh process (or ``processes`` under torchrun); its seconds and peak RSS."""
    path = work / f"recipe-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, 2 // processes))}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        script = work / "child.py"
        script.write_text(CHILD)
        command = [*launcher, str(script), "prune", str(path), "--quiet"]
    else:
        command = [*launcher, "-c", CHILD, "prune", str(path), "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    # the processes of a torchrun share one stdout: their lines may interleave
    children = [json.loads(found) for found in re.findall(r"CHILD (\{[^{}]*\})", done.stdout)]
    report = json.loads((Path(recipe["output"]) / "hf_prune.json").read_text())
    return {
        "wall": wall,
        "peak_rss": max(c["peak_rss"] for c in children),
        "peak_anon": max(c["peak_anon"] for c in children),
        "stage_seconds": report["stages"][0]["seconds"],
        "report": report,
    }


def import_baseline() -> int:
    done = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.split("CHILD ", 1)[1])["peak_rss"]


def max_weight_difference(a: Path, b: Path) -> float:
    def tensors(folder: Path) -> dict:
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            found.update(load_file(str(file)))
        return found

    x, y = tensors(a), tensors(b)
    if x.keys() != y.keys():
        return float("inf")
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def build_model(folder: Path, model: torch.nn.Module, tokenizer, shard: str) -> Path:
    if not (folder / "config.json").exists():
        partial = folder.with_name(folder.name + ".partial")
        model.save_pretrained(partial, max_shard_size=shard)
        tokenizer.save_pretrained(partial)
        partial.rename(folder)
    return folder


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def forward_seconds(folder: Path, calibration: CalibrationConfig) -> float:
    """One plain forward pass over the calibration batches (best of 3), in this process."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    adapter = get_adapter(model.config)
    batches = build_calibration(calibration, tokenizer)
    layers = adapter.layers(model)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for batch in batches:
            with capture_outputs({}, stop_after=layers[-1]):
                run_decoder(adapter.decoder(model), batch)
        best = min(best, time.perf_counter() - started)
    return best


def gb(count: float) -> str:
    return f"{count / 1e9:.2f} GB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--assets", type=Path, default=default_assets_dir())
    parser.add_argument("--big-gb", type=float, default=4.0, help="size of the big random Llama's weights")
    parser.add_argument(
        "--cases",
        default="fits,cut,llama,mixtral",
        help="comma-separated: fits (in memory vs sequential vs processes), cut (stories260K cut selection), "
        "llama (big Llama, ReplaceMe), mixtral (big Mixtral, frequency and DiEP), diep (DiEP on the "
        "trained MoE testbed, in memory vs sequential, with an evaluate: section), retainer (adtp prompt "
        "pruning's retainer trained on the model that fits and on the big Llama)",
    )
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    cases = set(args.cases.split(","))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = cache_root() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_sequential_"))
    stories = args.assets / "models" / "stories260K"
    sample = args.assets / "text" / "tinystories" / "sample.txt"
    wikitext = args.assets / "text" / "wikitext-2" / "valid.txt"  # calibration text for the random models
    tokenizer = AutoTokenizer.from_pretrained(stories)
    baseline = import_baseline()
    print(f"work folder {work}; a child process that only imports hf_prune peaks at {gb(baseline)} RSS")

    if "fits" in cases:
        fits_case(cache, tokenizer, wikitext, work, args.processes)
    if "cut" in cases:  # ReplaceMe's cut on stories260K: angular distance against residual and loss
        residual_cut(stories, sample, work)
    # Models larger than we would like in memory: peak RSS against the weights.
    if "llama" in cases:
        big_llama(cache, tokenizer, wikitext, work, args.big_gb, baseline)
    if "mixtral" in cases:
        big_mixtral(cache, tokenizer, wikitext, work, args.big_gb, baseline)
    if "diep" in cases:
        diep_on_the_moe_testbed(work)
    if "retainer" in cases:
        from .bench_sequential_retainer import retainer_cases

        retainer_cases(cache, tokenizer, sample, work, args.big_gb, baseline)


def diep_on_the_moe_testbed(work: Path) -> None:
    """DiEP keeping 75% of the experts (per-layer counts) on the trained MoE testbed, in memory and layer by
    layer, each scored by the recipe's evaluate: section (perplexity on the testbed's three domains)."""
    from ..testbeds.moe_testbed import moe_testbed_dir

    folder = moe_testbed_dir()
    domains = ("stories", "shakespeare", "wikitext")
    base = {
        "model": str(folder),
        "calibration": {
            "data": str(folder / "data" / "calibration.txt"),
            "num_samples": 64,
            "seq_len": 128,
            "packing": True,
        },
        "stages": [{"method": "expert_pruning", "algorithm": "diep", "keep_ratio": 0.75}],
        "evaluate": [
            {"task": "perplexity", "data": str(folder / "data" / f"eval_{d}.txt"), "seq_len": 128}
            for d in domains
        ],
        "overwrite": True,
    }
    runs = {
        engine: run_child({**base, "output": str(work / f"diep-{engine}"), "engine": engine}, work)
        for engine in ("in_memory", "sequential")
    }
    print(
        "\n## MoE testbed (4 layers x 8 experts, trained), DiEP keeping 75% (per-layer counts), 64 x 128 tokens"
    )
    print(
        f"{'engine':<12} {'stage s':>8} {'wall s':>7} {'peak RSS':>9}  "
        f"perplexity original -> pruned ({', '.join(domains)})"
    )
    for engine, run in runs.items():
        entries = run["report"]["evaluation"]
        figures = ", ".join(
            f"{e['original']['perplexity']:.2f} -> {e['pruned']['perplexity']:.2f}" for e in entries
        )
        print(
            f"{engine:<12} {run['stage_seconds']:>8.2f} {run['wall']:>7.1f} {gb(run['peak_rss']):>9}  {figures}"
        )
    kept = {e: [layer["kept"] for layer in r["report"]["stages"][0]["layers"]] for e, r in runs.items()}
    print("same experts kept:", kept["in_memory"] == kept["sequential"], kept["sequential"])
    print(
        "max |dW| sequential vs in memory:",
        f"{max_weight_difference(work / 'diep-in_memory', work / 'diep-sequential'):.2e}",
    )


def fits_case(cache: Path, tokenizer, wikitext: Path, work: Path, processes: int) -> None:
    """The model of bench_replaceme that fits: in memory vs layer by layer vs several processes."""
    hidden = 512
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=16,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    fits = build_model(cache / "llama-16x512", LlamaForCausalLM(config), tokenizer, "5GB")
    calibration = {"data": str(wikitext), "num_samples": 64, "seq_len": 256, "batch_size": 8, "packing": True}
    floor = forward_seconds(fits, build_dataclass(CalibrationConfig, calibration, "calibration"))
    stage = {"method": "replaceme", "num_layers": 4}
    base = {"model": str(fits), "calibration": calibration, "stages": [stage], "overwrite": True}
    runs = {
        "in_memory": run_child({**base, "output": str(work / "mem"), "engine": "in_memory"}, work),
        "sequential": run_child({**base, "output": str(work / "seq"), "engine": "sequential"}, work),
        f"sequential, {processes} processes": run_child(
            {**base, "output": str(work / "seq-dp"), "engine": "sequential"}, work, processes
        ),
        f"in_memory, {processes} processes": run_child(
            {**base, "output": str(work / "mem-dp"), "engine": "in_memory"}, work, processes
        ),
    }
    print(
        f"\n## random Llama 16x{hidden} ({gb(weights_bytes(fits))}), ReplaceMe removing 4 layers, "
        "64 x 256 tokens of WikiText-2 valid"
    )
    print(f"one forward pass over the calibration data (best of 3, in-process): {floor:.2f} s")
    print(
        f"{'engine':<28} {'stage s':>8} {'x forward':>9} {'wall s':>7} {'x in-mem':>8} {'peak RSS':>9} {'max |dW|':>9}"
    )
    for name, run in runs.items():
        folder = Path(run["report"]["recipe"]["output"])
        difference = max_weight_difference(work / "mem", folder)
        print(
            f"{name:<28} {run['stage_seconds']:>8.2f} {run['stage_seconds'] / floor:>9.2f} {run['wall']:>7.1f} "
            f"{run['wall'] / runs['in_memory']['wall']:>8.2f} {gb(run['peak_rss']):>9} {difference:>9.2e}"
        )
    print("removed layers:", {k: v["report"]["stages"][0]["removed_layers"] for k, v in runs.items()})
    # The children run under a memory sampler thread and start cold; the floor is warm, in this process.
    # The same stages in this process, after the floor, compare like with like.
    from ... import prune

    print("in this process, as the floor was measured:")
    for engine in ("in_memory", "sequential"):
        stage_s = prune(
            {**base, "output": str(work / f"in-process-{engine}"), "engine": engine}, progress=False
        )
        seconds = stage_s.report["stages"][0]["seconds"]
        print(f"  {engine:<12} stage {seconds:.2f} s = {seconds / floor:.2f} x forward")


def residual_cut(stories: Path, sample: Path, work: Path) -> None:
    from transformers import AutoModelForCausalLM

    from ...calibration import self_generated_texts
    from ..perplexity import DEFAULT_DOCUMENT_SEPARATOR, evaluate_perplexity

    print("\n## stories260K, ReplaceMe removing 2 of 5 layers: which cut each selection picks")
    # Calibrated on text the model samples itself (as bench_replaceme), scored on the TinyStories sample.
    tokenizer = AutoTokenizer.from_pretrained(stories)
    model = AutoModelForCausalLM.from_pretrained(stories).eval()
    texts = self_generated_texts(model, tokenizer, num_samples=64, max_new_tokens=256)
    (work / "self-generated.txt").write_text("\n\n".join(t.replace("\n\n", "\n") for t in texts) + "\n")
    calibration = {
        "data": str(work / "self-generated.txt"),
        "num_samples": 64,
        "seq_len": 256,
        "batch_size": 8,
    }
    for selection in ("angular", "residual", "loss"):
        stage = {"method": "replaceme", "num_layers": 2, "cut_selection": selection}
        recipe = {
            "model": str(stories),
            "output": str(work / f"stories-{selection}"),
            "calibration": calibration,
        }
        run = run_child({**recipe, "stages": [stage], "overwrite": True}, work)
        model = AutoModelForCausalLM.from_pretrained(work / f"stories-{selection}").eval()
        ppl = evaluate_perplexity(
            model,
            tokenizer,
            sample,
            seq_len=512,
            progress=False,
            document_separator=DEFAULT_DOCUMENT_SEPARATOR,
        )["perplexity"]
        report = run["report"]["stages"][0]
        scores = (
            report.get("candidate_losses")
            or report.get("candidate_residuals")
            or report.get("candidate_distances")
        )
        print(
            f"{selection:<9} kept layer {report['cuts'][0]['kept_layer']}, removed {report['removed_layers']}: "
            f"perplexity {ppl:.2f} on {sample.name}; candidate scores {scores}"
        )


def big_llama_folder(cache: Path, tokenizer, size_gb: float) -> Path:
    """A random Llama of about ``size_gb`` GB of float32 weights, built once under ``cache``."""
    hidden, intermediate = 2048, 5632
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate
    layers = max(2, int((size_gb * 1e9 / 4 - 2 * 32000 * hidden) // per_layer))
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=1024,
    )
    folder = cache / f"llama-{layers}x{hidden}"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        build_model(folder, LlamaForCausalLM(config), tokenizer, "1GB")
    return folder


def big_llama(cache: Path, tokenizer, sample: Path, work: Path, size_gb: float, baseline: int) -> None:
    folder = big_llama_folder(cache, tokenizer, size_gb)
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    stage = {"method": "replaceme", "num_layers": layers // 4}
    _big_case(f"random Llama {folder.name}", folder, stage, sample, work, baseline)


def big_mixtral(cache: Path, tokenizer, sample: Path, work: Path, size_gb: float, baseline: int) -> None:
    hidden, intermediate, experts = 1024, 1792, 8
    per_layer = 4 * hidden * hidden + experts * 3 * hidden * intermediate
    layers = max(2, int((size_gb * 1e9 / 4 - 2 * 32000 * hidden) // per_layer))
    config = MixtralConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
    )
    folder = cache / f"mixtral-{layers}x{hidden}x{experts}"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        build_model(folder, MixtralForCausalLM(config), tokenizer, "1GB")
    title = f"random Mixtral {layers}x{hidden}, {experts} experts"
    stage = {"method": "expert_pruning", "algorithm": "frequency", "keep_ratio": 0.5, "uniform": False}
    _big_case(title, folder, stage, sample, work, baseline)
    # DiEP: every step runs the layers forward and back (two reads of each from disk); one α epoch here
    diep = {"method": "expert_pruning", "algorithm": "diep", "keep_ratio": 0.5, "epochs": 1}
    _big_case(title, folder, diep, sample, work, baseline)


def _big_case(title: str, folder: Path, stage: dict, sample: Path, work: Path, baseline: int) -> dict:
    size = weights_bytes(folder)
    calibration = {"data": str(sample), "num_samples": 16, "seq_len": 128, "batch_size": 4, "packing": True}
    recipe = {
        "model": str(folder),
        "output": str(work / folder.name),
        "calibration": calibration,
        "stages": [stage],
        "engine": "sequential",
        "activation_memory_gb": 0.25,
        "overwrite": True,
    }
    run = run_child(recipe, work)
    stage_report = run["report"]["stages"][0]
    what = stage["method"] + (f" {stage['algorithm']}" if "algorithm" in stage else "")
    print(f"\n## {title}: weights {gb(size)}, {what}, engine sequential, 16 x 128 tokens")
    print(
        f"peak RSS {gb(run['peak_rss'])} = {run['peak_rss'] / size:.2f} x the weights "
        f"({(run['peak_rss'] - baseline) / size:.2f} x above the import-only child); anonymous (not file pages "
        f"mapped from the checkpoint) {gb(run['peak_anon'])} = {run['peak_anon'] / size:.2f} x; "
        f"wall {run['wall']:.0f} s (stage {run['stage_seconds']:.0f} s); "
        f"activations spilled {gb(stage_report['activations']['spilled_bytes'])}"
    )
    shutil.rmtree(work / folder.name, ignore_errors=True)  # gigabytes: do not keep them
    return run


if __name__ == "__main__":
    main()
