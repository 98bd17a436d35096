"""Labelled image sets for image classifiers, read without torchvision, and the pixel values a model takes.

Two on-disk layouts are read:

- an **IDX folder** (MNIST / Fashion-MNIST): ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``;
- an **image folder**: one sub-folder per class (``<root>/<class>/*.png|jpg|...``), classes in sorted order
  (the layout of ``../shared/assets/images/cifar10-test-500`` and of datasets' ``imagefolder``); ``split``
  picks ``<root>/<split>/`` when that folder exists.

Images come back as uint8 ``[N, C, H, W]`` (C = 1 for grayscale, 3 for colour): the form the corruptions
and augmentations take, and the form CIFAR-10-C stores.

    images = read_image_set("../shared/assets/images/fashion-mnist", split="test", limit=1000)
    pixels = pixel_values(images.images, processor)     # float, normalised as the model's processor says
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .analysis.idx_images import read_idx_image_set
from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass
class ImageSet:
    """``images`` uint8 ``[N, C, H, W]``; ``labels`` int64 ``[N]``; ``class_names`` in label order."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def read_image_set(source: str | os.PathLike, split: str = "test", limit: int | None = None) -> ImageSet:
    """The labelled images of ``source`` (an IDX folder or a class-per-folder image folder), at most
    ``limit`` of them (an image folder takes the first ``limit`` in sorted order, classes interleaved)."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1 (or none for every image), got {limit}")
    root = Path(source)
    if not root.is_dir():
        raise DataError(
            f"image data {str(source)!r}: not a folder (expected an IDX folder or class sub-folders)"
        )
    if any(root.glob("*-images-idx3-ubyte.gz")):
        return _read_idx_folder(root, split, limit)
    if (root / split).is_dir():
        root = root / split
    return _read_class_folders(root, limit)


def _read_idx_folder(root: Path, split: str, limit: int | None) -> ImageSet:
    try:
        images, labels = read_idx_image_set(root, split, limit)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"image data {root}: {exc}") from None
    names = list(FASHION_MNIST_CLASSES) if int(labels.max(initial=0)) < 10 else []
    names = names or [str(i) for i in range(int(labels.max()) + 1)]
    return ImageSet(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long(), names)


def _read_class_folders(root: Path, limit: int | None) -> ImageSet:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"image data {root}: no class sub-folders and no IDX files (expected <root>/<class>/*.png or "
            "{train,t10k}-images-idx3-ubyte.gz)"
        )
    per_class = [
        sorted(f for f in (root / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes
    ]
    empty = [c for c, files in zip(classes, per_class, strict=True) if not files]
    if empty:
        raise DataError(f"image data {root}: class folder(s) with no images: {', '.join(empty[:5])}")
    # Interleave the classes so that a limit keeps them balanced.
    order = [
        (label, files[i])
        for i in range(max(map(len, per_class)))
        for label, files in enumerate(per_class)
        if i < len(files)
    ]
    order = order[:limit] if limit else order
    arrays, labels, mode, size = [], [], None, None
    for label, path in order:
        try:
            with Image.open(path) as image:
                mode = mode or ("L" if image.mode in ("L", "1", "I;16") else "RGB")
                pixels = torch.from_numpy(_as_array(image.convert(mode)))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"image data {path}: not a readable image ({exc})") from None
        size = size or tuple(pixels.shape)
        if tuple(pixels.shape) != size:
            raise DataError(
                f"image data {path}: size {tuple(pixels.shape)} differs from the first image's {size}; "
                "resize the set to one size first"
            )
        arrays.append(pixels)
        labels.append(label)
    images = torch.stack(arrays)
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return ImageSet(images.contiguous(), torch.tensor(labels, dtype=torch.long), classes)


def _as_array(image: Any) -> Any:
    import numpy as np

    return np.asarray(image, dtype=np.uint8).copy()


def normalisation(processor: Any, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of shape ``[1, C, 1, 1]`` that the model's image processor normalises with (0 and 1
    when there is no processor or it does not normalise)."""
    mean, std = [0.0] * channels, [1.0] * channels
    if processor is not None and getattr(processor, "do_normalize", False):
        mean, std = _per_channel(processor.image_mean, channels), _per_channel(processor.image_std, channels)
    return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


def _per_channel(values: Any, channels: int) -> list[float]:
    values = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise DataError(f"the image processor normalises {len(values)} channels, the images have {channels}")
    return values


def pixel_values(images: torch.Tensor, processor: Any = None) -> torch.Tensor:
    """The model input for ``images`` (uint8 ``[N, C, H, W]``, or float in [0, 1]): scaled to [0, 1], then
    normalised with the processor's mean and std. A processor that would resize to another size is refused
    (hf-prune's image tasks and training feed images at their stored size)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if processor is not None and getattr(processor, "do_resize", False):
        size = getattr(processor, "size", None) or {}
        wanted = (size.get("height"), size.get("width")) if isinstance(size, dict) else (size, size)
        if wanted != tuple(x.shape[-2:]):
            raise DataError(
                f"the model's image processor resizes to {wanted}, the images are {tuple(x.shape[-2:])}: "
                "save the processor with do_resize=False or resize the image set"
            )
    mean, std = normalisation(processor, x.shape[1])
    return (x - mean) / std
