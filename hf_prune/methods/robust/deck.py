"""Building a CARD-Deck (``model_patches/card_deck.py``) from trained members, and the reference spectra
its spectral gating compares a test batch with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...errors import HfPruneError
from ...model_patches.card_deck import (
    GATING_MODES,
    CardDeckConfig,
    CardDeckForImageClassification,
    amplitude_spectrum,
)
from .augmentations import augment

#: Config keys that may differ between members of one architecture (bookkeeping, not structure).
_BOOKKEEPING_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash")


class DeckError(HfPruneError, ValueError):
    """Members that cannot form one deck (none, different architectures, a bad domain or gating)."""


def member_architecture(model: Any) -> dict[str, Any]:
    """The config of a member as the deck stores it, without bookkeeping keys."""
    settings = model.config.to_dict()
    return {k: v for k, v in settings.items() if k not in _BOOKKEEPING_KEYS}


def check_same_architecture(members: Sequence[Any]) -> dict[str, Any]:
    """The members' shared architecture; ``DeckError`` naming the first member and key that differ."""
    if len(members) < 1:
        raise DeckError("members: a deck needs at least 1 member, got 0")
    first = member_architecture(members[0])
    for index, member in enumerate(members[1:], start=1):
        if type(member) is not type(members[0]):
            raise DeckError(
                f"members: member {index} is a {type(member).__name__}, member 0 a {type(members[0]).__name__}: "
                "a deck holds members of one architecture"
            )
        other = member_architecture(member)
        differing = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if differing:
            key = differing[0]
            raise DeckError(
                f"members: member {index} differs from member 0 in {key!r} ({other.get(key)!r} vs "
                f"{first.get(key)!r}): a deck holds members of one architecture"
            )
    return first


def domain_spectra(
    images: torch.Tensor,
    domains: Sequence[str],
    to_pixel_values: Any,
    *,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """``[D, C, H, W]``: per domain, the mean ``log(1 + |FFT2|)`` of ``images`` (uint8 ``[N, C, H, W]``)
    after that domain's augmentation, in the pixel values the model takes (``to_pixel_values``: float
    images in [0, 1] → model input)."""
    spectra = []
    for index, domain in enumerate(domains):
        generator = torch.Generator().manual_seed(seed + index)
        total = None
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].float() / 255.0
            pixels = to_pixel_values(augment(batch, domain, generator))
            part = amplitude_spectrum(pixels) * len(batch)
            total = part if total is None else total + part
        spectra.append(total / len(images))
    return torch.stack(spectra)


def build_card_deck(
    members: Sequence[Any],
    member_domains: Sequence[str],
    *,
    gating: str = "uniform",
    spectra: dict[str, torch.Tensor] | None = None,
) -> CardDeckForImageClassification:
    """One ``CardDeckForImageClassification`` holding copies of ``members``' weights (the members are not
    changed). ``spectra``: domain → ``[C, H, W]`` reference spectrum, needed for ``gating="spectral"``."""
    architecture = check_same_architecture(members)
    if len(member_domains) != len(members):
        raise DeckError(f"member_domains: {len(member_domains)} domains for {len(members)} members")
    if gating not in GATING_MODES:
        raise DeckError(f"gating: must be one of {', '.join(GATING_MODES)}, got {gating!r}")
    domains = list(dict.fromkeys(member_domains))
    if gating == "spectral":
        missing = [d for d in domains if d not in (spectra or {})]
        if missing:
            raise DeckError(
                f"gating: spectral needs a reference spectrum for every domain; missing {missing}"
            )
    shape = list(next(iter(spectra.values())).shape) if spectra else None
    config = CardDeckConfig(
        member_config=architecture,
        member_domains=list(member_domains),
        gating=gating,
        domains=domains,
        spectrum_shape=shape,
        id2label=members[0].config.id2label,
        label2id=members[0].config.label2id,
    )
    deck = CardDeckForImageClassification(config)
    with torch.no_grad():
        for slot, member in zip(deck.members, members, strict=True):
            slot.load_state_dict(member.state_dict(), strict=True)
        if spectra:
            deck.domain_spectra.copy_(torch.stack([spectra[d] for d in domains]))
    return deck.eval()
