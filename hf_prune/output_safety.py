"""Keeping a save from destroying anything: which output folders may be replaced, room to write, clean-up of
an interrupted save's leftovers, finite weights and strict JSON.

A save replaces its output folder whole (DESIGN.md §5.4), so everything here runs before anything is written:
the folder checks in the pipeline's preflight (before weights load), the tensor check just before the save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import HfPruneError, RecipeError

logger = logging.getLogger("hf_prune")

#: Every hf-prune output holds this report; a folder holding it is an earlier output and may be replaced.
REPORT_FILE = "hf_prune.json"
#: The on-disk files a model's weights live in (their size estimates what a save needs).
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_OVERWRITE_HINT = (
    "pass --overwrite (overwrite: true in the recipe) to replace it, or choose another output folder"
)


# ---- which folders a save may replace -------------------------------------------------------------------


def is_earlier_output(folder: Path) -> bool:
    return (folder / REPORT_FILE).is_file()


def check_output_folder(
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    protected_files: Iterable[tuple[str, str | os.PathLike]] = (),
    required_bytes: int = 0,
) -> Path:
    """Refuse an output whose replacement would delete what is not ours, or that cannot be written.

    Never replaced, even with ``overwrite``: the filesystem root, the working folder, the home folder,
    their ancestors, and any folder holding one of ``protected_files`` (``(recipe key, path)`` pairs: the
    recipe file, local data files). An existing folder that is neither empty nor an earlier hf-prune
    output needs ``overwrite``. Then the folder the output goes into must be writable with
    ``required_bytes`` free. Returns the resolved output path.
    """
    out = Path(output).expanduser().resolve()
    named = str(output) if str(output) == str(out) else f"{output} ({out})"
    if out.parent == out:
        raise RecipeError(f"output: {named} is the filesystem root; choose another output folder")
    for what, path in _never_replaced(protected_files):
        if out == path or out in path.parents:
            relation = f"is {what}" if out == path else f"contains {what} {path}"
            raise RecipeError(
                f"output: {named} {relation}; a save replaces its output folder whole, so "
                "choose another output folder (--overwrite never replaces it)"
            )
    if out.is_dir() and not overwrite and not is_earlier_output(out) and any(out.iterdir()):
        raise RecipeError(
            f"output: {named} already exists and is not an earlier hf-prune output (it has no "
            f"{REPORT_FILE}); saving would delete everything in it: {_OVERWRITE_HINT}"
        )
    _check_writable(named, out)
    _check_free_space(named, out, required_bytes)
    return out


def _never_replaced(protected_files: Iterable[tuple[str, str | os.PathLike]]) -> Iterator[tuple[str, Path]]:
    yield "the current working folder", Path.cwd().resolve()
    with contextlib.suppress(RuntimeError, KeyError):  # no home folder known
        yield "your home folder", Path.home().resolve()
    for key, path in protected_files:
        yield key, Path(path).expanduser().resolve()


def _nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def _check_writable(named: str, out: Path) -> None:
    """The save makes a folder beside the output (creating missing parents): that must be possible."""
    where = _nearest_existing(out.parent)
    if not where.is_dir():
        raise RecipeError(f"output: {named} cannot be created: {where} is a file, not a folder")
    problem = None if os.access(where, os.W_OK | os.X_OK) else "permission denied"
    if problem is None:  # os.access ignores read-only mounts for root and cannot see every refusal: try
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".hf_prune-write-probe-", dir=where))
        except OSError as exc:
            problem = exc.strerror or type(exc).__name__
    if problem is not None:
        raise RecipeError(
            f"output: {named} cannot be written: {where} is not writable ({problem}); "
            "choose an output folder you can write to"
        )


def _check_free_space(named: str, out: Path, required_bytes: int) -> None:
    if required_bytes <= 0:
        return
    where = _nearest_existing(out.parent)
    free = shutil.disk_usage(where).free
    if free < required_bytes:
        raise RecipeError(
            f"output: not enough free disk space for {named}: {format_bytes(free)} free in {where}, "
            f"the save needs about {format_bytes(required_bytes)} (the source model's weights); "
            "free some space or choose another output folder"
        )


def weight_files_size(model_folder: str | os.PathLike | None) -> int:
    """Bytes of a local model folder's weight files (0 for a hub id: unknown before the download)."""
    if model_folder is None or not Path(model_folder).expanduser().is_dir():
        return 0
    return sum(
        p.stat().st_size
        for p in Path(model_folder).expanduser().iterdir()
        if p.suffix in WEIGHT_SUFFIXES and p.is_file()
    )


def format_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


# ---- leftovers of an interrupted save -------------------------------------------------------------------


def temporary_folder_pattern(target: Path) -> re.Pattern[str]:
    """Names ``atomic_write_dir`` gives the folders beside ``target``: ``.NAME.tmp-<8 hex>``, ``.NAME.old-<8 hex>``."""
    return re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-[0-9a-f]{{8}}")


@contextlib.contextmanager
def save_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while a save uses it, so a concurrent save's clean-up passes it by.

    The kernel drops the lock when the process dies, so a killed save's folders are unlocked (stale)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent saves to one output are not guarded there
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the ``.NAME.tmp-*`` / ``.NAME.old-*`` folders a killed save left beside ``target``, and return them.

    A save killed between its two renames left the previous output only as ``.NAME.old-*``; with ``target``
    missing, that folder is renamed back first. Folders another running save holds locked are left alone."""
    pattern = temporary_folder_pattern(target)
    if not target.parent.is_dir():
        return []
    stale = [
        p
        for p in target.parent.iterdir()
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink() and not _locked_by_a_live_save(p)
    ]
    olds = sorted((p for p in stale if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.replace(olds[-1], target)
        logger.warning("restored %s from %s, left by an interrupted save", target, olds[-1].name)
        stale.remove(olds[-1])
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
        logger.warning("removed stale temporary folder %s (left by an interrupted save)", folder)
    return stale


def _locked_by_a_live_save(folder: Path) -> bool:
    try:
        with save_lock(folder):
            return False
    except BlockingIOError:
        return True
    except OSError:  # vanished meanwhile, or cannot be opened: not ours to remove
        return True


# ---- what is written ------------------------------------------------------------------------------------


def check_finite_tensors(state_dict: dict[str, Any]) -> None:
    """Refuse to save NaN or infinite weights (a diverged stage), naming the first tensor holding some."""
    import torch

    bad = []
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
            continue
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad.append((name, int((~torch.isfinite(tensor)).sum())))
    if bad:
        name, count = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise HfPruneError(
            f"{name} holds {count} NaN/inf values{more}; nothing was saved (a stage produced "
            "non-finite weights: check its settings, e.g. a learning rate)"
        )


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, so it encodes as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def strict_json_dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always yields strict JSON: NaN/inf floats become null (also inside ``default``'s
    results, e.g. a tensor's list)."""
    default = kwargs.pop("default", None)
    encode_other = (lambda item: finite_or_null(default(item))) if default else None
    return json.dumps(finite_or_null(value), allow_nan=False, default=encode_other, **kwargs)
