"""Calibration activations carried from layer to layer: in memory while they fit a budget, spilled to disk
when they do not, and validated whenever they are read back.

A spilled entry is one safetensors file, written under a temporary name and renamed into place (a killed
run leaves no half-written entry under a real name), holding the SHA-256 of its tensors' bytes in its
metadata; a read recomputes the digest, so a damaged or truncated file is detected and recomputed, never
used. Entries on disk outlive the process: a run restarted with the same fingerprint (model files,
calibration tokens, stage settings) reuses them, any other fingerprint clears the folder first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import HfPruneError
from ..output_safety import format_bytes

FINGERPRINT_FILE = "fingerprint.json"


class ActivationCacheWarning(UserWarning):
    """A spilled activation failed its checksum and is recomputed."""


class DiskSpaceError(HfPruneError):
    """The activation cache's disk cannot hold what the run would spill."""


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class ActivationStore:
    """Named lists of tensors (one per calibration batch), kept in memory up to ``memory_budget`` bytes and
    on disk in ``folder`` beyond it."""

    def __init__(self, folder: str | os.PathLike | None, memory_budget: int, fingerprint: str):
        self.folder = Path(folder) if folder is not None else None
        self.memory_budget = memory_budget
        self.fingerprint = fingerprint
        self._memory: dict[str, list[torch.Tensor]] = {}
        self.spilled_bytes = 0
        self.reused: list[str] = []
        if self.folder is not None:
            self._open_folder()

    def _open_folder(self) -> None:
        assert self.folder is not None
        marker = self.folder / FINGERPRINT_FILE
        try:
            same = json.loads(marker.read_text())["fingerprint"] == self.fingerprint
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        if not same and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not same:
            marker.write_text(json.dumps({"fingerprint": self.fingerprint}))

    @property
    def memory_bytes(self) -> int:
        return sum(nbytes(v) for v in self._memory.values())

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    def put(self, key: str, tensors: list[torch.Tensor], *, to_disk: bool = False) -> None:
        """Keep ``tensors`` under ``key``: in memory within the budget, else (or with ``to_disk``, for a
        small entry a restart must find) on disk."""
        tensors = [t.detach() for t in tensors]
        size = nbytes(tensors)
        fits = self.memory_bytes + size <= self.memory_budget
        if self.folder is None or (fits and not to_disk):
            self._memory[key] = tensors
            return
        path = self._path(key)
        temporary = path.with_name(f".{path.name}.partial")
        named = {f"{i:06d}": t.contiguous().cpu() for i, t in enumerate(tensors)}
        save_file(named, str(temporary), metadata={"sha256": tensor_digest(list(named.values()))})
        os.replace(temporary, path)
        self.spilled_bytes += size

    def get(self, key: str) -> list[torch.Tensor] | None:
        """The entry, or None when it is absent or (on disk) fails its checksum."""
        if key in self._memory:
            return self._memory[key]
        if self.folder is None or not self._path(key).is_file():
            return None
        path = self._path(key)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                expected = (handle.metadata() or {}).get("sha256")
            loaded = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            return self._damaged(path, f"unreadable ({exc})")
        tensors = [loaded[name] for name in sorted(loaded)]
        if expected is None or tensor_digest(tensors) != expected:
            return self._damaged(path, "its checksum does not match")
        return tensors

    def _damaged(self, path: Path, why: str) -> None:
        warnings.warn(
            f"activation cache {path.name}: {why}; recomputing it", ActivationCacheWarning, stacklevel=3
        )
        path.unlink(missing_ok=True)
        return None

    def has_on_disk(self, key: str) -> bool:
        return self.folder is not None and self._path(key).is_file()

    def discard(self, key: str) -> None:
        self._memory.pop(key, None)
        if self.folder is not None:
            self._path(key).unlink(missing_ok=True)

    def drop_memory(self) -> None:
        """Forget the entries held in memory (those on disk stay)."""
        self._memory.clear()

    def close(self, *, remove: bool = True) -> None:
        self._memory.clear()
        if remove and self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)


def check_disk_space(folder: str | os.PathLike, needed: int) -> None:
    """Refuse, before the run starts, a cache folder whose file system has less than ``needed`` bytes free."""
    probe = Path(folder).expanduser().resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DiskSpaceError(
            f"activation_cache: the calibration activations need {format_bytes(needed)} on disk in {folder}, "
            f"and its file system has {format_bytes(free)} free; point activation_cache at a larger disk, "
            "raise activation_memory_gb, or calibrate on fewer tokens"
        )
