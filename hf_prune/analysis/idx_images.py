"""Image sets in the IDX gzip format of MNIST and Fashion-MNIST (no torchvision): the four files
``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` in one folder."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

_SPLIT_PREFIX = {"test": "t10k", "train": "train"}
_IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def read_idx(path: Path, *, magic: int, limit: int | None) -> np.ndarray:
    """The uint8 array in one gzip IDX file; with ``limit``, only the first ``limit`` items are read."""
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
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


def read_idx_image_set(
    folder: str | os.PathLike, split: str = "test", limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of a split: uint8 ``[N, H, W]`` and uint8 ``[N]`` class indices.

    ``limit`` reads only the first ``limit`` examples (the gzip stream is not decoded past them)."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(_SPLIT_PREFIX)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for the whole split), got {limit}")
    folder = Path(folder)
    prefix = _SPLIT_PREFIX[split]
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", magic=_IMAGE_MAGIC, limit=limit)
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", magic=_LABEL_MAGIC, limit=limit)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {split} split has {len(images)} images but {len(labels)} labels")
    return images, labels
