"""Fashion-MNIST from its IDX gzip files (no torchvision), and a tiny VQA set written from it.

The shared assets hold the four original files (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``):
28×28 grayscale uint8 images in 10 classes, 60k for training and 10k for testing.

    images, labels = read_fashion_mnist(shared / "images/fashion-mnist", limit=100)
    write_vqa_set(tmp / "images", tmp / "vqa.jsonl", n=8, seed=0, source=shared / "images/fashion-mnist")
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np

#: Class names in label order (0..9), as published with the dataset.
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

#: Where the files live beside a source checkout (``<repo>/../shared/assets/images/fashion-mnist``).
DEFAULT_FASHION_MNIST_DIR = (
    Path(__file__).resolve().parents[3] / "shared" / "assets" / "images" / "fashion-mnist"
)

_SPLIT_PREFIX = {"test": "t10k", "train": "train"}
_IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension

VQA_QUESTION = "what is this?"


def _read_idx(path: Path, *, magic: int, limit: int | None) -> np.ndarray:
    """The uint8 array in one gzip IDX file; with ``limit``, only the first ``limit`` items are read."""
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST file not found: {path}")
    with gzip.open(path, "rb") as handle:
        header = handle.read(4)
        if len(header) != 4 or int.from_bytes(header, "big") != magic:
            raise ValueError(
                f"{path}: not an IDX file of the expected kind (magic {header.hex() or 'missing'}, "
                f"expected {magic:08x})"
            )
        ndim = magic & 0xFF
        dims = [int.from_bytes(handle.read(4), "big") for _ in range(ndim)]
        count = dims[0] if limit is None else min(limit, dims[0])
        item_size = int(np.prod(dims[1:], dtype=np.int64)) if ndim > 1 else 1
        payload = handle.read(count * item_size)
    if len(payload) != count * item_size:
        raise ValueError(f"{path}: truncated ({len(payload)} bytes of data, expected {count * item_size})")
    return np.frombuffer(payload, dtype=np.uint8).reshape(count, *dims[1:]).copy()


def read_fashion_mnist(
    folder: str | os.PathLike, split: str = "test", limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of a split: uint8 ``[N, 28, 28]`` and uint8 ``[N]`` (class indices 0..9).

    ``limit`` reads only the first ``limit`` examples (the gzip stream is not decoded past them).
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected one of {', '.join(_SPLIT_PREFIX)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for the whole split), got {limit}")
    folder = Path(folder)
    prefix = _SPLIT_PREFIX[split]
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", magic=_IMAGE_MAGIC, limit=limit)
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", magic=_LABEL_MAGIC, limit=limit)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {split} split has {len(images)} images but {len(labels)} labels")
    return images, labels


def write_vqa_set(
    images_dir: str | os.PathLike,
    out_jsonl: str | os.PathLike,
    n: int,
    seed: int,
    *,
    source: str | os.PathLike | None = None,
    split: str = "test",
    size: int = 32,
) -> Path:
    """Save ``n`` Fashion-MNIST images, drawn without replacement with ``seed``, as ``size``×``size``
    grayscale PNGs in ``images_dir``, and write a VQA JSONL (``out_jsonl``) with one row per image:
    ``{"image", "question": "what is this?", "answers": [class name], "label": class index}``.

    Image paths are written relative to the JSONL file's folder (the VQA task resolves them so).
    ``source`` is the folder with the IDX files (default: the shared assets beside the checkout).
    Returns the JSONL path.
    """
    from PIL import Image

    images, labels = read_fashion_mnist(DEFAULT_FASHION_MNIST_DIR if source is None else source, split=split)
    if not 1 <= n <= len(images):
        raise ValueError(f"n must be between 1 and {len(images)} (the {split} split), got {n}")
    chosen = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    images_dir = Path(images_dir)
    out_jsonl = Path(out_jsonl)
    images_dir.mkdir(parents=True, exist_ok=True)
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in chosen.tolist():
        label = int(labels[index])
        image_path = images_dir / f"fashion_mnist_{split}_{index:05d}.png"
        Image.fromarray(images[index]).resize((size, size), Image.Resampling.BILINEAR).save(image_path)
        rows.append(
            {
                "image": os.path.relpath(image_path.resolve(), out_jsonl.parent.resolve()),
                "question": VQA_QUESTION,
                "answers": [FASHION_MNIST_CLASSES[label]],
                "label": label,
            }
        )
    with out_jsonl.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return out_jsonl


__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "VQA_QUESTION",
    "read_fashion_mnist",
    "write_vqa_set",
]
