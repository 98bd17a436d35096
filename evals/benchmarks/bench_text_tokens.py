"""Text token pruning on the MiniLM source-classification testbed: accuracy against FLOPs, kept tokens, latency.

    python -m hf_prune.evals.benchmarks.bench_text_tokens [--train-steps 80] [--target-ratio 0.3] [--limit 600]

Builds (or reuses) ``hf_prune.evals.testbeds.text_testbed`` (a real 6-layer BERT fine-tuned to tell WikiText-2,
tiny-shakespeare and stories260K text apart), trains AD-TP's retainer through the recipe pipeline, then
compares on held-out test sentences, at matched average FLOPs: ``adtp`` (ratio chosen per sentence),
``fixed`` (the same trained saliency, one ratio), ``attention`` (attention received at layer 1, pruned
there) and ``random`` (pruned at the embeddings). Each baseline's ``keep_ratio`` is set by bisection so its
analytic FLOPs on the test sentences match adtp's. Prints accuracy, average FLOPs per sentence, kept-token
share and CPU latency per batch of 32 (median of 5), each also as a ratio to the unpruned teacher measured
in the same run; then adtp's chosen ratios (share per candidate, rank correlation with length and with
the teacher's loss, the same on the training set), the sentences only adtp or only fixed gets right,
and ``hindsight``: each sentence's ratio chosen from its true cost at the same mean ratio (an upper bound
for any ratio head with adtp's saliency, not a method).
Prints figures; passes or fails nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections import Counter
from typing import Any

import torch

from ...checkpoint import load_model, load_preprocessor
from ...methods.tokens.encoder_retainer_training import budget_price, candidate_costs
from ...pipeline import prune
from ..testbeds.text_testbed import text_testbed_dir


def bert_flops(
    config: Any, lengths: torch.Tensor, kept: torch.Tensor, layer: int, retainer: bool
) -> torch.Tensor:
    """Analytic FLOPs per sentence: ``layer`` encoder layers on ``lengths`` tokens, the rest on ``kept``.

    A layer on n tokens costs 2·n·(4H² + 2·H·I) for its matmuls plus 4·n²·H for attention scores and
    values; the pooler and classifier 2·H² + 2·H·C; the retainer (adtp / fixed) 2·n·H·r + 4·H·r.
    """
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers

    def per_layer(n: torch.Tensor) -> torch.Tensor:
        return 2 * n * (4 * hidden**2 + 2 * hidden * inter) + 4 * n**2 * hidden

    total = layer * per_layer(lengths.double()) + (layers - layer) * per_layer(kept.double())
    total += 2 * hidden**2 + 2 * hidden * config.num_labels
    if retainer:
        size = (config.token_pruning or {}).get("retainer_size", 64)
        total += 2 * lengths.double() * hidden * size + 4 * hidden * size
    return total


def kept_counts(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """[CLS] and [SEP] plus ⌈ratio·(n − 2)⌉ of the other real tokens, as the model keeps them."""
    return 2 + torch.ceil(ratio * (lengths - 2) - 1e-6)


def matching_ratio(config: Any, lengths: torch.Tensor, layer: int, target: float, retainer: bool) -> float:
    """The keep_ratio whose mean FLOPs on ``lengths`` is closest to ``target`` (bisection)."""
    low, high = 1e-3, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        flops = bert_flops(config, lengths, kept_counts(lengths, middle), layer, retainer).mean()
        low, high = (middle, high) if flops < target else (low, middle)
    return round(high, 4)


def measure(model: Any, tokenizer: Any, rows: list[dict], batch_size: int = 32) -> dict[str, Any]:
    """Accuracy, per sentence whether it is right, the kept fraction, real length, loss on the true label and
    (adtp) the chosen candidate ratio, and the median latency of one batch."""
    right, kept, lengths, losses, chosen = [], [], [], [], []
    label2id = model.config.label2id
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            inputs = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, return_tensors="pt")
            out = model(**inputs)
            labels = torch.tensor(
                [r["label"] if isinstance(r["label"], int) else label2id[r["label"]] for r in chunk]
            )
            right += (out.logits.argmax(-1) == labels).tolist()
            losses += torch.nn.functional.cross_entropy(out.logits, labels, reduction="none").tolist()
            if getattr(out, "chosen_ratio", None) is not None:
                chosen += out.chosen_ratio.tolist()
            lengths += inputs["attention_mask"].sum(1).tolist()
            kept += (
                getattr(out, "kept_fraction", None)
                if getattr(out, "kept_fraction", None) is not None
                else torch.ones(len(chunk))
            ).tolist()
        inputs = tokenizer(
            [r["text"] for r in rows[:batch_size]], padding=True, truncation=True, return_tensors="pt"
        )
        model(**inputs)  # warm-up
        times = []
        for _ in range(5):
            started = time.perf_counter()
            model(**inputs)
            times.append((time.perf_counter() - started) * 1000)
    return {
        "accuracy": sum(right) / len(rows),
        "right": torch.tensor(right),
        "kept_fraction": torch.tensor(kept),
        "lengths": torch.tensor(lengths),
        "losses": torch.tensor(losses),
        "chosen": torch.tensor(chosen),
        "latency_ms": statistics.median(times),
    }


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (average ranks for ties)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        values, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
        first = torch.cumsum(counts, 0) - counts
        return (first + (counts - 1) / 2.0).double()[inverse]

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def ratio_distribution(found: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """Lines describing adtp's per-sentence ratios: the share of sentences per candidate, the mean chosen
    ratio, and its rank correlation with sentence length and with the teacher's loss (difficulty)."""
    chosen = found["chosen"]
    counts = Counter(round(float(c), 2) for c in chosen)
    lines = [
        "adtp chosen ratio per sentence: "
        + ", ".join(f"{k:g}: {v} ({v / len(chosen):.0%})" for k, v in sorted(counts.items())),
        f"  mean chosen ratio {float(chosen.mean()):.3f} (std {float(chosen.std()):.3f}); rank correlation with "
        f"length {spearman(chosen, found['lengths']):+.2f}, "
        f"with the teacher's loss {spearman(chosen, base['losses']):+.2f}",
    ]
    for value in sorted(counts):
        picked = chosen == value
        lines.append(
            f"  ratio {value:g}: mean length {float(found['lengths'][picked].double().mean()):.1f}, "
            f"teacher loss {float(base['losses'][picked].mean()):.3f}, "
            f"adtp loss {float(found['losses'][picked].mean()):.3f}"
        )
    return lines


def hindsight(
    model: Any, teacher: Any, tokenizer: Any, rows: list[dict], mean_ratio: float, batch_size: int = 32
) -> dict[str, Any]:
    """The upper bound of choosing ratios per sentence: each test sentence pruned at every candidate, and
    the candidate chosen from its true cost (1 − p(teacher's class), as in training) + a price set on
    these sentences so the mean ratio is ``mean_ratio``. Accuracy, kept fraction and length per sentence."""
    candidates = torch.tensor(model.config.token_pruning["candidate_ratios"])
    costs, right, kept, lengths = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            inputs = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, return_tensors="pt")
            labels = torch.tensor(
                [
                    r["label"] if isinstance(r["label"], int) else model.config.label2id[r["label"]]
                    for r in chunk
                ]
            )
            costs.append(
                candidate_costs(
                    model,
                    inputs["input_ids"],
                    inputs["attention_mask"],
                    teacher(**inputs).logits.argmax(-1),
                    candidates.tolist(),
                )
            )
            outs = [model(**inputs, keep_ratios=torch.full((len(chunk),), float(c))) for c in candidates]
            right.append(torch.stack([o.logits.argmax(-1) == labels for o in outs], 1))
            kept.append(torch.stack([o.kept_fraction for o in outs], 1))
            lengths += inputs["attention_mask"].sum(1).tolist()
    costs, right, kept = torch.cat(costs), torch.cat(right), torch.cat(kept)
    pick = (costs + budget_price(costs, candidates, mean_ratio) * candidates).argmin(1)[:, None]
    return {
        "accuracy": float(right.gather(1, pick).float().mean()),
        "kept_fraction": kept.gather(1, pick)[:, 0],
        "lengths": torch.tensor(lengths),
        "chosen": candidates[pick[:, 0]],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-steps", type=int, default=80)
    parser.add_argument("--target-ratio", type=float, default=0.3)
    parser.add_argument("--limit", type=int, default=600, help="test sentences (default 600)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    folder = text_testbed_dir()
    tokenizer = load_preprocessor(str(folder))
    teacher = load_model(str(folder)).eval()  # the adapter names AutoModelForSequenceClassification for BERT
    rows = [json.loads(line) for line in (folder / "data" / "test.jsonl").read_text().splitlines()][
        : args.limit
    ]
    started = time.perf_counter()
    stage = {
        "method": "text_token_pruning",
        "algorithm": "adtp",
        "train_data": str(folder / "data" / "train.jsonl"),
        "train_steps": args.train_steps,
        "target_ratio": args.target_ratio,
    }
    trained = prune(teacher, {"stages": [stage]}, tokenizer=tokenizer, progress=False)
    adtp, choice = trained.model.eval(), trained.report["stages"][0]["training"]["ratio_choice"]
    training_seconds = time.perf_counter() - started

    base = measure(teacher, tokenizer, rows)
    config = adtp.config
    results = {"unpruned": (base, bert_flops(config, base["lengths"], base["lengths"], 0, False))}
    found = measure(adtp, tokenizer, rows)
    kept = torch.round(found["kept_fraction"] * found["lengths"])
    results["adtp"] = (found, bert_flops(config, found["lengths"], kept, 0, True))
    target = float(results["adtp"][1].mean())
    ratios = {}
    for algorithm, layer, retainer in (("fixed", 0, True), ("attention", 1, False), ("random", 0, False)):
        ratio = ratios[algorithm] = matching_ratio(config, base["lengths"], layer, target, retainer)
        if algorithm == "fixed":  # adtp's trained saliency head, one ratio for every sentence
            model = copy.deepcopy(adtp)
            model.config.token_pruning = {
                **adtp.config.token_pruning,
                "algorithm": "fixed",
                "keep_ratio": ratio,
            }
        else:
            model = prune(
                teacher,
                {
                    "stages": [
                        {
                            "method": "text_token_pruning",
                            "algorithm": algorithm,
                            "keep_ratio": ratio,
                            "layer": layer,
                        }
                    ]
                },
                tokenizer=tokenizer,
                progress=False,
            ).model.eval()
        measured = measure(model, tokenizer, rows)
        kept = torch.round(measured["kept_fraction"] * measured["lengths"])
        results[algorithm] = (measured, bert_flops(config, measured["lengths"], kept, layer, retainer))

    oracle = hindsight(adtp, teacher, tokenizer, rows, float(found["chosen"].mean()))
    oracle["latency_ms"] = float("nan")
    kept = torch.round(oracle["kept_fraction"] * oracle["lengths"])
    results["hindsight"] = (oracle, bert_flops(config, oracle["lengths"], kept, 0, True))

    print(
        f"testbed {folder.name}: {len(rows)} test sentences, mean {float(base['lengths'].double().mean()):.1f} tokens; "
        f"adtp retainer trained {args.train_steps} steps (target ratio {args.target_ratio}) in {training_seconds:.0f} s"
    )
    print(
        f"{'method':<10} {'keep_ratio':>10} {'accuracy':>9} {'FLOPs/sentence':>15} {'ratio':>6} {'kept tokens':>12} "
        f"{'ms/batch of 32':>15} {'ratio':>6}"
    )
    base_flops = float(results["unpruned"][1].mean())
    for name, (measured, flops) in results.items():
        ratio = {"unpruned": "-", "adtp": "adaptive", "hindsight": "per sentence"}.get(
            name, f"{ratios.get(name, 0):.3f}"
        )
        print(
            f"{name:<10} {ratio:>10} {measured['accuracy']:>9.4f} {float(flops.mean()) / 1e6:>13.2f}M "
            f"{float(flops.mean()) / base_flops:>6.3f} {float(measured['kept_fraction'].mean()):>12.3f} "
            f"{measured['latency_ms']:>15.1f} {measured['latency_ms'] / base['latency_ms']:>6.3f}"
        )
    print("\n".join(ratio_distribution(results["adtp"][0], base)))
    print(
        f"  on the training set (where the price {choice['price']:.4f} was set): "
        f"mean ratio {choice['mean_ratio']:.3f}, "
        + ", ".join(f"{k}: {v:.0%}" for k, v in choice["share"].items())
    )
    adtp_right, fixed_right = results["adtp"][0]["right"], results["fixed"][0]["right"]
    print(
        "hindsight: "
        + ", ".join(
            f"{k:g}: {v}" for k, v in sorted(Counter(round(float(c), 2) for c in oracle["chosen"]).items())
        )
        + " (not a method: each sentence's ratio chosen "
        "from its true cost, the upper bound of choosing per sentence with adtp's saliency)"
    )
    print(
        f"adtp vs fixed, sentence by sentence: only adtp right {int((adtp_right & ~fixed_right).sum())}, "
        f"only fixed right {int((fixed_right & ~adtp_right).sum())}"
    )


if __name__ == "__main__":
    main()
