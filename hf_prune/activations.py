"""Capture module outputs during a forward pass, and stop the pass early.

Calibration only needs the layers up to the deepest one it reads: a forward hook on that layer raises
``_StopForward`` after storing its output, so the rest of the model (and the LM head) never runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .calibration import CalibrationBatch


class _StopForward(Exception):
    pass


def _main_output(output: object) -> torch.Tensor:
    # Decoder layers and MLP blocks return a tensor in transformers 5, some blocks still a tuple.
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def capture_outputs(modules: dict[str, nn.Module], stop_after: nn.Module | None = None) -> Iterator[dict]:
    """Store each named module's output in the yielded dict; stop the forward after ``stop_after``."""
    store: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            store[name] = _main_output(output).detach()

        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_hook(make_hook(name)))
    if stop_after is not None:

        def stop(module: nn.Module, args: object, output: object) -> None:
            raise _StopForward

        handles.append(stop_after.register_forward_hook(stop))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_decoder(decoder: nn.Module, batch: CalibrationBatch) -> None:
    """Run the decoder on one batch, swallowing the early stop raised by ``capture_outputs``."""
    device = next(decoder.parameters()).device
    try:
        decoder(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            use_cache=False,
        )
    except _StopForward:
        pass
