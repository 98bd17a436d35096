"""CARDs on Fashion-MNIST under distribution shift: dense, GMP, single LRR CARDs and CARD-Decks.

    python -m hf_prune.evals.benchmarks.bench_cards [--sparsity 0.9] [--steps 150] [--members 4]
        [--train-limit 20000] [--eval-limit 1000] [--output DIR]

The model is a small ResNet built from a transformers config (28×28 grey images; embedding 16, stages of
16 / 32 / 64 channels, one basic block each; 77k prunable weights), trained from scratch with AdamW, lr
2e-3, batch 128, linear decay. Every sparse model targets every Conv / Linear weight but the head.

Runs, each at the same training budget of (rounds + 1) × ``--steps`` optimizer steps (rounds: the fewest
20% rounds reaching ``--sparsity``):

- ``dense`` and ``dense+augmix``: no pruning;
- ``gmp`` and ``gmp+augmix``: cubic schedule to the sparsity from 10% to 75% of the steps, global;
- ``lrr``: one LRR ticket without augmentation, ``lrr+augmix``, ``lrr+gaussian``: single CARDs (the
  deck's members 0 and 1);
- ``deck-uniform`` and ``deck-spectral``: the deck of ``--members`` CARDs (augmix, gaussian, cycled), its
  members averaged or gated by spectrum.

Evaluation: the first ``--eval-limit`` test images, clean and under every corruption of
``hf_prune.evals.corruptions`` at severities 1-5 (Fashion-MNIST-C style, seeded), through the
``corruption_robustness`` task. Prints a table (clean, mean corrupted, per corruption) and the claims of
"A Winning Hand" checked on it; writes ``results.json`` and ``robustness.png`` to ``--output``. Prints
figures; passes or fails nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from ...image_data import pixel_values, read_image_set
from ...integrations.cards import AugmentingImageCollator, ImageClassificationDataset, train_cards
from ...integrations.pruning_callback import PruningCallback
from ...methods.sparsity.lottery import rounds_to_reach
from ..corruptions import CORRUPTIONS, corrupt
from ..image_robustness import evaluate_corruption_robustness, plot_corruption_robustness
from ..training import default_assets_dir

BATCH, LEARNING_RATE = 128, 2e-3


def small_resnet(seed: int) -> transformers.ResNetForImageClassification:
    config = transformers.ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[16, 32, 64],
        depths=[1, 1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=10,
    )
    torch.manual_seed(seed)
    return transformers.ResNetForImageClassification(config)


def arguments(folder: Path, steps: int) -> dict[str, Any]:
    return {
        "output_dir": str(folder),
        "max_steps": steps,
        "learning_rate": LEARNING_RATE,
        "per_device_train_batch_size": BATCH,
        "lr_scheduler_type": "linear",
        "report_to": "none",
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "remove_unused_columns": False,
    }


def train_plain(train, family: str, steps: int, folder: Path, sparsity: float | None, seed: int = 0) -> Any:
    """Dense (sparsity None) or GMP training, augmented by ``family``."""
    model = small_resnet(seed)
    callbacks = []
    if sparsity is not None:
        stage = {"method": "gmp", "final_sparsity": sparsity, "start_step": steps // 10}
        stage.update(end_step=int(steps * 0.75), frequency=max(1, steps // 40))
        callbacks.append(PruningCallback(stage))
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**arguments(folder, steps), seed=seed),
        train_dataset=ImageClassificationDataset(train),
        data_collator=AugmentingImageCollator(family, None, 1, seed=seed),
        callbacks=callbacks,
    )
    trainer.train()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per lottery run")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--output", type=Path, default=Path("out/bench_cards"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder = default_assets_dir() / "images" / "fashion-mnist"
    train = read_image_set(folder, "train", limit=args.train_limit)
    rounds = rounds_to_reach(args.sparsity, 0.2)
    budget = (rounds + 1) * args.steps
    print(f"sparsity {args.sparsity}: {rounds} rounds; every run trains {budget} steps of {BATCH}")
    models, seconds, work = {}, {}, Path(tempfile.mkdtemp(prefix="bench_cards_"))
    for name, family, sparsity in (
        ("dense", "none", None),
        ("dense+augmix", "augmix", None),
        ("gmp", "none", args.sparsity),
        ("gmp+augmix", "augmix", args.sparsity),
    ):
        started = time.perf_counter()
        models[name] = train_plain(train, family, budget, work / name, sparsity)
        seconds[name] = time.perf_counter() - started
        print(f"  trained {name} in {seconds[name]:.0f} s")
    card = {"final_sparsity": args.sparsity, "member_init": "shared"}
    started = time.perf_counter()
    lrr = train_cards(
        small_resnet(0),
        train,
        {**card, "members": 1, "augmentations": ["none"]},
        arguments=arguments(work / "lrr", args.steps),
    )
    models["lrr"], seconds["lrr"] = lrr.members[0], time.perf_counter() - started
    started = time.perf_counter()
    deck = train_cards(
        small_resnet(0),
        train,
        {**card, "members": args.members, "member_init": "reseeded"},
        arguments=arguments(work / "deck", args.steps),
    )
    seconds["deck-uniform"] = time.perf_counter() - started
    for index, (member, domain) in enumerate(zip(deck.members, deck.domains, strict=True)):
        models[f"lrr+{domain}" if index < 2 else f"card{index}+{domain}"] = member
    models["deck-uniform"] = deck.deck
    spectral = copy.deepcopy(deck.deck)
    spectral.config.gating = "spectral"  # the forward reads the gating from the config
    models["deck-spectral"] = spectral
    print(f"  trained the CARDs in {seconds['lrr']:.0f} s (lrr) and {seconds['deck-uniform']:.0f} s (deck)")

    results = {}
    for name, model in models.items():
        results[name] = evaluate_corruption_robustness(
            model, None, str(folder), limit=args.eval_limit, progress=False
        )
        zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if p.dim() > 1)
        results[name]["zero_weights"] = zeros
    gating = spectral_choices(spectral, folder, args.eval_limit)
    report(results, args, deck.report, gating)


def spectral_choices(
    deck: Any, folder: Path, limit: int, batch_size: int = 64
) -> dict[str, dict[str, float]]:
    """Per corruption (severity 3) and for the clean images: the share of test batches the spectral deck
    sends to each domain."""
    test = read_image_set(folder, "test", limit=limit)
    sets = {"clean": test.images}
    sets.update({name: corrupt(test.images, name, 3, seed=0) for name in CORRUPTIONS})
    shares = {}
    for name, images in sets.items():
        picks = []
        for start in range(0, len(images), batch_size):
            deck.member_indices(pixel_values(images[start : start + batch_size]))
            picks.append(deck.last_domain)
        shares[name] = {d: round(picks.count(d) / len(picks), 3) for d in dict.fromkeys(deck.config.domains)}
    return shares


def report(results: dict[str, dict], args: argparse.Namespace, deck_report: dict, gating: dict) -> None:
    corruptions = list(next(iter(results.values()))["per_corruption"])
    print(f"\n{'run':<15}{'clean':>7}{'corrupt':>9}  " + " ".join(f"{c[:8]:>8}" for c in corruptions))
    for name, r in results.items():
        cells = " ".join(f"{r['per_corruption'][c]:>8.3f}" for c in corruptions)
        print(f"{name:<15}{r['clean_accuracy']:>7.3f}{r['mean_corrupted_accuracy']:>9.3f}  {cells}")
    mca = {name: r["mean_corrupted_accuracy"] for name, r in results.items()}
    members = [m for m in mca if m.startswith(("lrr+", "card"))]
    print("\nclaims:")
    print(f"  LRR >= GMP under corruption (no augmentation): {mca['lrr']:.3f} vs {mca['gmp']:.3f}")
    print(
        f"  augmentation helps LRR: none {mca['lrr']:.3f}, augmix {mca['lrr+augmix']:.3f}, "
        f"gaussian {mca['lrr+gaussian']:.3f}"
    )
    print(
        f"  deck beats its best member ({max(members, key=mca.get)} {max(mca[m] for m in members):.3f}): "
        f"uniform {mca['deck-uniform']:.3f}, spectral {mca['deck-spectral']:.3f}"
    )
    print("  spectral gating, share of test batches per domain (severity 3):")
    for name, shares in gating.items():
        print(f"    {name:<17} " + ", ".join(f"{d} {share:.2f}" for d, share in shares.items()))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(
        json.dumps(
            {
                "settings": vars(args) | {"output": str(args.output)},
                "results": results,
                "deck": deck_report,
                "spectral_gating": gating,
            },
            indent=2,
        )
    )
    plot_corruption_robustness(list(results.items()), args.output / "robustness.png")
    print(f"wrote {args.output / 'results.json'} and {args.output / 'robustness.png'}")


if __name__ == "__main__":
    main()
