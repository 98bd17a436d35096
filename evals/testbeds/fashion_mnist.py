"""Fashion-MNIST from its IDX gzip files (no torchvision), and a tiny VQA set written from it.

The shared assets hold the four original files (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``):
28×28 grayscale uint8 images in 10 classes, 60k for training and 10k for testing.

    images, labels = read_fashion_mnist(shared / "images/fashion-mnist", limit=100)
    write_vqa_set(tmp / "images", tmp / "vqa.jsonl", n=8, seed=0, source=shared / "images/fashion-mnist")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ...analysis.idx_images import read_idx_image_set
from ...image_data import FASHION_MNIST_CLASSES as FASHION_MNIST_CLASS_NAMES

#: Class names in label order (0..9), as published with the dataset.
FASHION_MNIST_CLASSES = FASHION_MNIST_CLASS_NAMES

#: Where the files live beside a source checkout (``<repo>/../shared/assets/images/fashion-mnist``).
DEFAULT_FASHION_MNIST_DIR = (
    Path(__file__).resolve().parents[3] / "shared" / "assets" / "images" / "fashion-mnist"
)

VQA_QUESTION = "what is this?"


def read_fashion_mnist(
    folder: str | os.PathLike, split: str = "test", limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of a split: uint8 ``[N, 28, 28]`` and uint8 ``[N]`` (class indices 0..9).

    ``limit`` reads only the first ``limit`` examples (the gzip stream is not decoded past them).
    """
    return read_idx_image_set(folder, split, limit)


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
