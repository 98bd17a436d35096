"""Write a pruned checkpoint shard by shard, one decoder layer in memory at a time.

The output is what ``save_pretrained`` writes: ``model.safetensors``, or ``model-0000k-of-0000N.safetensors``
shards with ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), tensors named as the
model's ``state_dict`` names them, plus ``config.json`` (and ``generation_config.json`` when the source has
one). Tensors a model ties to others (``lm_head.weight`` with tied embeddings) are left out, as
``save_pretrained`` leaves them out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..output_safety import check_finite_tensors
from .layers import InMemoryModel, OffloadedModel, _prefix_of, release_freed_memory

#: Shard size ``save_pretrained`` uses by default in transformers 5.
MAX_SHARD_BYTES = 5 * 1000**3
LayerEdit = Callable[[nn.Module], None]


#: safetensors' names of the dtypes a checkpoint holds
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_COPY_CHUNK = 64 * 2**20


class ShardWriter:
    """Writes safetensors shards one tensor at a time: each tensor's bytes are appended to the open shard's
    data file as it arrives (and the tensor dropped), and the shard is closed (header, then the data) when
    the next tensor would take it past ``max_shard_bytes``. Memory holds one tensor, never a shard."""

    def __init__(self, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.entries: dict[str, dict] = {}  # the open shard's header entries
        self.data = None  # the open shard's data file
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        check_finite_tensors({name: tensor})
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        if self.entries and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        if self.data is None:
            self.data = open(self.folder / f".shard-{len(self.shards):05d}.data", "wb")  # noqa: SIM115
        if size:  # the tensor's own memory, no copy
            self.data.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self.entries[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.pending_bytes, self.pending_bytes + size],
        }
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        """Close the open shard: the 8-byte header length, the JSON header (padded to 8 bytes), the data."""
        if not self.entries:
            return
        data_path = Path(self.data.name)
        self.data.close()
        header = json.dumps(
            {"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")
        ).encode()
        header += b" " * (-len(header) % 8)
        name = f".shard-{len(self.shards):05d}.safetensors"
        with open(self.folder / name, "wb") as shard, open(data_path, "rb") as data:
            shard.write(len(header).to_bytes(8, "little"))
            shard.write(header)
            while chunk := data.read(_COPY_CHUNK):
                shard.write(chunk)
        data_path.unlink()
        self.shards.append((name, list(self.entries)))
        self.entries, self.data, self.pending_bytes = {}, None, 0

    def finish(self) -> list[str]:
        """Rename the shards to their final names and write the index; the file names written."""
        self.flush()
        count = len(self.shards)
        if count == 1:
            os.replace(self.folder / self.shards[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map = {}
        names = []
        for k, (temporary, tensors) in enumerate(self.shards, start=1):
            final = f"model-{k:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / temporary, self.folder / final)
            weight_map.update(dict.fromkeys(tensors, final))
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def saved_layout(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors renamed and split as ``save_pretrained`` writes them (its default ``save_original_format``:
    e.g. fused MoE experts back to one tensor per expert), so both engines write the same files."""
    from transformers.core_model_loading import revert_weight_conversion

    # hf_prune_<family> classes save the native layout (their save_pretrained sets save_original_format
    # False: transformers' legacy renaming is keyed by the stock model_type and would not be undone on load).
    if model.config.model_type.startswith("hf_prune_"):
        return tensors
    return revert_weight_conversion(model, tensors)


def _tied_names(model: nn.Module) -> set[str]:
    """Tensor names ``save_pretrained`` drops because they share storage with another (tied weights)."""
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return set()
    output = model.get_output_embeddings()
    return {f"{_prefix_of(model, output)}weight"} if output is not None else set()


def write_pruned_weights(
    source: OffloadedModel | InMemoryModel,
    adapter: Any,
    folder: Path,
    *,
    removed_layers: list[int],
    layer_edits: dict[int, LayerEdit] | None = None,
    layout_model: nn.Module | None = None,
    new_tensors: dict[str, torch.Tensor] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Write the source's weights without ``removed_layers`` (the rest renumbered), each layer in
    ``layer_edits`` materialised and edited first, plus ``new_tensors`` (the stage's own, e.g. a trained
    retainer); the shard files written. Tensor names and layout follow
    what ``layout_model.save_pretrained`` would write (the pruned model's class; default the source's)."""
    model = source.model
    layout_model = layout_model if layout_model is not None else model
    layers = adapter.layers(model)
    layers_prefix = _prefix_of(model, layers)
    tied = _tied_names(model)
    writer = ShardWriter(folder, max_shard_bytes)
    # Everything outside the decoder layers (embeddings, norms, head, a vision tower), read from disk.
    # (one at a time: the embeddings and the head are the largest single tensors)
    for name, tensor in source.tensors_of(model, skip=lambda n: n.startswith(layers_prefix) or n in tied):
        for saved_name, saved in saved_layout(layout_model, {name: tensor}).items():
            writer.add(saved_name, saved)
        del tensor, saved
        release_freed_memory()
    for name, tensor in (new_tensors or {}).items():
        writer.add(name, tensor)
    removed = set(removed_layers)
    edits = layer_edits or {}
    new_index = 0
    for old_index, layer in enumerate(layers):
        if old_index in removed:
            continue
        prefix = f"{layers_prefix}{new_index}."
        if old_index in edits:
            with source.materialized(layer) as module:
                edits[old_index](module)
                tensors = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            tensors = dict(source.tensors_of(layer))
        for name, tensor in saved_layout(layout_model, {prefix + k: v for k, v in tensors.items()}).items():
            writer.add(name, tensor)
        new_index += 1
        del tensors
        release_freed_memory()
        if progress is not None:
            progress(1)
    return writer.finish()
