"""Common corruptions of images at 5 severities, as CIFAR-10-C builds them (Hendrycks & Dietterich,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019).

The per-severity parameters (``CORRUPTIONS[name].parameters``, severity 1 first) are the ones the authors'
``make_cifar_c.py`` (github.com/hendrycks/robustness) uses for 32×32 images; they are applied unchanged to
other sizes (Fashion-MNIST's 28×28). On x = image / 255 in [0, 1], each channel apart unless said:

- ``gaussian_noise`` σ: x + N(0, σ²) per value.
- ``shot_noise`` λ: Poisson(λ·x) / λ (photon noise; fewer photons λ is stronger).
- ``impulse_noise`` a: salt and pepper; each value is replaced with probability a, by 1 or 0 with equal odds
  (scikit-image's ``random_noise(mode="s&p", amount=a)``).
- ``speckle_noise`` σ: x + x·N(0, σ²).
- ``defocus_blur`` (r, s): correlation with a disk kernel: the indicator of X² + Y² ≤ r² on the grid
  −8..8 (normalised to sum 1), smoothed by a 3×3 Gaussian of σ = s (OpenCV's ``GaussianBlur``, reflected
  border); the image border is reflected without repeating the edge (OpenCV's ``BORDER_REFLECT_101``).
- ``gaussian_blur`` σ: Gaussian filter of σ, taps out to ``int(4σ + 0.5)``, edge values repeated
  (scipy's ``gaussian_filter``, ``mode="nearest"``, as scikit-image calls it).
- ``contrast`` c: (x − m)·c + m, m the mean of the image's channel.
- ``brightness`` b: HSV value V = max over channels raised to min(V + b, 1), hue and saturation kept; since
  each of R, G, B is V times a function of (H, S), this is x·V'/V (and V' on every channel where V = 0), which
  for one channel is min(x + b, 1).
- ``jpeg_compression`` q: a Pillow JPEG save at quality q and reload (greyscale "L" or "RGB").
- ``pixelate`` f: Pillow ``BOX`` resize to (int(f·W), int(f·H)) and back to (W, H).

Every result is clipped to [0, 1] and rounded to the nearest uint8 (CIFAR-10-C truncates instead, which
darkens by half a level on average). The random corruptions draw from a local ``torch.Generator`` seeded
from (seed, name, severity): one call is deterministic, and the global RNG is never touched.

    corrupted = corrupt(images, "defocus_blur", severity=3, seed=0)    # uint8 [N, C, H, W] in and out
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Corruption:
    """One corruption: ``apply(x, parameter, generator)`` on float images in [0, 1], and its parameter at
    each severity (``parameters[severity - 1]``)."""

    apply: Callable[[torch.Tensor, Any, torch.Generator], torch.Tensor]
    parameters: tuple[Any, ...]
    parameter: str  # what the parameter is
    random: bool


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=generator)


def shot_noise(x: torch.Tensor, photons: float, generator: torch.Generator) -> torch.Tensor:
    return torch.poisson(x * photons, generator=generator) / photons


def impulse_noise(x: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    replaced = torch.rand(x.shape, generator=generator) < amount
    salt = torch.rand(x.shape, generator=generator) < 0.5
    return torch.where(replaced, salt.to(x.dtype), x)


def speckle_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    return x + x * sigma * torch.randn(x.shape, generator=generator)


def _filter(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every channel of ``x`` with the odd-sized 2-D ``kernel``, the border padded by ``mode``."""
    n, c, h, w = x.shape
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    if mode == "reflect" and (ph >= h or pw >= w):  # reflection needs more pixels than the pad
        mode = "replicate"
    padded = F.pad(x.reshape(n * c, 1, h, w), (pw, pw, ph, ph), mode=mode)
    return F.conv2d(padded, kernel.to(x.dtype)[None, None]).reshape(n, c, h, w)


def _gaussian_taps(sigma: float, radius: int) -> torch.Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    return taps / taps.sum()


def gaussian_blur(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    taps = _gaussian_taps(sigma, int(4 * sigma + 0.5))
    return _filter(_filter(x, taps[:, None], "replicate"), taps[None, :], "replicate")


def defocus_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The anti-aliased disk of ``defocus_blur``, cut to the rows and columns that are not zero."""
    half, size = (8, 3) if radius <= 8 else (int(radius), 5)
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2).to(torch.float64)
    taps = _gaussian_taps(alias_blur, size // 2)
    smooth = _filter(
        _filter((disk / disk.sum())[None, None], taps[:, None], "reflect"), taps[None, :], "reflect"
    )
    kernel = smooth[0, 0]
    rows = kernel.abs().sum(dim=1).nonzero().flatten()
    reach = int(max(half - rows.min(), rows.max() - half))  # symmetric: the same for the columns
    return kernel[half - reach : half + reach + 1, half - reach : half + reach + 1]


def defocus_blur(x: torch.Tensor, parameter: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    return _filter(x, defocus_kernel(*parameter), "reflect")


def contrast(x: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * factor + means


def brightness(x: torch.Tensor, shift: float, generator: torch.Generator) -> torch.Tensor:
    value = x.amax(dim=1, keepdim=True)
    raised = (value + shift).clamp(0, 1)
    return torch.where(value > 0, x * raised / value.clamp_min(1e-12), raised.expand_as(x))


def _per_image(x: torch.Tensor, edit: Callable[[Any], Any]) -> torch.Tensor:
    """Apply a Pillow ``edit`` to each image (mode "L" or "RGB") and come back to [0, 1]."""
    from PIL import Image

    channels = x.shape[1]
    if channels not in (1, 3):
        raise DataError(
            f"Pillow corruptions take 1 (greyscale) or 3 (RGB) channels, the images have {channels}"
        )
    pixels = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for image in pixels:
        pil = Image.fromarray(image[..., 0] if channels == 1 else image, mode="L" if channels == 1 else "RGB")
        edited = np.asarray(edit(pil), dtype=np.uint8).reshape(image.shape)
        out.append(torch.from_numpy(edited.copy()))
    return torch.stack(out).permute(0, 3, 1, 2).to(x.dtype) / 255


def _jpeg(quality: int) -> Callable[[Any], Any]:
    def edit(image: Any) -> Any:
        from PIL import Image

        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as reloaded:
            return reloaded.convert(image.mode)

    return edit


def jpeg_compression(x: torch.Tensor, quality: int, generator: torch.Generator) -> torch.Tensor:
    return _per_image(x, _jpeg(quality))


def pixelate(x: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    from PIL import Image

    height, width = x.shape[-2:]
    small = (max(1, int(width * factor)), max(1, int(height * factor)))
    return _per_image(
        x,
        lambda image: image.resize(small, Image.Resampling.BOX).resize((width, height), Image.Resampling.BOX),
    )


#: name → the function and its CIFAR-10-C parameters, severity 1 to 5.
CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": Corruption(gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10), "noise σ", True),
    "shot_noise": Corruption(shot_noise, (500, 250, 100, 75, 50), "photons λ per unit intensity", True),
    "impulse_noise": Corruption(
        impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07), "share of values replaced", True
    ),
    "speckle_noise": Corruption(
        speckle_noise, (0.06, 0.10, 0.12, 0.16, 0.20), "multiplicative noise σ", True
    ),
    "defocus_blur": Corruption(
        defocus_blur,
        ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),
        "(disk radius, anti-alias σ)",
        False,
    ),
    "gaussian_blur": Corruption(gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0), "blur σ (pixels)", False),
    "contrast": Corruption(contrast, (0.75, 0.5, 0.4, 0.3, 0.15), "contrast factor c", False),
    "brightness": Corruption(brightness, (0.05, 0.1, 0.15, 0.2, 0.3), "added HSV value b", False),
    "jpeg_compression": Corruption(jpeg_compression, (80, 65, 58, 50, 40), "JPEG quality", False),
    "pixelate": Corruption(pixelate, (0.95, 0.9, 0.85, 0.75, 0.65), "downscale factor", False),
}


def check_corruption(name: Any) -> Corruption:
    if not isinstance(name, str) or name not in CORRUPTIONS:
        raise DataError(f"unknown corruption {name!r} (allowed: {', '.join(CORRUPTIONS)})")
    return CORRUPTIONS[name]


def check_severity(severity: Any) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise DataError(f"severity must be one of {', '.join(map(str, SEVERITIES))}, got {severity!r}"[:200])
    return severity


def stream_seed(seed: int, name: str, severity: int) -> int:
    """The generator seed of one (seed, corruption, severity): a CRC of the three, so every pair of
    corruption and severity draws its own stream from one user seed."""
    return zlib.crc32(f"{name}:{severity}:{seed}".encode())


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``images`` (uint8 ``[N, C, H, W]``, C = 1 or 3) with corruption ``name`` at ``severity`` (1..5):
    uint8 of the same shape. The same (images, name, severity, seed) always gives the same bytes."""
    corruption = check_corruption(name)
    severity = check_severity(severity)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        what = (
            f"{images.dtype} of shape {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images)
        )
        raise DataError(f"corrupt takes uint8 images [N, C, H, W], got {what}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DataError(f"seed must be an integer, got {seed!r}")
    if images.shape[0] == 0:
        return images.clone()
    generator = torch.Generator().manual_seed(stream_seed(seed, name, severity))
    x = images.cpu().to(torch.float32) / 255
    out = corruption.apply(x, corruption.parameters[severity - 1], generator)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


__all__ = ["CORRUPTIONS", "SEVERITIES", "Corruption", "check_corruption", "check_severity", "corrupt"]
