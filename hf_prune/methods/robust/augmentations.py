"""The augmentation families CARDs train with, on batches of images in [0, 1] (``[N, C, H, W]``, float).

- ``augmix``: AugMix-style mixing (Hendrycks et al., ICLR 2020): ``width`` chains of 1-3 operations each,
  chain outputs mixed with Dirichlet(1) weights, the mix blended with the original by m ~ Beta(1, 1):
  ``(1 - m)·x + m·Σ_i w_i·chain_i(x)``. The operations are AugMix's, chosen to not overlap the test
  corruptions: autocontrast, equalize, posterize, rotate, solarize, shear x / y, translate x / y, each at a
  level drawn in (0.1, severity] of 10. AugMix's Jensen-Shannon consistency loss is not used (the paper's
  CARDs train with the plain loss on augmented images, and the loss would need three forward passes).
- ``gaussian``: additive Gaussian noise, σ drawn per image in [0, ``noise_std``], clipped to [0, 1].
- ``none``: the images as they are.

Each call draws from the ``torch.Generator`` it is given, so a seeded run repeats exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

AUGMENTATIONS = ("augmix", "gaussian", "none")
AUGMIX_SEVERITY = 3  # AugMix's default
AUGMIX_WIDTH = 3
AUGMIX_MAX_DEPTH = 3
GAUSSIAN_MAX_STD = 0.1  # CIFAR-10-C's Gaussian noise runs σ = 0.04 .. 0.10


def _levels(n: int, generator: torch.Generator) -> torch.Tensor:
    """AugMix's level per image, uniform in (0.1, severity], as a fraction of its maximum 10."""
    return (0.1 + torch.rand(n, generator=generator) * (AUGMIX_SEVERITY - 0.1)) / 10.0


def _signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)


def autocontrast(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each channel of each image stretched to [0, 1] (a flat channel is left alone)."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    span = high - low
    return torch.where(span > 0, (x - low) / span.clamp_min(1e-12), x)


def equalize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Histogram equalisation over 256 grey levels per channel of each image."""
    n, c, h, w = x.shape
    levels = (x * 255).round().long().clamp(0, 255).view(n * c, h * w)
    histogram = torch.zeros(n * c, 256).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float))
    cdf = histogram.cumsum(dim=1)
    lowest = torch.where(histogram > 0, cdf, torch.full_like(cdf, float(h * w))).amin(dim=1, keepdim=True)
    scale = (h * w - lowest).clamp_min(1.0)
    out = ((cdf.gather(1, levels) - lowest) / scale).clamp(0, 1)
    return out.view(n, c, h, w)


def posterize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Keep the top 4 − int(4·level) bits of each 8-bit value."""
    bits = 4 - (_levels(len(x), generator) * 4).long()
    step = (2 ** (8 - bits)).float().view(-1, 1, 1, 1)
    return torch.floor((x * 255).round() / step) * step / 255.0


def solarize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Invert values at or above 1 − level·(256/255)."""
    threshold = (1.0 - _levels(len(x), generator) * 256 / 255).view(-1, 1, 1, 1)
    return torch.where(x >= threshold, 1.0 - x, x)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )


def rotate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotation by up to ±30°·level (zero fill)."""
    angle = _levels(len(x), generator) * 30.0 * _signs(len(x), generator) * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


def _shear_or_translate(
    x: torch.Tensor, generator: torch.Generator, *, axis: int, shear: bool
) -> torch.Tensor:
    amount = _levels(len(x), generator) * _signs(len(x), generator)
    # Shear by up to 0.3 of the other axis; translate by up to a third of the side (2 = the grid's width).
    amount = amount * (0.3 if shear else 2.0 / 3.0)
    theta = torch.eye(2, 3).repeat(len(x), 1, 1)
    theta[:, axis, 1 - axis if shear else 2] = amount
    return _affine(x, theta)


def shear_x(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return _shear_or_translate(x, generator, axis=0, shear=True)


def shear_y(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return _shear_or_translate(x, generator, axis=1, shear=True)


def translate_x(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return _shear_or_translate(x, generator, axis=0, shear=False)


def translate_y(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return _shear_or_translate(x, generator, axis=1, shear=False)


AUGMIX_OPERATIONS: tuple[Callable[[torch.Tensor, torch.Generator], torch.Tensor], ...] = (
    autocontrast,
    equalize,
    posterize,
    rotate,
    solarize,
    shear_x,
    shear_y,
    translate_x,
    translate_y,
)


def _chain(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One AugMix chain per image: 1..3 operations, each picked uniformly per image and step."""
    n = len(x)
    depth = torch.randint(1, AUGMIX_MAX_DEPTH + 1, (n,), generator=generator)
    out = x.clone()
    for step in range(AUGMIX_MAX_DEPTH):
        choice = torch.randint(len(AUGMIX_OPERATIONS), (n,), generator=generator)
        for index, operation in enumerate(AUGMIX_OPERATIONS):
            rows = ((choice == index) & (depth > step)).nonzero().flatten()
            if len(rows):
                out[rows] = operation(out[rows], generator)
    return out


def augmix(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = len(x)
    # torch.distributions samples from the global RNG; draw from ``generator`` instead.
    weights = _dirichlet(n, AUGMIX_WIDTH, generator)
    mixed = sum(weights[:, i].view(-1, 1, 1, 1) * _chain(x, generator) for i in range(AUGMIX_WIDTH))
    m = _dirichlet(n, 2, generator)[:, :1].view(-1, 1, 1, 1)  # Beta(1, 1) = the first of Dirichlet(1, 1)
    return ((1 - m) * x + m * mixed).clamp(0, 1)


def _dirichlet(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Dirichlet(1, …, 1) rows: normalised Exp(1) draws."""
    draws = -torch.log(torch.rand(n, k, generator=generator).clamp_min(1e-12))
    return draws / draws.sum(dim=1, keepdim=True)


def gaussian(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    std = torch.rand(len(x), generator=generator).view(-1, 1, 1, 1) * GAUSSIAN_MAX_STD
    return (x + std * torch.randn(x.shape, generator=generator)).clamp(0, 1)


def none(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x


FAMILIES: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "augmix": augmix,
    "gaussian": gaussian,
    "none": none,
}


def augment(images: torch.Tensor, family: str, generator: torch.Generator) -> torch.Tensor:
    """``images`` (float in [0, 1], ``[N, C, H, W]``) through one augmentation family."""
    if family not in FAMILIES:
        raise ValueError(f"unknown augmentation {family!r} (allowed: {', '.join(AUGMENTATIONS)})")
    return FAMILIES[family](images.float(), generator)
