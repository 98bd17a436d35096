"""Where masks come from besides the scorers: a pruned checkpoint's exact zeros, and the masks the sparsity
callbacks save with each Trainer checkpoint.

A checkpoint is read straight from its safetensors files (no model class is built, so no remote code
runs): every 2-D floating tensor, and every expert slice of a 3-D one (fused MoE experts, named
``name[e]``), whose share of exact zeros is at least ``min_sparsity`` is a pruned layer. The threshold
keeps out tensors with a stray zero row, such as an embedding's padding row.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .graphon import GraphonError

#: The tensors of a training-time method's saved state that are masks: ``mask.<parameter name>``.
STATE_MASK_PREFIX = "mask."


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise GraphonError(f"{index}: not a safetensors index ({exc})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise GraphonError(f"{folder}: shard {missing[0]} named by the index is missing")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GraphonError(f"{folder}: no safetensors weights (a checkpoint folder saved by save_pretrained)")
    return files


def masks_from_checkpoint(folder: str | Path, *, min_sparsity: float = 0.01) -> dict[str, torch.Tensor]:
    """{tensor name: bool mask (True = non-zero)} of every pruned 2-D weight (and expert slice) in a
    checkpoint folder, in file order; refuses a folder where nothing is pruned."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise GraphonError(f"{folder}: no such checkpoint folder")
    masks: dict[str, torch.Tensor] = {}
    considered = 0
    for path in _safetensors_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = handle.get_tensor(name)
                if not tensor.is_floating_point() or tensor.dim() not in (2, 3):
                    continue
                slices = (
                    [(name, tensor)]
                    if tensor.dim() == 2
                    else [(f"{name}[{e}]", t) for e, t in enumerate(tensor)]
                )
                for slice_name, matrix in slices:
                    considered += 1
                    mask = matrix != 0
                    if 1.0 - float(mask.float().mean()) >= min_sparsity:
                        masks[slice_name] = mask
    if not masks:
        raise GraphonError(
            f"{folder}: no prunable layer with pruned weights: none of its {considered} weight matrices has at "
            f"least {min_sparsity:.0%} exact zeros (prune or sparsify it first, e.g. hf-prune train with gmp)"
        )
    return masks


def masks_from_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The 2-D masks a sparsity callback saved (``hf_prune_method_state.safetensors`` in a Trainer
    ``checkpoint-N`` folder), by parameter name."""
    path = Path(path).expanduser()
    masks = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            if key.startswith(STATE_MASK_PREFIX):
                mask = handle.get_tensor(key)
                if mask.dim() == 2:
                    masks[key[len(STATE_MASK_PREFIX) :]] = mask.bool()
    if not masks:
        raise GraphonError(f"{path}: holds no 2-D masks (keys {STATE_MASK_PREFIX}<parameter>)")
    return masks
