"""Run a decoder one layer at a time over every calibration batch.

``OffloadedModel`` loads a checkpoint through transformers' ``device_map={"": "disk"}`` (accelerate's disk
offload): parameters stay on the meta device, tensors stored as-is are read from the checkpoint's own
safetensors files (memory-mapped), and only tensors transformers converts on load (e.g. per-expert MoE
weights fused into 3-D ones) are written once to ``offload_folder``. Modules are then materialised one at
a time, so peak memory is about one decoder layer plus the activations. ``InMemoryModel`` gives the same
interface over a model already loaded (materialising is then a no-op). ``OffloadedModel.dispatched()`` is
the whole model for a method that runs it end to end (a trained token retainer): accelerate's hooks read
each module's weights when it runs.

``LayerRunner`` carries activations forward: one decoder pass with every layer replaced by a recorder
gives the hidden states entering layer 0 and the keyword arguments (masks, rotary position embeddings)
each layer receives; then ``run_layer(i, inputs)`` applies layer i to every batch.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..activations import capture_outputs
from ..calibration import CalibrationBatch
from .checkpoint_files import SafetensorsReader


def _prefix_of(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return f"{name}." if name else ""
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def release_freed_memory() -> None:
    """Hand memory freed by the last layer back to the system (glibc keeps large freed blocks in its heap,
    so the process would otherwise grow by about a layer at each step). A no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _keep_all(name: str) -> bool:
    return False


class InMemoryModel:
    """A loaded model behind the interface ``LayerRunner`` uses."""

    def __init__(self, model: nn.Module, device: torch.device | str | None = None):
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    @contextlib.contextmanager
    def materialized(self, module: nn.Module, *, exclude: nn.Module | None = None) -> Iterator[nn.Module]:
        yield module

    def tensors_of(
        self, module: nn.Module, skip: Callable[[str], bool] = _keep_all
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in module.state_dict().items():
            if not skip(name):
                yield name, tensor


@contextlib.contextmanager
def _read_checkpoints_without_mmap() -> Iterator[None]:
    """While transformers loads: its safetensors files opened with plain reads (``backend="pread"``, as it
    does itself on Windows and MPS) instead of a memory map. Tensors it converts on load (per-expert MoE
    weights fused into 3-D ones) are then read, converted and offloaded one at a time; through a memory map
    every page they touched stayed mapped, counted in the process's RSS, until the whole load ended (the
    3.9 GB Mixtral of ``bench_sequential`` peaked at 1.06× its weights, 0.26× with plain reads). Only for
    checkpoints converted on load: for the others (nothing read while loading) plain reads measured worse
    (the 3.8 GB Llama: 0.54× against 0.35×). A no-op where transformers' loader does not look as expected."""
    from transformers import modeling_utils

    original = getattr(modeling_utils, "safe_open", None)
    if original is None:
        yield
        return

    def safe_open_with_reads(filename: Any, framework: str, device: Any = "cpu", **kwargs: Any) -> Any:
        if kwargs.get("backend", "mmap") == "mmap" and str(device) == "cpu":
            kwargs["backend"] = "pread"
        return original(filename, framework=framework, device=device, **kwargs)

    modeling_utils.safe_open = safe_open_with_reads
    try:
        yield
    finally:
        modeling_utils.safe_open = original


class OffloadedModel:
    """A checkpoint whose weights stay on disk until a module is materialised (see the module docstring)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        auto_class: Any,
        *,
        offload_folder: str | os.PathLike,
        dtype: Any = "auto",
        device: str = "cpu",
        trust_remote_code: bool = False,
        converted_on_load: bool = False,
    ):
        from accelerate.hooks import remove_hook_from_submodules

        reads = _read_checkpoints_without_mmap() if converted_on_load else contextlib.nullcontext()
        with reads:
            model = auto_class.from_pretrained(
                folder,
                device_map={"": "disk"},
                offload_folder=str(offload_folder),
                dtype=dtype,
                trust_remote_code=trust_remote_code,
            )
        # Every offloaded tensor's loader (full name → tensor read from disk on access) is shared by the
        # hooks accelerate attached; keep it, drop the hooks: modules are materialised explicitly here.
        loaders = [
            m._hf_hook.weights_map.dataset
            for m in model.modules()
            if getattr(getattr(m, "_hf_hook", None), "weights_map", None) is not None
        ]
        if not loaders:
            raise RuntimeError("the disk-offloaded model has no offloaded weights")
        self.weights = loaders[0]
        # (a Mapping's ``in`` would read the tensor: accelerate's loader defines no __contains__)
        self.names = frozenset(self.weights)
        remove_hook_from_submodules(model)
        self._reader = SafetensorsReader()
        self.model = model.eval()
        self.device = torch.device(device)

    @contextlib.contextmanager
    def dispatched(self) -> Iterator[nn.Module]:
        """The whole model for a method that runs it end to end (trains a small module through it): a copy
        of the weightless model with accelerate's hooks, which read each module's weights from disk
        (accelerate's loader: views of the memory-mapped checkpoint, faster than ``read`` and released
        with the module's weights) when it runs and drop them after. A backward through it holds every
        weight its forward read unless the layers run under activation checkpointing. The hooks go with the
        copy after the block; the source model is untouched."""
        from accelerate.hooks import attach_align_device_hook, remove_hook_from_submodules

        model = copy.deepcopy(self.model)
        attach_align_device_hook(model, execution_device=self.device, offload=True, weights_map=self.weights)
        model.hf_device_map = {"": "disk"}  # as transformers records a model offloaded whole (model_device)
        try:
            yield model
        finally:
            remove_hook_from_submodules(model)
            del model
            release_freed_memory()

    def read(self, full_name: str) -> torch.Tensor:
        """One tensor from disk, read into ordinary memory (not a view of a memory-mapped file: those pages
        would stay resident, counted in the process's RSS, as long as any tensor read from them lives)."""
        info = self.weights.index.get(full_name) if full_name not in self.weights.state_dict else None
        if info is None or info.get("safetensors_file") is None:
            return self.weights[full_name]
        tensor = self._reader.read(info["safetensors_file"], info.get("weight_name", full_name))
        return tensor.to(getattr(torch, info["dtype"])) if "dtype" in info else tensor

    def _tensor_names(self, module: nn.Module, exclude: nn.Module | None) -> list[tuple[nn.Module, str, str]]:
        """(owning module, local name, full name) of every tensor under ``module`` held on disk."""
        prefix = _prefix_of(self.model, module)
        skipped = {id(m) for m in exclude.modules()} if exclude is not None else set()
        found = []
        for name, sub in module.named_modules():
            if id(sub) in skipped:
                continue
            for local, _ in list(sub.named_parameters(recurse=False)) + list(
                sub.named_buffers(recurse=False)
            ):
                full = f"{prefix}{name}.{local}" if name else f"{prefix}{local}"
                if full in self.names:
                    found.append((sub, local, full))
        return found

    @contextlib.contextmanager
    def materialized(self, module: nn.Module, *, exclude: nn.Module | None = None) -> Iterator[nn.Module]:
        """Load ``module``'s tensors (those of ``exclude`` left on meta) for the block, then free them."""
        from accelerate.utils import set_module_tensor_to_device

        names = self._tensor_names(module, exclude)
        try:
            for owner, local, full in names:
                set_module_tensor_to_device(owner, local, self.device, value=self.read(full))
            yield module
        finally:
            for owner, local, _ in names:
                set_module_tensor_to_device(owner, local, "meta")
            release_freed_memory()

    def tensors_of(
        self, module: nn.Module, skip: Callable[[str], bool] = _keep_all
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``module``'s tensors as its ``state_dict`` names them, each read from disk when the iteration
        reaches it (the module stays on meta); names for which ``skip`` is true are not read."""
        prefix = _prefix_of(self.model, module)
        for _, _, full in self._tensor_names(module, None):
            if not skip(full[len(prefix) :]):
                yield full[len(prefix) :], self.read(full)


class _LayerRecorder(nn.Module):
    """Stands in for a decoder layer during the recording pass: notes its inputs and passes them on."""

    def __init__(self, index: int, sink: list[dict[str, Any]]):
        super().__init__()
        self.index = index
        self.sink = sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise RuntimeError("decoder layers are expected to take their inputs after hidden_states by name")
        self.sink.append({"layer": self.index, "hidden": hidden_states, "kwargs": kwargs})
        return hidden_states


class LayerRunner:
    """Decoder layers applied one at a time to every calibration batch (see the module docstring)."""

    def __init__(self, source: InMemoryModel | OffloadedModel, adapter: Any, batches: list[CalibrationBatch]):
        self.source = source
        self.adapter = adapter
        self.batches = batches
        self.decoder = adapter.decoder(source.model)
        self._layers = adapter.layers(source.model)
        self._kwargs: list[list[dict[str, Any]]] | None = None  # [batch][layer]

    @property
    def edits_in_place(self) -> bool:
        """Whether ``editable_layer`` edits the model itself (in memory) rather than a transient copy."""
        return isinstance(self.source, InMemoryModel)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` as the model holds it (on the meta device when offloaded)."""
        return self._layers[index]

    @torch.no_grad()
    def layer_inputs(self) -> list[torch.Tensor]:
        """The hidden states entering layer 0, one tensor per batch (also records every layer's kwargs)."""
        layers = self._layers
        originals = list(layers)
        first_inputs, kwargs = [], []
        with self.source.materialized(self.decoder, exclude=layers):
            try:
                for batch in self.batches:
                    sink: list[dict[str, Any]] = []
                    for i in range(len(originals)):
                        layers[i] = _LayerRecorder(i, sink)
                    self.decoder(
                        input_ids=batch.input_ids.to(self.source.device),
                        attention_mask=batch.attention_mask.to(self.source.device),
                        use_cache=False,
                    )
                    if [entry["layer"] for entry in sink] != list(range(len(originals))):
                        raise RuntimeError("the decoder did not call its layers once each, in order")
                    first_inputs.append(sink[0]["hidden"].detach())
                    kwargs.append([entry["kwargs"] for entry in sink])
            finally:
                for i, layer in enumerate(originals):
                    layers[i] = layer
        self._kwargs = kwargs
        return first_inputs

    @torch.no_grad()
    def run_layer(
        self,
        index: int,
        inputs: list[torch.Tensor],
        *,
        watch: dict[str, nn.Module] | None = None,
        layer: nn.Module | None = None,
        batches: list[int] | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """Layer ``index`` (or ``layer``, an edited copy standing at that position) on every batch (or the
        batches numbered ``batches``, in that order): its outputs, and the outputs of the ``watch``
        submodules per batch."""
        if self._kwargs is None:
            raise RuntimeError("call layer_inputs() first")
        module = layer if layer is not None else self._layers[index]
        outputs: list[torch.Tensor] = []
        watched: dict[str, list[torch.Tensor]] = {name: [] for name in watch or {}}
        context = self.source.materialized(module) if layer is None else contextlib.nullcontext(module)
        chosen = [self._kwargs[b] for b in batches] if batches is not None else self._kwargs
        with context:
            for hidden, kwargs in zip(inputs, chosen, strict=True):
                with capture_outputs(watch or {}) as captured:
                    out = module(hidden.to(self.source.device), **kwargs[index])
                outputs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
                for name in watched:
                    watched[name].append(captured[name])
        return outputs, watched

    @contextlib.contextmanager
    def editable_layer(self, index: int) -> Iterator[nn.Module]:
        """Layer ``index`` materialised, for an edit that ``run_layer(..., layer=...)`` then runs."""
        with self.source.materialized(self._layers[index]) as module:
            yield module

    def layer_kwargs(self, batch: int, index: int) -> dict[str, Any]:
        """The keyword arguments (masks, rotary embeddings) layer ``index`` receives on batch ``batch``."""
        if self._kwargs is None:
            raise RuntimeError("call layer_inputs() first")
        return self._kwargs[batch][index]

    @contextlib.contextmanager
    def head(self) -> Iterator[Callable[[torch.Tensor, int], torch.Tensor]]:
        """The model's final norm and head, materialised for the block, as ``logits(states, b)``: the logits
        of the model on batch ``b`` when its last decoder layer outputs ``states`` (differentiable with
        respect to ``states`` under ``torch.enable_grad``). The model's own forward runs with its layers
        stood in for (the first returns ``states``), so whatever it does after the layers is kept."""
        model, layers = self.source.model, self._layers
        originals = list(layers)
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()

        def logits(states: torch.Tensor, b: int) -> torch.Tensor:
            layers[0] = _StateInjector(states)
            for i in range(1, len(originals)):
                layers[i] = _PassThrough()
            batch = self.batches[b]
            return model(
                input_ids=batch.input_ids.to(self.source.device),
                attention_mask=batch.attention_mask.to(self.source.device),
                use_cache=False,
            ).logits

        with self.source.materialized(model, exclude=layers):
            untied = head.weight
            if untied.is_meta:  # tied to the embeddings, which hold the only stored copy
                head.weight = embeddings.weight
            try:
                yield logits
            finally:
                head.weight = untied
                for i, layer in enumerate(originals):
                    layers[i] = layer

    @torch.no_grad()
    def language_model_loss(self, hidden: list[torch.Tensor], batches: list[int]) -> tuple[float, int]:
        """(summed next-token cross-entropy, scored tokens) of the model's head on ``hidden``, the outputs
        of its last decoder layer for the batches numbered ``batches``."""
        total, count = 0.0, 0
        with self.head() as logits_of:
            for states, b in zip(hidden, batches, strict=True):
                summed, scored = next_token_loss(logits_of(states, b), self.batches[b])
                total += float(summed)
                count += scored
        return total, count


def next_token_loss(logits: torch.Tensor, batch: CalibrationBatch) -> tuple[torch.Tensor, int]:
    """(next-token cross-entropy summed over the batch's real targets, their number); logits in float32."""
    mask = batch.attention_mask.to(logits.device)
    labels = batch.input_ids.to(logits.device).masked_fill(mask == 0, -100)[:, 1:]
    summed = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return summed, int((labels != -100).sum())


def scored_targets(batch: CalibrationBatch) -> int:
    """How many next-token targets ``next_token_loss`` scores in ``batch``."""
    return int(batch.attention_mask[:, 1:].sum())


class _StateInjector(nn.Module):
    def __init__(self, states: torch.Tensor):
        super().__init__()
        self.states = states

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.states.to(hidden_states.device, hidden_states.dtype)


class _PassThrough(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states
