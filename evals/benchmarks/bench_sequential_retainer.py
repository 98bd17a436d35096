"""``bench_sequential --cases retainer``: the prompt retainer of ``adtp`` prompt pruning trained on the
sequential engine (the model dispatched by accelerate, weights read from disk module by module, decoder
layers under activation checkpointing) against the in-memory path.

- the 16x512 random Llama that fits: training seconds of both engines, peak RSS, and the largest difference
  of the saved tensors (the retainer's; the rest is copied as is);
- the big random Llama (about ``--big-gb`` GB): the sequential engine's peak RSS against the weights.

Prints figures; it passes or fails nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .bench_sequential import _big_case, big_llama_folder, gb, max_weight_difference, run_child

#: a short training: what is measured is memory and the time per step, not the retainer's quality
STAGE = {
    "method": "text_token_pruning",
    "algorithm": "adtp",
    "layer": 2,
    "train_steps": 4,
    "batch_size": 4,
    "max_length": 64,
    "continuation_length": 16,
    "ig_steps": 1,
}


def retainer_cases(cache: Path, tokenizer, sample: Path, work: Path, big_gb: float, baseline: int) -> None:
    stage = {**STAGE, "train_data": str(sample)}
    fits = cache / "llama-16x512"  # built by the fits case
    if (fits / "config.json").exists():
        runs = {
            engine: run_child(
                {
                    "model": str(fits),
                    "output": str(work / f"retainer-{engine}"),
                    "engine": engine,
                    "stages": [stage],
                    "overwrite": True,
                },
                work,
            )
            for engine in ("in_memory", "sequential")
        }
        seconds = {e: r["report"]["stages"][0]["training"]["seconds"] for e, r in runs.items()}
        print(
            f"\n## adtp retainer, {STAGE['train_steps']} steps of {STAGE['batch_size']} x {STAGE['max_length']}"
        )
        print(f"{'engine':<12} {'training s':>10} {'ratio':>6} {'wall s':>7} {'peak RSS':>9}")
        for engine, run in runs.items():
            print(
                f"{engine:<12} {seconds[engine]:>10.2f} {seconds[engine] / seconds['in_memory']:>6.2f} "
                f"{run['wall']:>7.1f} {gb(run['peak_rss']):>9}"
            )
        difference = max_weight_difference(work / "retainer-in_memory", work / "retainer-sequential")
        print(f"max |dW| sequential vs in memory (the retainer; the rest is copied): {difference:.2e}")
        for engine in runs:
            shutil.rmtree(work / f"retainer-{engine}", ignore_errors=True)
    else:
        print("\n(adtp retainer on the model that fits: run the fits case first, it builds llama-16x512)")
    folder = big_llama_folder(cache, tokenizer, big_gb)
    run = _big_case(f"random Llama {folder.name}", folder, stage, sample, work, baseline)
    training = run["report"]["stages"][0]["training"]
    print(f"retainer training {training['seconds']:.0f} s for {training['steps']} steps")
