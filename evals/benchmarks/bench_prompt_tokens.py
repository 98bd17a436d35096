"""Prompt token pruning in a real causal LM: how well it continues a pruned prompt, against prefill FLOPs.

    python -m hf_prune.evals.benchmarks.bench_prompt_tokens [--assets DIR] \
        [--prompt-lengths 128 256] [--continuation 32]

Model: the real stories260K (llama2.c, 5 layers, hidden 64) from the shared assets; text: the real
TinyStories sample there (five stories, 1,879 tokens). Windows: BOS + ``prompt_length`` tokens of
prompt + ``continuation`` tokens, every ``stride`` tokens through the text. For each setting the prompt
goes through the pruned prefill (cache kept) and the continuation through one cached forward, so the
continuation sees the kept prompt tokens in every layer; the figure is its teacher-forced negative
log-likelihood per token (and perplexity), next to the unpruned model's on the same windows. ``random``
is averaged over ``--seeds`` seeds. Prefill FLOPs are analytic (``hf_prune.evals.flops``), over the
prompt, as a ratio to the unpruned prefill.

``fixed`` and ``adtp`` rows (at ``--learned-layers``, default 0 and 2) use a retainer trained by the
pipeline on in-domain text that is not the evaluation text: ``--train-stories`` stories sampled by
stories260K itself from BOS (seed 0, cached under ``~/.cache/hf_prune``), in windows of BOS + 128 prompt +
32 continuation tokens, ``--train-steps`` steps of batch 16. ``adtp`` steers to
``target_ratio`` = the row's keep ratio and chooses its own ratio per prompt: its ``kept`` is what it
achieved (its FLOPs at its mean kept share of the prompt).

Two more rows per ratio cut the prompt before the model with its positions renumbered 0..k-1, as the
previous version of the model did: random, and attention scored at layer 1 (its default; scored as now;
its FLOPs include that scoring pass over layers 0 and 1).
Prints figures; passes or fails nothing.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...checkpoint import load_model, load_preprocessor
from ...pipeline import prune
from ..flops import _layer_costs, analytic_flops_per_token
from ..training import default_assets_dir


def windows(
    token_ids: list[int], bos: int, prompt_length: int, continuation: int, stride: int
) -> torch.Tensor:
    """[N, 1 + prompt_length + continuation]: BOS then consecutive text tokens, one window every ``stride``."""
    size = prompt_length + continuation
    starts = range(0, len(token_ids) - size + 1, stride)
    return torch.tensor([[bos, *token_ids[s : s + size]] for s in starts])


@torch.no_grad()
def continuation_nll(
    model, batch: torch.Tensor, prompt_length: int, keep: torch.Tensor | None = None
) -> dict:
    """Mean NLL per continuation token after a cached prefill of the prompt (BOS + ``prompt_length``), and
    the kept prompt tokens per window. With ``keep`` ([N, P] bool), the stock ``model`` gets only those
    prompt tokens, renumbered (the prompt cut before the model)."""
    prompts, targets = batch[:, : prompt_length + 1], batch[:, prompt_length + 1 :]
    if keep is not None:
        prompts = prompts[keep].view(prompts.shape[0], -1)
    prefill = model(input_ids=prompts, use_cache=True)
    rest = model(input_ids=targets[:, :-1], cache=prefill.cache).logits
    logits = torch.cat([prefill.logits[:, -1:], rest], dim=1)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    kept = getattr(prefill, "kept_tokens", None)
    return {
        "nll": float(nll),
        "kept": float(kept.sum(1).float().mean()) if kept is not None else prompts.shape[1],
        "keep": kept,
    }


def pruned_model(model, algorithm: str, keep_ratio: float, layer: int, seed: int = 0):
    stage = {
        "method": "text_token_pruning",
        "algorithm": algorithm,
        "keep_ratio": keep_ratio,
        "layer": layer,
        "seed": seed,
    }
    return prune(model, {"stages": [stage]}, progress=False).model.eval()


def sampled_stories(model, tokenizer, count: int) -> Path:
    """A text file of ``count`` stories stories260K samples from BOS (seed 0), cached outside the repository."""
    from ...calibration import self_generated_texts

    path = (
        Path.home() / ".cache" / "hf_prune" / "bench_prompt_tokens" / f"stories260K-samples-{count}-seed0.txt"
    )
    if not path.exists():
        texts = self_generated_texts(
            model, tokenizer, num_samples=count, max_new_tokens=256, seed=0, batch_size=64
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(text.strip() for text in texts))
    return path


def trained_models(model, tokenizer, train_data: Path, keep_ratios, layers, steps: int) -> dict:
    """{(algorithm, layer, keep_ratio): (model with a trained retainer, training summary)}."""
    trained = {}
    for ratio in keep_ratios:
        for layer in layers:
            for algorithm in ("fixed", "adtp"):
                stage = {
                    "method": "text_token_pruning",
                    "algorithm": algorithm,
                    "layer": layer,
                    "train_data": str(train_data),
                    "train_steps": steps,
                    "batch_size": 16,
                    "max_length": 161,
                    "continuation_length": 32,
                    "learning_rate": 3e-3,
                    **({"keep_ratio": ratio} if algorithm == "fixed" else {"target_ratio": ratio}),
                }
                started = time.perf_counter()
                result = prune(model, {"stages": [stage]}, tokenizer=tokenizer, progress=False)
                summary = {
                    **result.report["stages"][0]["training"],
                    "seconds": round(time.perf_counter() - started, 1),
                }
                print(f"trained {algorithm} layer {layer} keep {ratio}: {summary}", flush=True)
                trained[algorithm, layer, ratio] = (result.model.eval(), summary)
    return trained


def prefill_flops(config, prompt_tokens: int) -> float:
    return analytic_flops_per_token(config, prompt_tokens)["prefill_flops_per_token"] * prompt_tokens


def run(model, batch: torch.Tensor, prompt_length: int, keep_ratios, seeds: int, trained: dict) -> list[dict]:
    layers = model.config.num_hidden_layers
    base = continuation_nll(model, batch, prompt_length)
    full_flops = prefill_flops(model.config, prompt_length + 1)
    rows = [{"setting": "unpruned", "layer": "-", "keep_ratio": 1.0, **base, "flops": 1.0}]
    for ratio in keep_ratios:
        for algorithm in ("attention", "random"):
            for layer in range(0 if algorithm == "random" else 1, layers):
                runs = [
                    continuation_nll(pruned, batch, prompt_length)
                    for pruned in (
                        pruned_model(model, algorithm, ratio, layer, seed)
                        for seed in range(seeds if algorithm == "random" else 1)
                    )
                ]
                config = pruned_model(model, algorithm, ratio, layer).config
                rows.append(
                    {
                        "setting": algorithm,
                        "layer": layer,
                        "keep_ratio": ratio,
                        "nll": statistics.mean(r["nll"] for r in runs),
                        "kept": runs[0]["kept"],
                        "flops": prefill_flops(config, prompt_length + 1) / full_flops,
                    }
                )
        for (algorithm, layer, trained_ratio), (learned, _) in trained.items():
            if trained_ratio != ratio:
                continue
            result = continuation_nll(learned, batch, prompt_length)
            config = copy.deepcopy(learned.config)
            achieved = (result["kept"] - 2) / (prompt_length + 1 - 2)  # the share of the eligible tokens kept
            config.token_pruning = {**config.token_pruning, "keep_ratio": achieved}
            rows.append(
                {
                    "setting": algorithm,
                    "layer": layer,
                    "keep_ratio": ratio,
                    "nll": result["nll"],
                    "kept": result["kept"],
                    "flops": prefill_flops(config, prompt_length + 1) / full_flops,
                }
            )
            if algorithm == "adtp":  # the ratios it chose, per window: kept = 2 + ⌈ρ·(n − 2)⌉
                counts = result["keep"].sum(1) - 2
                chosen = [
                    c
                    for c in learned.settings["candidate_ratios"]
                    if any(int(k) == -(-round(c * (prompt_length - 1) * 1e6) // 10**6) for k in counts)
                ]
                rows[-1]["chosen"] = {
                    f"{c:g}": int(
                        sum(int(k) == -(-round(c * (prompt_length - 1) * 1e6) // 10**6) for k in counts)
                    )
                    for c in chosen
                }
        # The previous behaviour: the same choices, the prompt cut before the model and renumbered.
        for name, algorithm, layer in (
            ("random, cut before, renumbered", "random", 0),
            ("attention@1, cut before, renumbered", "attention", 2),
        ):
            nlls = []
            for seed in range(seeds if algorithm == "random" else 1):
                keep = continuation_nll(
                    pruned_model(model, algorithm, ratio, layer, seed), batch, prompt_length
                )["keep"]
                nlls.append(continuation_nll(model, batch, prompt_length, keep=keep)["nll"])
            flops = prefill_flops(pruned_model(model, "random", ratio, 0).config, prompt_length + 1)
            # attention needs a scoring pass over layers 0..1 on every token first
            flops += sum(cost["prefill"] for cost in _layer_costs(model.config, prompt_length + 1)[0][:layer])
            rows.append(
                {
                    "setting": name,
                    "layer": "-",
                    "keep_ratio": ratio,
                    "nll": statistics.mean(nlls),
                    "kept": float(keep.sum(1).float().mean()),
                    "flops": flops / full_flops,
                }
            )
    for row in rows:
        row["delta"] = row["nll"] - base["nll"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--assets", default=str(default_assets_dir()))
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--continuation", type=int, default=32)
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--seeds", type=int, default=3, help="random: seeds averaged (default 3)")
    parser.add_argument("--learned-layers", type=int, nargs="*", default=[0, 2], help="fixed / adtp layers")
    parser.add_argument("--train-steps", type=int, default=150, help="fixed / adtp: retainer training steps")
    parser.add_argument(
        "--train-stories", type=int, default=256, help="fixed / adtp: sampled training stories"
    )
    args = parser.parse_args(argv)
    assets = Path(args.assets)
    folder = assets / "models" / "stories260K"
    model, tokenizer = (
        load_model(str(folder), dtype="float32", device="cpu").eval(),
        load_preprocessor(str(folder)),
    )
    text = (assets / "text" / "tinystories" / "sample.txt").read_text()
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    trained = {}
    if args.learned_layers:
        train_data = sampled_stories(model, tokenizer, args.train_stories)
        trained = trained_models(
            model, tokenizer, train_data, args.keep_ratios, args.learned_layers, args.train_steps
        )
    for prompt_length in args.prompt_lengths:
        batch = windows(token_ids, tokenizer.bos_token_id, prompt_length, args.continuation, args.stride)
        rows = run(model, batch, prompt_length, args.keep_ratios, args.seeds, trained)
        print(
            f"\nstories260K ({model.config.num_hidden_layers} layers), TinyStories sample ({len(token_ids)} tokens): "
            f"{batch.shape[0]} windows of BOS + {prompt_length} prompt + {args.continuation} continuation tokens "
            f"(stride {args.stride}); random over {args.seeds} seeds"
        )
        print(
            f"{'setting':<38} {'layer':>5} {'keep':>5} {'kept':>6} {'kept%':>6} {'NLL':>7} {'ppl':>7} "
            f"{'ΔNLL':>7} {'prefill FLOPs':>13}"
        )
        for row in rows:
            print(
                f"{row['setting']:<38} {row['layer']!s:>5} {row['keep_ratio']:>5.2f} {row['kept']:>6.1f} "
                f"{row['kept'] / (prompt_length + 1):>6.1%} "
                f"{row['nll']:>7.4f} {torch.tensor(row['nll']).exp().item():>7.3f} {row['delta']:>+7.4f} "
                f"{row['flops']:>13.3f}" + (f"  ratios chosen: {row['chosen']}" if "chosen" in row else "")
            )


if __name__ == "__main__":
    main()
