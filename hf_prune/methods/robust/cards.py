"""CARDs and CARD-Decks ("A Winning Hand", Diffenderfer et al., NeurIPS 2021).

A CARD (compact, accurate, robust deep network) is a lottery ticket trained with data augmentation:
global magnitude pruning of 20% of the remaining weights per round to a target sparsity, with
learning-rate rewinding (LRR, the paper's best) or weight rewinding (LTR) between rounds. A CARD-Deck
ensembles K CARDs, each trained with its own augmentation family (``augmentations.py``); the deck
(``model_patches/card_deck.py``) averages the members' softmax (``uniform``) or, per test batch, uses the
members of the augmentation domain whose Fourier amplitude spectrum is nearest the batch's (``spectral``).

Training K members × (rounds + 1) runs is more than one Trainer, so ``hf_prune.integrations.train_cards``
drives it (``hf-prune train`` with a ``cards`` stage calls it); this module is the configuration and what
each member gets: its lottery, its augmentation domain, its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigFieldError
from ...model_patches.card_deck import GATING_MODES
from ...registry import register_method
from ..base import TrainingMethod, config_field
from ..sparsity.lottery import LotteryConfig, rounds_to_reach
from ..sparsity.targets import exclude_field, scope_field, targets_field
from .augmentations import AUGMENTATIONS

MEMBER_INITS = ("shared", "reseeded")


@dataclass
class CardsConfig(TrainingMethod):
    """CARDs: K lottery tickets (LRR / LTR) trained with augmentations, saved as one CARD-Deck."""

    members: int = config_field(4, help="K, the number of CARDs in the deck (>= 1)")
    augmentations: list[str] = config_field(
        default_factory=lambda: ["augmix", "gaussian"],
        help="augmentation family per member, cycled over the members: augmix | gaussian | none",
    )
    final_sparsity: float = config_field(0.8, help="each CARD's sparsity (the paper: 0.95)")
    fraction_per_round: float = config_field(0.2, help="share of the remaining weights pruned per round")
    rewind: str = config_field("learning_rate", help="learning_rate (LRR, default) | weights (LTR)")
    rewind_step: int = config_field(0, help="LTR: rewind to the weights after this optimizer step of round 0")
    gating: str = config_field("uniform", help="the deck's gating: uniform (mean softmax) | spectral")
    member_init: str = config_field(
        "reseeded",
        help="reseeded: each member starts from a fresh initialisation of the model's config (seed + "
        "member); shared: every member starts from the model's weights",
    )
    seed: int = config_field(0, help="base seed; member i uses seed + i (initialisation, augmentation, data)")
    spectrum_images: int = config_field(
        1024, help="training images per domain for the spectral gating's reference spectra"
    )
    scope: str = scope_field()
    targets: list[str] = targets_field()
    exclude: list[str] = exclude_field()

    def __post_init__(self) -> None:
        if isinstance(self.members, bool) or not isinstance(self.members, int) or self.members < 1:
            raise ConfigFieldError(
                "members", f"must be an integer >= 1 (K, the deck's size), got {self.members!r}"
            )
        if not self.augmentations:
            raise ConfigFieldError("augmentations", f"must name at least one of {', '.join(AUGMENTATIONS)}")
        for name in self.augmentations:
            if name not in AUGMENTATIONS:
                raise ConfigFieldError(
                    "augmentations", f"unknown augmentation {name!r} (allowed: {', '.join(AUGMENTATIONS)})"
                )
        if self.gating not in GATING_MODES:
            raise ConfigFieldError("gating", f"must be one of {', '.join(GATING_MODES)}, got {self.gating!r}")
        if self.member_init not in MEMBER_INITS:
            raise ConfigFieldError(
                "member_init", f"must be one of {', '.join(MEMBER_INITS)}, got {self.member_init!r}"
            )
        if self.spectrum_images < 1:
            raise ConfigFieldError("spectrum_images", f"must be >= 1, got {self.spectrum_images}")
        if not 0.0 < self.final_sparsity < 1.0:
            raise ConfigFieldError("final_sparsity", f"must be in (0, 1), got {self.final_sparsity}")
        if not 0.0 < self.fraction_per_round < 1.0:
            raise ConfigFieldError("fraction_per_round", f"must be in (0, 1), got {self.fraction_per_round}")
        self.member_lottery()  # the lottery's own checks (fraction, rewind, scope, targets), named by key

    @property
    def rounds(self) -> int:
        """Pruning rounds per member: the fewest that reach ``final_sparsity`` (the last one prunes only
        up to it). Training runs rounds + 1 times per member."""
        return rounds_to_reach(self.final_sparsity, self.fraction_per_round)

    @classmethod
    def unsupported_reason(cls, adapter) -> str | None:
        if not adapter.is_image_classifier:
            return (
                f"cards trains image classifiers (image augmentations, Fourier-spectrum gating); "
                f"{adapter.model_type} is not one"
            )
        return None

    def check_training_model(self, model) -> None:
        self.member_lottery().check_training_model(model)  # a target matching nothing fails here

    def member_domain(self, member: int) -> str:
        return self.augmentations[member % len(self.augmentations)]

    def member_domains(self) -> list[str]:
        return [self.member_domain(i) for i in range(self.members)]

    def member_lottery(self) -> LotteryConfig:
        """A fresh lottery (its own masks and rewind point) for one member."""
        return LotteryConfig(
            rounds=self.rounds,
            fraction_per_round=self.fraction_per_round,
            rewind=self.rewind,
            rewind_step=self.rewind_step,
            final_sparsity=self.final_sparsity,
            scope=self.scope,
            targets=list(self.targets),
            exclude=list(self.exclude),
        )


register_method("cards", CardsConfig)
