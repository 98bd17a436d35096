"""One ``transformers.TrainerCallback`` that runs any training-time method (``methods/base.TrainingMethod``).

    callback = TrainingMethodCallback(method)            # method: a TrainingMethod config
    trainer = Trainer(model, args, train_dataset=..., callbacks=[callback])
    trainer.train()                                      # or trainer.train(resume_from_checkpoint=...)
    callback.report                                      # StageReport from method.end(model)

Trainer events → method hooks:

- ``on_init_end`` (the Trainer is built): refuse DeepSpeed and FSDP, which shard parameters across
  processes (a mask computed on a shard is wrong), then ``check_training_model(model)``.
- ``on_train_begin``: when resuming (the Trainer's ``global_step`` > 0), ``load_state_dict`` with the state
  saved in that checkpoint's folder; then ``begin(model, step=global_step, total_steps=max_steps,
  optimizer=...)``.
- ``on_optimizer_step`` (right after ``optimizer.step()``, before the gradients are zeroed, so gradient-based
  regrowth can read them): ``after_optimizer_step(model, step, optimizer)``, ``step`` counting from 1.
- ``on_save`` (after the Trainer wrote ``checkpoint-N``): ``state_dict()`` written into that folder as
  ``hf_prune_method_state.safetensors`` (tensors; the other values as JSON in its metadata), through a
  temporary file renamed into place, so a checkpoint never holds half a state.
- ``on_train_end``: ``end(model)``, whose details become ``report``.

The checkpoint resumed from is ``args.resume_from_checkpoint`` when it names a folder, else
``<output_dir>/checkpoint-<global_step>`` (where ``trainer.train(resume_from_checkpoint=True)`` finds it).
Trainer does not tell callbacks which folder ``train(resume_from_checkpoint=FOLDER)`` used: for a folder
outside ``output_dir`` set ``TrainingArguments(resume_from_checkpoint=FOLDER)`` too (a clear error says so).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import HfPruneError
from ..methods.base import StageReport, TrainingMethod

#: The file a training-time method's state is saved to, inside each Trainer ``checkpoint-N`` folder.
STATE_FILE = "hf_prune_method_state.safetensors"
_VALUES_KEY = "hf_prune_values"  # safetensors metadata key holding the JSON of the non-tensor values


def save_method_state(state: dict[str, Any], folder: str | Path) -> Path:
    """Write ``state`` (``str`` → tensor or JSON-serialisable value) to ``folder/STATE_FILE`` atomically."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if torch.is_tensor(v)}
    values = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    try:
        metadata = {"format": "pt", _VALUES_KEY: json.dumps(values)}
    except TypeError as error:
        raise HfPruneError(
            f"a training method's state_dict() holds a value JSON cannot store: {error}"
        ) from None
    path = Path(folder) / STATE_FILE
    partial = path.with_name(f".{STATE_FILE}.partial")
    save_file(tensors, partial, metadata=metadata)
    with open(partial, "rb") as written:
        os.fsync(written.fileno())
    os.replace(partial, path)
    return path


def load_method_state(folder: str | Path) -> dict[str, Any]:
    """The state ``save_method_state`` wrote into ``folder`` (tensors on the CPU)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise HfPruneError(
            f"cannot resume the training method: {path} is missing (the checkpoint was not saved with "
            "TrainingMethodCallback)"
        )
    with safe_open(str(path), framework="pt") as saved:
        values = json.loads((saved.metadata() or {}).get(_VALUES_KEY, "{}"))
        tensors = {key: saved.get_tensor(key) for key in saved.keys()}
    return {**values, **tensors}


class TrainingMethodCallback(TrainerCallback):
    """Drives one ``TrainingMethod`` through a ``transformers.Trainer`` run (see the module docstring).

    ``name`` goes into ``report`` (default: the method's registered name, else its class name)."""

    def __init__(self, method: TrainingMethod, name: str | None = None):
        if not isinstance(method, TrainingMethod):
            raise TypeError(f"TrainingMethodCallback runs a TrainingMethod, got {type(method).__name__}")
        self.method = method
        self.name = name or _registered_name(type(method)) or type(method).__name__
        self.report: StageReport | None = None
        self._started = 0.0
        self._checked = False

    def on_init_end(self, args, state, control, model=None, **kwargs):
        refuse_sharded_training(args)
        self.method.check_training_model(model)
        self._checked = True

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._checked:  # added with trainer.add_callback, after on_init_end
            refuse_sharded_training(args)
            self.method.check_training_model(model)
        if state.global_step > 0:  # resuming: the checkpoint's state comes back before begin()
            self.method.load_state_dict(load_method_state(self._resumed_folder(args, state.global_step)))
        self._started = time.perf_counter()
        self.method.begin(model, step=state.global_step, total_steps=state.max_steps, optimizer=optimizer)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        # The Trainer counts the step (global_step += 1) after this event: this is step global_step + 1.
        self.method.after_optimizer_step(model, state.global_step + 1, optimizer)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:  # the main process, which wrote the checkpoint
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            save_method_state(self.method.state_dict(), folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        details = self.method.end(model)
        self.report = StageReport(self.name, dict(details or {}), time.perf_counter() - self._started)

    @staticmethod
    def _resumed_folder(args: Any, step: int) -> Path:
        # Trainer does not tell callbacks which folder train(resume_from_checkpoint=...) resumed from.
        named = getattr(args, "resume_from_checkpoint", None)
        if isinstance(named, str) and Path(named).is_dir():
            return Path(named)
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if not (folder / STATE_FILE).is_file():
            raise HfPruneError(
                f"cannot resume the training method: {folder / STATE_FILE} is missing. Resuming from a "
                "checkpoint outside args.output_dir? Trainer does not tell callbacks which folder it resumed "
                "from: set TrainingArguments(resume_from_checkpoint=FOLDER) to that folder as well"
            )
        return folder


def refuse_sharded_training(args: Any) -> None:
    """DeepSpeed (ZeRO) and FSDP shard each parameter across processes: masks and magnitude ranks need
    whole tensors, so training-time pruning refuses them before training starts. DDP (plain
    ``torchrun``) keeps whole replicas with identical gradients and works."""
    if getattr(args, "deepspeed", None):
        raise HfPruneError(
            "training-time pruning does not support DeepSpeed: ZeRO shards the weights the masks are computed "
            "on. Train without --deepspeed (DDP through torchrun works)"
        )
    if getattr(args, "fsdp", None):
        raise HfPruneError(
            "training-time pruning does not support FSDP: it shards the weights the masks are computed on. "
            "Train without fsdp (DDP through torchrun works)"
        )


def _registered_name(cls: type) -> str | None:
    from ..registry import registered_methods

    return next((name for name, spec in registered_methods().items() if spec.config_cls is cls), None)
