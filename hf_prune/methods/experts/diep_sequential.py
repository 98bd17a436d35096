"""DiEP on the layer-by-layer engine: the same α, β (to float tolerance) as in memory, with at most one
decoder layer's weights in memory.

1. One pass layer by layer caches each MoE block's inputs X_l and outputs Z_l on the rows
   ``diep.cached_rows`` picks (as in memory), in the activation store.
2. Each SGD step on calibration batch b runs the α-weighted model one layer at a time, keeping every
   layer's input for b; the model's head gives the LM loss and its gradient with respect to the last
   layer's output; then the layers run again in reverse with gradients on (layer-wise backward, as
   activation checkpointing does it), each passing the gradient of its input down, and each MoE layer adds
   its reconstruction term while it is loaded. Layers below the first MoE layer hold no α or β: the
   backward stops there.
3. After each epoch α, β and the loss history go to the cache on disk, so a killed run restarts after its
   last finished epoch.

Each step reads every layer from disk twice: DiEP on a model larger than memory costs about 2 × epochs ×
batches layer loads, against one pass for the router-statistics baselines.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ...engine.activation_store import ActivationStore
from ...engine.layers import LayerRunner, next_token_loss, scored_targets
from .diep import DiepTraining, cached_rows, frozen, main_output


def diep_scores_sequential(
    config: Any, runner: LayerRunner, store: ActivationStore, context: Any, moe: list[int]
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """(scores |α|·β per MoE layer, details) as ``diep.diep_scores`` returns them, layer by layer."""
    started = time.perf_counter()
    adapter = context.adapter
    batches = runner.batches
    whole = context.all_calibration_batches()  # runner.batches: this process's share of their sequences
    first = runner.layer_inputs()
    cached = cached_rows(whole, config.max_cached_tokens)
    inputs, targets = _cache_moe_io(runner, store, moe, cached.rows, first, context.progress)
    cache_seconds = time.perf_counter() - started

    model = runner.source.model
    device = runner.source.device
    training = DiepTraining(
        config,
        {i: adapter.expert_count(runner.layer(i)) for i in moe},
        dict.fromkeys(moe, device),
    )
    saved = store.get("diep-state")
    done = training.load_state(saved) if saved is not None else 0
    if done:
        store.reused.append(f"DiEP epochs 0-{done - 1}")
    steps = len(batches)
    with frozen(model), torch.enable_grad(), training.routing(model, adapter):
        progress = tqdm(
            total=(config.epochs - done) * steps, desc="DiEP", disable=not context.progress, leave=False
        )
        for epoch in range(done, config.epochs):
            training.begin_epoch(epoch)
            for b in range(steps):
                training.zero_grad()
                rows, count = cached.step_share(b, steps)
                share = (inputs, targets, rows, count)
                _one_step(config, runner, store, training, b, first[b], moe, share, scored_targets(whole[b]))
                training.step()
                progress.update()
            training.end_epoch(epoch, steps)
            store.put("diep-state", training.state(), to_disk=True)
        progress.close()

    return training.results(cached, cache_seconds, time.perf_counter() - started)


def _one_step(
    config: Any,
    runner: LayerRunner,
    store: ActivationStore,
    training: DiepTraining,
    b: int,
    hidden: torch.Tensor,
    moe: list[int],
    share: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor, int],
    targets_in_batch: int,
) -> None:
    """Forward layer by layer, LM loss at the head, backward layer by layer (see the module docstring).
    ``share``: the cached MoE inputs and outputs, which of them this step uses, and how many all
    processes use; ``targets_in_batch``: the next-token targets of the whole batch. Each layer's input waits
    in ``store`` (spilled beyond its memory budget) for the backward."""
    adapter = runner.adapter
    inputs, targets, rows, count = share
    with_lm = config.lm_loss_weight > 0
    with_recon = config.lambda_recon > 0 and count > 0
    gradient = None
    if with_lm:
        tick = time.perf_counter()
        with torch.no_grad():
            for i in range(runner.num_layers):
                if i >= moe[0]:
                    store.put(f"diep-step-input-{i}", [hidden])
                with runner.editable_layer(i) as layer:
                    hidden = main_output(layer(hidden, **runner.layer_kwargs(b, i)))
        with runner.head() as logits_of:
            last = hidden.detach().requires_grad_()
            summed, _ = next_token_loss(logits_of(last, b), runner.batches[b])
            training.lm_loss(summed, targets_in_batch, time.perf_counter() - tick)
        gradient = last.grad
    for i in range(runner.num_layers - 1, moe[0] - 1, -1):
        if i not in moe and not with_lm:
            continue
        with runner.editable_layer(i) as layer:
            if i in moe and with_recon:
                training.reconstruction(i, adapter.mlp(layer), inputs[i][rows], targets[i][rows], count)
            if with_lm:
                tick = time.perf_counter()
                x = store.get(f"diep-step-input-{i}")[0].detach().requires_grad_(i > moe[0])
                store.discard(f"diep-step-input-{i}")
                out = main_output(layer(x, **runner.layer_kwargs(b, i)))
                torch.autograd.backward(out, gradient)
                gradient = x.grad
                training.lm_seconds += time.perf_counter() - tick


@torch.no_grad()
def _cache_moe_io(
    runner: LayerRunner,
    store: ActivationStore,
    moe: list[int],
    rows: list[torch.Tensor],
    first: list[torch.Tensor],
    progress: bool,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """X_l, Z_l ([N, H] float32) of every MoE block on the chosen rows, one layer at a time; reused from
    the cache after a restart when every layer's entry is there and intact."""
    found = {i: store.get(f"diep-io-{i}") for i in moe}
    if all(entry is not None for entry in found.values()):
        store.reused.append("DiEP MoE inputs/outputs")
        return {i: e[0] for i, e in found.items()}, {i: e[1] for i, e in found.items()}
    adapter = runner.adapter
    hidden = first
    for i in tqdm(
        range(moe[-1] + 1), desc="DiEP: cache MoE inputs/outputs", disable=not progress, leave=False
    ):
        watch = {"mlp": adapter.mlp(runner.layer(i))} if i in moe else {}
        captured_inputs: list[torch.Tensor] = []
        handle = None
        if i in moe:

            def keep_input(module: Any, args: Any, kwargs: Any, sink: list = captured_inputs) -> None:
                sink.append(args[0] if args else kwargs["hidden_states"])

            handle = watch["mlp"].register_forward_pre_hook(keep_input, with_kwargs=True)
        try:
            hidden, watched = runner.run_layer(i, hidden, watch=watch)
        finally:
            if handle is not None:
                handle.remove()
        if i in moe:
            x = [_rows_of(t, r) for t, r in zip(captured_inputs, rows, strict=True)]
            z = [_rows_of(main_output(t), r) for t, r in zip(watched["mlp"], rows, strict=True)]
            store.put(f"diep-io-{i}", [torch.cat(x), torch.cat(z)])
    cached = {i: store.get(f"diep-io-{i}") for i in moe}
    return {i: e[0] for i, e in cached.items()}, {i: e[1] for i, e in cached.items()}


def _rows_of(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1])[rows.to(tensor.device)].float().cpu()
