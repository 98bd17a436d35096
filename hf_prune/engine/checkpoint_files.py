"""The safetensors files of a local checkpoint, checked before a sequential run reads any of them.

A sharded checkpoint has ``model.safetensors.index.json`` (``weight_map``: tensor name → shard file); an
unsharded one a single ``model.safetensors``. A broken index or a missing shard would otherwise surface
as a KeyError deep inside loading, or (transformers fills missing weights at random) not at all.
``SafetensorsReader`` reads single tensors of those files with plain reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ModelError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class CheckpointFiles:
    folder: Path
    #: tensor name → the shard file holding it
    weight_map: dict[str, str]

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    @property
    def total_bytes(self) -> int:
        return sum((self.folder / shard).stat().st_size for shard in self.shards)


def read_checkpoint_files(folder: str | os.PathLike, *, check_tensors: bool = True) -> CheckpointFiles:
    """The weight map of ``folder``; a ModelError naming the file when the index is not valid JSON, names a
    shard that is missing, or (``check_tensors``) lists a tensor its shard does not hold."""
    folder = Path(folder).expanduser()
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{index}: not a valid safetensors index ({exc})") from None
        except (KeyError, TypeError):
            raise ModelError(f"{index}: not a safetensors index (no 'weight_map' object)") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ModelError(f"{index}: 'weight_map' must map tensor names to shard file names")
        if not weight_map:
            raise ModelError(f"{index}: 'weight_map' lists no tensors")
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise ModelError(f"{index}: shard {shard!r} is not a file name in the checkpoint folder")
            if not (folder / shard).is_file():
                named = sum(1 for v in weight_map.values() if v == shard)
                raise ModelError(
                    f"{folder}: shard {shard} is missing (the index names it for {named} tensor(s)); "
                    "download or copy the whole checkpoint again"
                )
    elif (folder / SINGLE_FILE).is_file():
        weight_map = {name: SINGLE_FILE for name in _tensor_names(folder / SINGLE_FILE)}
        check_tensors = False
    else:
        raise ModelError(
            f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; the sequential engine reads safetensors checkpoints"
        )
    if check_tensors:
        by_shard: dict[str, set[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, set()).add(name)
        for shard, names in sorted(by_shard.items()):
            absent = sorted(names - _tensor_names(folder / shard))
            if absent:
                raise ModelError(
                    f"{folder / shard}: the index places {len(absent)} tensor(s) in this shard that it does "
                    f"not hold, e.g. {absent[0]}"
                )
    return CheckpointFiles(folder, dict(weight_map))


def _tensor_names(path: Path) -> set[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return set(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None


class SafetensorsReader:
    """Reads single tensors of safetensors files with plain file reads, each file's header parsed once."""

    DTYPES = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }

    def __init__(self) -> None:
        self._headers: dict[str, tuple[dict, int]] = {}

    def _header(self, path: str) -> tuple[dict, int]:
        if path not in self._headers:
            with open(path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                self._headers[path] = (json.loads(handle.read(length)), 8 + length)
        return self._headers[path]

    def read(self, path: str, name: str) -> torch.Tensor:
        header, data_start = self._header(path)
        entry = header[name]
        begin, end = entry["data_offsets"]
        dtype = self.DTYPES[entry["dtype"]]
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        buffer = bytearray(end - begin)
        with open(path, "rb") as handle:
            handle.seek(data_start + begin)
            if handle.readinto(buffer) != len(buffer):
                raise OSError(f"{path}: {name} is cut short (the file is truncated)")
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])
