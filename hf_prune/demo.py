"""``hf-prune demo``: the main job on the embedded default model, with no Hub and no shared assets.

Trains (once, cached) a small Llama on Python's own documentation text, removes 2 of its 6 layers with
ReplaceMe and with layer_drop, evaluates both against the original, saves the ReplaceMe result, reloads
it in a fresh Python process that never imports hf_prune, and prints a table.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from .evals.demo_model import demo_model_dir, demo_text_splits
from .evals.report import write_report
from .pipeline import prune

_RELOAD_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, ids = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
generated = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
text = tokenizer.decode(generated[0][len(ids):], skip_special_tokens=True)
print(json.dumps({"logits": logits.tolist(), "text": text,
                  "hf_prune_imported": "hf_prune" in sys.modules,
                  "layers": model.config.num_hidden_layers}))
"""


def reload_in_fresh_process(folder: Path, input_ids: list[int]) -> dict:
    """Load ``folder`` with plain transformers in a new interpreter; return its logits and a generation."""
    done = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, str(folder), json.dumps(input_ids)],
        capture_output=True,
        text=True,
        check=True,
        env=None,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_demo(output: Path, *, num_layers: int = 2, progress: bool = True) -> dict:
    start = time.perf_counter()
    model_dir = demo_model_dir()
    print(
        f"demo model: {model_dir} (built in {time.perf_counter() - start:.0f}s)"
        if time.perf_counter() - start > 5
        else f"demo model: {model_dir} (cached)"
    )
    data_dir = output / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    splits = demo_text_splits()
    for split in ("calibration", "eval"):
        (data_dir / f"{split}.txt").write_text(splits[split], encoding="utf-8")
    common = {
        "model": str(model_dir),
        "calibration": {
            "data": str(data_dir / "calibration.txt"),
            "num_samples": 64,
            "seq_len": 128,
            "packing": True,
        },
        "evaluate": [{"task": "perplexity", "data": str(data_dir / "eval.txt"), "seq_len": 128}],
    }
    results = {}
    for method in ("replaceme", "layer_drop"):
        recipe = {
            **common,
            "output": str(output / method),
            "stages": [{"method": method, "num_layers": num_layers}],
        }
        results[method] = prune(recipe, progress=progress)

    replaceme = results["replaceme"]
    probe = replaceme.tokenizer("The for statement is used to iterate over the elements of a sequence.")[
        "input_ids"
    ]
    reloaded = reload_in_fresh_process(replaceme.output, probe)
    with torch.no_grad():
        in_memory = replaceme.model(torch.tensor([probe])).logits[0]
    max_diff = (in_memory - torch.tensor(reloaded["logits"])).abs().max().item()

    evaluation = replaceme.report["evaluation"][0]
    rows = [
        (
            "original",
            replaceme.stages[0]["layers_before"],
            replaceme.report["params_before"],
            evaluation["original"]["perplexity"],
            1.0,
            None,
        )
    ]
    for method, result in results.items():
        stage, scores = result.stages[0], result.report["evaluation"][0]
        rows.append(
            (
                method,
                stage["layers_after"],
                result.report["params_after"],
                scores["pruned"]["perplexity"],
                scores["retained"],
                stage["seconds"],
            )
        )
    print()
    print(f"{'model':<12} {'layers':>6} {'parameters':>11} {'perplexity':>11} {'retained':>9} {'seconds':>8}")
    for name, layers, params, ppl, retained, seconds in rows:
        print(
            f"{name:<12} {layers:>6} {params:>11,} {ppl:>11.2f} {retained:>9.1%} "
            f"{'' if seconds is None else f'{seconds:.2f}':>8}"
        )
    runs = [
        {
            "label": method,
            "params_before": result.report["params_before"],
            "params_after": result.report["params_after"],
            "evaluation": result.report["evaluation"],
        }
        for method, result in results.items()
    ]
    report = write_report(
        output, title="hf-prune demo: ReplaceMe vs layer_drop on the embedded model", runs=runs
    )
    removed = replaceme.stages[0]["removed_layers"]
    print(
        f"\nremoved layers {removed} (angular distance); perplexity on held-out pydoc text, 128-token windows"
    )
    print(f"ReplaceMe checkpoint: {replaceme.output}")
    print(
        f"reloaded with plain transformers in a fresh process (hf_prune imported there: "
        f"{reloaded['hf_prune_imported']}): {reloaded['layers']} layers, max |logit diff| {max_diff:.2e}"
    )
    print(f"greedy continuation of the probe sentence by the reloaded model: {reloaded['text']!r}")
    print(f"report with plots: {report}")
    print(f"demo finished in {time.perf_counter() - start:.0f}s")
    return {"results": results, "max_logit_diff": max_diff, "reloaded": reloaded}
