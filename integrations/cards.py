"""Train CARDs with ``transformers.Trainer`` and put them in a CARD-Deck.

    from hf_prune.integrations import train_cards
    from hf_prune.image_data import read_image_set

    train = read_image_set("../shared/assets/images/fashion-mnist", split="train")
    result = train_cards(model, train, {"members": 4, "final_sparsity": 0.8, "gating": "spectral"},
                         arguments={"output_dir": "out/cards", "max_steps": 100, "learning_rate": 1e-3,
                                    "per_device_train_batch_size": 128})
    result.deck.save_pretrained("out/deck")        # loads with AutoModelForImageClassification
                                                   # .from_pretrained(..., trust_remote_code=True)

Each member is a lottery ticket (``run_lottery``: one Trainer per round, ``rounds + 1`` runs) on its own
copy of the model (``model`` itself is never changed), trained on images augmented by its domain's family
inside the data collator, then normalised as the model's image processor says. ``arguments`` are
``TrainingArguments`` fields used for every run; each run writes to ``<output_dir>/member-<i>/round-<r>``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters import use_cache_restored
from ..image_data import ImageSet, normalisation
from ..methods.robust.augmentations import augment
from ..methods.robust.cards import CardsConfig
from ..methods.robust.deck import build_card_deck, check_same_architecture, domain_spectra
from .pruning_callback import run_lottery, training_method_from


class ImageClassificationDataset(torch.utils.data.Dataset):
    """``{"images": uint8 [C, H, W], "labels": int}`` items of an ``ImageSet`` (the collator makes pixel
    values, so augmentation sees whole batches)."""

    def __init__(self, images: ImageSet):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"images": self.images.images[index], "labels": int(self.images.labels[index])}


class AugmentingImageCollator:
    """Stacks a batch, scales it to [0, 1], applies one augmentation family with its own seeded generator,
    and normalises with the processor's mean and std: ``{"pixel_values", "labels"}``."""

    def __init__(self, family: str, processor: Any, channels: int, seed: int):
        self.family = family
        self.mean, self.std = normalisation(processor, channels)
        self.generator = torch.Generator().manual_seed(seed)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] → model input."""
        return (images - self.mean) / self.std

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = torch.stack([item["images"] for item in items]).float() / 255.0
        augmented = augment(images, self.family, self.generator)
        labels = torch.tensor([item["labels"] for item in items], dtype=torch.long)
        return {"pixel_values": self.pixel_values(augmented), "labels": labels}


@dataclasses.dataclass
class CardsResult:
    members: list[Any]
    domains: list[str]
    deck: Any
    report: dict[str, Any]


def fresh_member(model: Any, config: CardsConfig, member: int) -> Any:
    """The model a member starts from: a copy of ``model``, or a new initialisation of its config."""
    if config.member_init == "shared":
        return copy.deepcopy(model).train()
    torch.manual_seed(config.seed + member)
    fresh = type(model)(copy.deepcopy(model.config))
    return fresh.to(next(model.parameters()).device).train()


def train_cards(
    model: Any,
    train_images: ImageSet,
    config: dict[str, Any] | CardsConfig,
    *,
    arguments: dict[str, Any],
    processor: Any = None,
    on_member: Callable[[int, Any, dict[str, Any]], None] | None = None,
    callbacks: Sequence[Any] = (),
) -> CardsResult:
    """Train ``config.members`` CARDs from ``model`` on ``train_images`` and build the deck (see the module
    docstring). ``on_member(i, member, report)`` is called after each member (e.g. to evaluate it);
    ``callbacks`` (``TrainerCallback`` objects) are given to every round's Trainer."""
    from transformers import Trainer, TrainingArguments

    name, method = training_method_from(
        config if not isinstance(config, dict) else {"method": "cards", **config}
    )
    if not isinstance(method, CardsConfig):
        raise TypeError(f"train_cards runs the cards method, got {name!r}")
    method.check_training_model(model)
    channels = int(train_images.images.shape[1])
    output_dir = Path(arguments.get("output_dir", "cards"))
    dataset = ImageClassificationDataset(train_images)
    members, reports = [], []
    for index in range(method.members):
        started = time.perf_counter()
        domain = method.member_domain(index)
        member = fresh_member(model, method, index)
        collator = AugmentingImageCollator(domain, processor, channels, seed=method.seed + index)

        def make_trainer(round_index: int, member=member, collator=collator, index=index) -> Any:
            args = {
                "report_to": "none",
                "save_strategy": "no",
                **arguments,
                "output_dir": str(output_dir / f"member-{index}" / f"round-{round_index}"),
                "seed": int(arguments.get("seed", 42)) + index,
                "remove_unused_columns": False,
            }
            return Trainer(
                model=member,
                args=TrainingArguments(**args),
                train_dataset=dataset,
                data_collator=collator,
                callbacks=list(callbacks),
            )

        with use_cache_restored(member):  # Trainer sets config.use_cache; the deck keeps the member's own
            lottery, round_reports = run_lottery(make_trainer, method.member_lottery())
        member.eval()
        report = {
            "member": index,
            "domain": domain,
            **{k: v for k, v in round_reports[-1].details.items() if k != "sparsity_per_weight"},
            "rounds_seconds": [round(r.seconds, 3) for r in round_reports],
            "seconds": round(time.perf_counter() - started, 3),
        }
        members.append(member)
        reports.append(report)
        if on_member is not None:
            on_member(index, member, report)
    check_same_architecture(members)
    spectra = None
    if method.gating == "spectral" or len(set(method.member_domains())) > 1:
        sample = train_images.images[: method.spectrum_images]
        mean, std = normalisation(processor, channels)
        domains = list(dict.fromkeys(method.member_domains()))
        stacked = domain_spectra(sample, domains, lambda x: (x - mean) / std, seed=method.seed)
        spectra = dict(zip(domains, stacked, strict=True))
    deck = build_card_deck(members, method.member_domains(), gating=method.gating, spectra=spectra)
    report = {
        "sparsity": round(sum(r["sparsity"] for r in reports) / len(reports), 6),
        "pruned_weights": sum(r["pruned_weights"] for r in reports),
        "targeted_weights": sum(r["targeted_weights"] for r in reports),
        "member_domains": method.member_domains(),
        "members": reports,
        "gating": method.gating,
        "rounds": method.rounds,
        "final_sparsity": method.final_sparsity,
        "rewind": method.rewind,
    }
    return CardsResult(members, method.member_domains(), deck, report)
