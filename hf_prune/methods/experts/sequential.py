"""Expert pruning on the layer-by-layer engine: router statistics (``frequency``, ``router_weight``) here,
DiEP's trained scores in ``diep_sequential.py``.

Decoder layer i runs on every calibration batch with a hook on its router, which counts each batch's real
tokens as the in-memory pass does (``scoring.add_router_output``); only the hidden states of the current
layer are kept (and cached, so a restarted run resumes after the last finished layer). The experts to keep
are chosen as in memory; the writer slices each MoE layer's experts and router rows while it copies the
weights, and the same slicing on a weightless copy of the model gives the output's config and class
(stock, or ``hf_prune_<family>`` with per-layer counts).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ...engine.activation_store import ActivationStore
from ...engine.distributed import all_reduce_int
from ...engine.layers import LayerRunner
from ...engine.plan import SequentialPlan
from ...errors import CalibrationError, UnsupportedModelError
from ...model_patches import nonuniform_moe
from .diep_sequential import diep_scores_sequential
from .removal import remove_experts
from .scoring import (
    add_router_output,
    empty_router_statistics,
    flat_mask,
    reduce_router_statistics,
)


def plan_expert_pruning(
    config: Any, runner: LayerRunner, store: ActivationStore, context: Any
) -> SequentialPlan:
    from .expert_pruning import expert_pruning_report, experts_to_keep

    adapter = context.adapter
    layers = [runner.layer(i) for i in range(runner.num_layers)]
    moe = [i for i, layer in enumerate(layers) if adapter.is_moe_layer(layer)]
    if not moe:
        raise UnsupportedModelError(
            f"expert pruning needs a Mixture-of-Experts model; {adapter.text_model_type} has no MoE layers"
        )
    before = {i: adapter.expert_count(layers[i]) for i in moe}
    tokens = all_reduce_int(sum(batch.num_tokens for batch in runner.batches))
    if tokens < max(before.values()):
        raise CalibrationError(
            f"expert pruning: the calibration data gave {tokens} tokens, fewer than the {max(before.values())} "
            "experts per layer it must rank; add calibration data or raise calibration.num_samples / seq_len"
        )
    started = time.perf_counter()
    diep = None
    if config.algorithm == "diep":
        scores, diep = diep_scores_sequential(config, runner, store, context, moe)
    else:
        scores = _router_scores(config.algorithm, runner, store, context, moe, before)
    top_k = adapter.top_k(runner.source.model.config)
    keep = experts_to_keep(config, scores, top_k)
    seconds = time.perf_counter() - started
    plan = SequentialPlan(report={})

    def slicing(kept: list[int]):
        def edit(layer: torch.nn.Module) -> None:
            nonuniform_moe.select_experts(adapter.experts(layer), adapter.router(layer), kept)

        return edit

    plan.layer_edits = {i: slicing(keep[i]) for i in moe}

    def structural_edit(model: torch.nn.Module) -> dict[str, Any]:
        removal = remove_experts(model, adapter, keep)
        plan.report.update(
            expert_pruning_report(config, scores, keep, before, top_k, tokens, seconds, removal, diep)
        )
        return None

    plan.structural_edit = structural_edit
    return plan


def _router_scores(
    algorithm: str,
    runner: LayerRunner,
    store: ActivationStore,
    context: Any,
    moe: list[int],
    before: dict[int, int],
) -> dict[int, torch.Tensor]:
    """Per MoE layer, the ``frequency`` or ``router_weight`` of each expert, one layer at a time."""
    adapter = context.adapter
    layers = [runner.layer(i) for i in range(runner.num_layers)]
    masks = [flat_mask(batch) for batch in runner.batches]
    stats: dict[int, dict[str, Any]] = {}
    hidden = runner.layer_inputs()
    resumed = _resume(store, moe)
    if resumed is not None:
        done, hidden, stats = resumed
        store.reused.append(f"layers 0-{done}")
    else:
        done = -1
    for i in tqdm(range(done + 1, moe[-1] + 1), desc="layers", disable=not context.progress, leave=False):
        handle = None
        if i in moe:
            stats[i] = empty_router_statistics(before[i])
            current = {"batch": 0}

            def count(module: Any, args: Any, output: Any, index: int = i, current: dict = current) -> None:
                add_router_output(stats[index], output, masks[current["batch"]], index)
                current["batch"] += 1

            handle = adapter.router(layers[i]).register_forward_hook(count)
        try:
            hidden, _ = runner.run_layer(i, hidden)
        finally:
            if handle is not None:
                handle.remove()
        if i in moe:
            entry = stats[i]
            store.put(f"r{i}", [entry["frequency"], entry["router_weight"], torch.tensor(entry["tokens"])])
        store.put(f"h{i}", hidden)
        store.discard(f"h{i - 1}")  # the next layer needs this one's output only
    for entry in stats.values():
        reduce_router_statistics(entry)
    return {i: stats[i][algorithm].double() for i in moe}


def _resume(store: ActivationStore, moe: list[int]) -> tuple[int, list[torch.Tensor], dict[int, dict]] | None:
    """After a killed run: the deepest layer whose output and router counts (with every earlier MoE
    layer's) were spilled and pass their checksums, that output and those counts; None to start afresh."""
    for i in range(moe[-1], -1, -1):
        if not store.has_on_disk(f"h{i}"):
            continue
        counted = {j: store.get(f"r{j}") for j in moe if j <= i}
        hidden = store.get(f"h{i}")
        if hidden is not None and all(c is not None for c in counted.values()):
            stats = {
                j: {"frequency": c[0], "router_weight": c[1], "tokens": int(c[2])} for j, c in counted.items()
            }
            return i, hidden, stats
    return None
