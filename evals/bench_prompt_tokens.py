"""Prompt token pruning in a real causal LM: how well it continues a pruned prompt, against prefill FLOPs.

    python -m hf_prune.evals.bench_prompt_tokens [--assets DIR] [--prompt-lengths 128 256] [--continuation 32]

Model: the real stories260K (llama2.c, 5 layers, hidden 64) from the shared assets; text: the real
TinyStories sample there (five stories, 1,879 tokens). Windows: BOS + ``prompt_length`` tokens of
prompt + ``continuation`` tokens, every ``stride`` tokens through the text. For each setting the prompt
goes through the pruned prefill (cache kept) and the continuation through one cached forward, so the
continuation sees the kept prompt tokens in every layer; the figure is its teacher-forced negative
log-likelihood per token (and perplexity), next to the unpruned model's on the same windows. ``random``
is averaged over ``--seeds`` seeds. Prefill FLOPs are analytic (``hf_prune.evals.flops``), over the
prompt, as a ratio to the unpruned prefill.

Two more rows per ratio cut the prompt before the model with its positions renumbered 0..k-1, as the
previous version of the model did: random, and attention scored at layer 1 (its default; scored as now;
its FLOPs include that scoring pass over layers 0 and 1).
Prints figures; passes or fails nothing.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load_model, load_preprocessor
from ..pipeline import prune
from .flops import _layer_costs, analytic_flops_per_token
from .training import default_assets_dir


def windows(token_ids: list[int], bos: int, prompt_length: int, continuation: int, stride: int) -> torch.Tensor:
    """[N, 1 + prompt_length + continuation]: BOS then consecutive text tokens, one window every ``stride``."""
    size = prompt_length + continuation
    starts = range(0, len(token_ids) - size + 1, stride)
    return torch.tensor([[bos, *token_ids[s:s + size]] for s in starts])


@torch.no_grad()
def continuation_nll(model, batch: torch.Tensor, prompt_length: int, keep: torch.Tensor | None = None) -> dict:
    """Mean NLL per continuation token after a cached prefill of the prompt (BOS + ``prompt_length``), and
    the kept prompt tokens per window. With ``keep`` ([N, P] bool), the stock ``model`` gets only those
    prompt tokens, renumbered (the prompt cut before the model)."""
    prompts, targets = batch[:, :prompt_length + 1], batch[:, prompt_length + 1:]
    if keep is not None:
        prompts = prompts[keep].view(prompts.shape[0], -1)
    prefill = model(input_ids=prompts, use_cache=True)
    rest = model(input_ids=targets[:, :-1], cache=prefill.cache).logits
    logits = torch.cat([prefill.logits[:, -1:], rest], dim=1)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    kept = getattr(prefill, "kept_tokens", None)
    return {"nll": float(nll), "kept": float(kept.sum(1).float().mean()) if kept is not None else prompts.shape[1],
            "keep": kept}


def pruned_model(model, algorithm: str, keep_ratio: float, layer: int, seed: int = 0):
    stage = {"method": "text_token_pruning", "algorithm": algorithm, "keep_ratio": keep_ratio, "layer": layer,
             "seed": seed}
    return prune(model, {"stages": [stage]}, progress=False).model.eval()


def prefill_flops(config, prompt_tokens: int) -> float:
    return analytic_flops_per_token(config, prompt_tokens)["prefill_flops_per_token"] * prompt_tokens


def run(model, batch: torch.Tensor, prompt_length: int, keep_ratios, seeds: int) -> list[dict]:
    layers = model.config.num_hidden_layers
    base = continuation_nll(model, batch, prompt_length)
    full_flops = prefill_flops(model.config, prompt_length + 1)
    rows = [{"setting": "unpruned", "layer": "-", "keep_ratio": 1.0, **base, "flops": 1.0}]
    for ratio in keep_ratios:
        for algorithm in ("attention", "random"):
            for layer in range(0 if algorithm == "random" else 1, layers):
                runs = [continuation_nll(pruned, batch, prompt_length) for pruned in
                        (pruned_model(model, algorithm, ratio, layer, seed) for seed in range(seeds if algorithm == "random" else 1))]
                config = pruned_model(model, algorithm, ratio, layer).config
                rows.append({"setting": algorithm, "layer": layer, "keep_ratio": ratio,
                             "nll": statistics.mean(r["nll"] for r in runs), "kept": runs[0]["kept"],
                             "flops": prefill_flops(config, prompt_length + 1) / full_flops})
        # The previous behaviour: the same choices, the prompt cut before the model and renumbered.
        for name, algorithm, layer in (("random, cut before, renumbered", "random", 0),
                                       ("attention@1, cut before, renumbered", "attention", 2)):
            nlls = []
            for seed in range(seeds if algorithm == "random" else 1):
                keep = continuation_nll(pruned_model(model, algorithm, ratio, layer, seed), batch, prompt_length)["keep"]
                nlls.append(continuation_nll(model, batch, prompt_length, keep=keep)["nll"])
            flops = prefill_flops(pruned_model(model, "random", ratio, 0).config, prompt_length + 1)
            # attention needs a scoring pass over layers 0..1 on every token first
            flops += sum(cost["prefill"] for cost in _layer_costs(model.config, prompt_length + 1)[0][:layer])
            rows.append({"setting": name, "layer": "-", "keep_ratio": ratio, "nll": statistics.mean(nlls),
                         "kept": float(keep.sum(1).float().mean()), "flops": flops / full_flops})
    for row in rows:
        row["delta"] = row["nll"] - base["nll"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=str(default_assets_dir()))
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--continuation", type=int, default=32)
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--seeds", type=int, default=3, help="random: seeds averaged (default 3)")
    args = parser.parse_args(argv)
    assets = Path(args.assets)
    folder = assets / "models" / "stories260K"
    model, tokenizer = load_model(str(folder), dtype="float32", device="cpu").eval(), load_preprocessor(str(folder))
    text = (assets / "text" / "tinystories" / "sample.txt").read_text()
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for prompt_length in args.prompt_lengths:
        batch = windows(token_ids, tokenizer.bos_token_id, prompt_length, args.continuation, args.stride)
        rows = run(model, batch, prompt_length, args.keep_ratios, args.seeds)
        print(f"\nstories260K ({model.config.num_hidden_layers} layers), TinyStories sample ({len(token_ids)} tokens): "
              f"{batch.shape[0]} windows of BOS + {prompt_length} prompt + {args.continuation} continuation tokens "
              f"(stride {args.stride}); random over {args.seeds} seeds")
        print(f"{'setting':<38} {'layer':>5} {'keep':>5} {'kept':>6} {'NLL':>7} {'ppl':>7} {'ΔNLL':>7} {'prefill FLOPs':>13}")
        for row in rows:
            print(f"{row['setting']:<38} {row['layer']!s:>5} {row['keep_ratio']:>5.2f} {row['kept']:>6.1f} "
                  f"{row['nll']:>7.4f} {torch.tensor(row['nll']).exp().item():>7.3f} {row['delta']:>+7.4f} "
                  f"{row['flops']:>13.3f}")


if __name__ == "__main__":
    main()
