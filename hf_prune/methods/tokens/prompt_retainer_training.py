"""Training the prompt retainer of a causal LM (``adtp`` / ``fixed`` prompt pruning): AdamW on the retainer,
one or several processes, in memory or with the model's weights read from disk (``engine: sequential``).

Data: a plain text file, tokenised and cut into windows of ``max_length`` tokens: BOS, a prompt, then
``continuation_length`` tokens. The backbone is frozen; only ``model.retainer`` learns.

Soft pruning (training only): layers before ``layer`` run on every token; at ``layer`` the retainer scores
the prompt tokens and each eligible one (a real prompt token other than the first and the last, which are
always kept) gets a keep probability p_i = σ((s_i − q)/T), q the saliency at rank ρ·n
(``model_patches/prompt_retainer.soft_keep``; ρ = ``keep_ratio`` for ``fixed``; for ``adtp`` the ratio
head's argmax candidate, as at inference, with the gradient of its softmax-weighted mean candidate: a
straight-through estimate). In layers ``layer``.. every query adds log p_i to its attention
score of key i (a float 4-D attention mask), so a token kept with probability p weighs p times, and a
dropped one (p → 0) is not seen, as in the hard pruning at inference. The loss of one batch is

    NLL of the continuation after the softly pruned prompt (teacher-forced, per continuation token)
    + distill_weight · [w · KL(teacher IG ‖ saliency) + (1 − w) · KL(self IG ‖ saliency)]
    + flops_weight · (mean ρ − target_ratio)²                                       (adtp only)

IG: Integrated Gradients (``ig_steps`` steps, zero baseline) of the continuation's NLL w.r.t. the prompt's
input embeddings, summed over the hidden size; the teacher's is the unpruned model's (the same frozen
weights, every token kept), the self IG (m = 1) the softly pruned model's
on the same forward. Each becomes a distribution over the eligible tokens (|IG| L2-normalised, divided by
its sum); the saliency goes through a softmax over them. The teacher's weight w falls linearly from 1 to 0.
The ratio head learns per prompt through q: the continuation's NLL pulls ρ up where dropping tokens
costs, the FLOPs term pulls the batch mean of the chosen ratios to ``target_ratio``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ...adapters import get_adapter, model_device
from ...engine.distributed import all_reduce_sum, rank_and_world
from ...engine.layers import release_freed_memory
from ...errors import DataError
from ...model_patches.prompt_prefill import layer_kinds
from ...model_patches.prompt_retainer import (
    always_kept,
    chosen_ratios,
    expected_ratios,
    soft_attention_bias,
    soft_keep,
)
from .encoder_retainer_training import (
    attribution_distribution,
    only_the_retainer_trains,
    saliency_log_distribution,
)


def text_windows(stage: Any, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    """``{"input_ids": [max_length]}`` windows of ``stage.train_data`` (plain text), BOS first, one every
    ``max_length - 1`` text tokens."""
    path = Path(stage.train_data).expanduser()
    if not path.is_file():
        raise DataError(f"train_data: file not found: {stage.train_data}")
    if tokenizer is None:
        raise DataError(
            "train_data: tokenising the training text needs the model's tokenizer (prune(..., tokenizer=))"
        )
    ids = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    size = stage.max_length - len(bos)
    windows = [
        {"input_ids": torch.tensor(bos + ids[start : start + size])}
        for start in range(0, len(ids) - size + 1, size)
    ]
    if len(windows) < stage.batch_size:
        raise DataError(
            f"train_data: {stage.train_data} gives {len(windows)} windows of {stage.max_length} tokens, "
            f"fewer than one batch ({stage.batch_size}); give more text or lower max_length"
        )
    return windows


def retainer_outputs(model: Any, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """The retainer on the prompt's hidden states [B, P, H] entering ``layer``: {saliency [B, P],
    ratio [B]}. The ratio is the one inference would choose (the argmax candidate) in the
    forward, with the gradient of the softmax-weighted mean candidate in the backward (straight through)."""
    settings = model.settings
    real = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)  # windows have no padding
    saliency, ratio_logits = model.retainer(hidden, real)
    expected = expected_ratios(settings, ratio_logits)
    ratio = expected + (chosen_ratios(settings, ratio_logits) - expected).detach()
    return {"saliency": saliency, "ratio": ratio}


def _layer_then_release(layer: Any, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    release_freed_memory()  # the layer's weights, read from disk for this call (offloaded models)
    return out


def _release_after_backward(grad: torch.Tensor) -> None:
    release_freed_memory()  # the layer's recomputed weights and activations, just freed


def run_layer(layer: Any, hidden: torch.Tensor, checkpointed: bool, **kwargs: Any) -> torch.Tensor:
    """``layer(hidden, **kwargs)`` (a decoder layer, or the head); ``checkpointed``: under activation
    checkpointing (the layer runs again in the backward), so that the backward holds one layer's weights at
    a time, not the model's, when they are read from disk (accelerate's offload); the memory of each layer
    is handed back as soon as it is freed."""
    if not checkpointed:
        return layer(hidden, **kwargs)
    if hidden.requires_grad:
        hidden.register_hook(_release_after_backward)  # fires once this layer's backward is done
    # No early stop of the recomputation: stopped after the layer's last saved tensor, it would skip the
    # hooks that drop the weights accelerate read, and every layer would keep one until the next forward.
    with set_checkpoint_early_stop(False):
        return checkpoint(_layer_then_release, layer, hidden, use_reentrant=False, **kwargs)


def decoder_forward(
    model: Any, embeds: torch.Tensor, prompt_length: int | None = None, *, checkpointed: bool = False
) -> dict[str, torch.Tensor]:
    """The model on whole windows ``embeds`` [B, L, H] (no padding), layer by layer. With ``prompt_length``
    the first ``prompt_length`` tokens are softly pruned at ``layer``: {logits, saliency [B, P],
    ratio [B], eligible [B, L], prompt_hidden [B, P, H] (what the retainer read)}; without,
    every token is kept (the stock model, the teacher): {logits}."""
    settings, config, adapter = model.settings, model.config, get_adapter(model.config)
    decoder = adapter.decoder(model)
    batch, length = embeds.shape[:2]
    positions = torch.arange(length, device=embeds.device).expand(batch, length)
    mask = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
    inputs = {"position_embeddings": decoder.rotary_emb(embeds, positions), "position_ids": positions}
    windows = [config.sliding_window if kind == "sliding_attention" else None for kind in layer_kinds(config)]
    keep = embeds.new_ones(batch, length)
    hidden, biases, out = embeds, {}, {}
    for index, layer in enumerate(adapter.layers(model)[: config.num_hidden_layers]):
        if prompt_length is not None and index == settings["layer"]:
            prompt = mask.clone()
            prompt[:, prompt_length:] = False
            eligible = prompt & ~always_kept(prompt)
            out = retainer_outputs(model, hidden[:, :prompt_length])
            scores = torch.cat([out["saliency"], out["saliency"].new_zeros(batch, length - prompt_length)], 1)
            keep = soft_keep(scores, eligible, out["ratio"], settings["temperature"])
            biases = {}
            out.update(eligible=eligible, prompt_hidden=hidden[:, :prompt_length])
        if windows[index] not in biases:
            biases[windows[index]] = soft_attention_bias(keep, mask, windows[index])
        hidden = run_layer(layer, hidden, checkpointed, attention_mask=biases[windows[index]], **inputs)

    def head(states: torch.Tensor) -> torch.Tensor:  # checkpointed like a layer: the backward through the
        return model.lm_head(decoder.norm(states))  # layers then no longer holds the head's weights

    return {"logits": run_layer(head, hidden, checkpointed), **out}


def continuation_nll(logits: torch.Tensor, input_ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """[B] summed NLL of the tokens after the prompt, each predicted from the position before it."""
    predicted = logits[:, prompt_length - 1 : -1].float()
    targets = input_ids[:, prompt_length:]
    return (
        F.cross_entropy(predicted.flatten(0, 1), targets.flatten(), reduction="none")
        .view(targets.shape)
        .sum(1)
    )


def teacher_integrated_gradients(
    model: Any,
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    prompt_length: int,
    steps: int,
    *,
    checkpointed: bool = False,
) -> torch.Tensor:
    """[B, P] IG of the unpruned model's continuation NLL w.r.t. the prompt's input embeddings (zero
    baseline, ``steps`` steps), summed over the hidden size."""
    prompt, rest = embeds[:, :prompt_length].detach(), embeds[:, prompt_length:].detach()
    total = torch.zeros_like(prompt)
    for k in range(1, steps + 1):
        point = (prompt * (k / steps)).requires_grad_(True)
        logits = decoder_forward(model, torch.cat([point, rest], dim=1), checkpointed=checkpointed)["logits"]
        (grad,) = torch.autograd.grad(continuation_nll(logits, input_ids, prompt_length).sum(), point)
        total += grad
    return (prompt * total / steps).sum(-1)


def kl_to_saliency(target: torch.Tensor, saliency: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """[B] per row, KL(target ‖ softmax of the saliency over the eligible tokens)."""
    log_q = saliency_log_distribution(saliency, eligible)
    return (target * (target.clamp_min(1e-12).log() - log_q)).sum(1)


def add_retainer_gradients(
    model: Any,
    input_ids: torch.Tensor,
    stage: Any,
    teacher_weight: float,
    *,
    batch_rows: int | None = None,
    checkpointed: bool = False,
) -> dict[str, torch.Tensor]:
    """Add the gradient of one batch's loss (module docstring) to the retainer's parameters; returns the loss
    and its terms. One backward through the model, where autograd on the whole loss would need two (the
    self IG's, then the loss's): the continuation's NLL gives both the self IG (its gradient w.r.t. the
    input embeddings) and the task term's gradient; the distillation and FLOPs terms depend on the
    retainer's outputs alone, so their gradient comes from the retainer run again on the hidden states it
    read, detached. ``checkpointed``: the decoder layers run under activation checkpointing (``run_layer``).

    Data-parallel, ``input_ids`` are this process's rows of a batch of ``batch_rows``: every term is a sum
    over rows divided by the whole batch's count (the FLOPs term reads the all-reduced mean ratio), so the
    gradients summed over the processes are one process's on the whole batch. Terms returned: the batch's."""
    rows = input_ids.shape[0] if batch_rows is None else batch_rows
    prompt_length = stage.max_length - stage.continuation_length
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    out = decoder_forward(model, embeds, prompt_length, checkpointed=checkpointed)
    nll = continuation_nll(out["logits"], input_ids, prompt_length)
    targets = rows * (input_ids.shape[1] - prompt_length)
    parameters = [p for p in model.retainer.parameters() if p.requires_grad]
    embeds_grad, *task_grads = torch.autograd.grad(nll.sum(), [embeds, *parameters], allow_unused=True)
    self_ig = (embeds.detach() * embeds_grad).sum(-1)[:, :prompt_length]
    teacher_ig = teacher_integrated_gradients(
        model, embeds, input_ids, prompt_length, stage.ig_steps, checkpointed=checkpointed
    )
    eligible = out["eligible"][:, :prompt_length]
    again = retainer_outputs(model, out["prompt_hidden"].detach())
    distill = (
        teacher_weight
        * kl_to_saliency(attribution_distribution(teacher_ig, eligible), again["saliency"], eligible)
        + (1 - teacher_weight)
        * kl_to_saliency(attribution_distribution(self_ig, eligible), again["saliency"], eligible)
    ).sum() / rows
    rest = stage.distill_weight * distill
    ratio_sum = again["ratio"].sum()
    batch_ratio_sum = all_reduce_sum(ratio_sum.detach().clone())
    # the batch's mean ratio, with the gradient of this process's share of it
    mean_ratio = (ratio_sum + (batch_ratio_sum - ratio_sum).detach()) / rows
    flops = torch.zeros((), device=rest.device)
    if stage.algorithm == "adtp":
        flops = (mean_ratio - stage.target_ratio) ** 2
        rest = rest + stage.flops_weight * flops
    rest_grads = torch.autograd.grad(rest, parameters, allow_unused=True)
    for parameter, task_grad, rest_grad in zip(parameters, task_grads, rest_grads, strict=True):
        parts = [g for g in (None if task_grad is None else task_grad / targets, rest_grad) if g is not None]
        if parts:
            grad = sum(parts[1:], parts[0])
            parameter.grad = grad if parameter.grad is None else parameter.grad + grad
    summed = all_reduce_sum(torch.stack([nll.detach().sum() / targets, distill.detach()]))
    task, distill = summed[0], summed[1]
    loss = task + stage.distill_weight * distill + stage.flops_weight * flops.detach()
    return {
        "loss": loss,
        "task": task,
        "distill": distill,
        "flops": flops.detach(),
        "ratio": mean_ratio.detach(),
    }


def window_batches(count: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """``steps`` batches of ``batch_size`` window numbers: the windows in a seeded random order, drawn anew
    after each pass, an incomplete last batch of a pass left out (each step has a whole batch)."""
    generator = torch.Generator().manual_seed(seed)
    per_pass = count // batch_size
    for step in range(steps):
        if step % per_pass == 0:
            order = torch.randperm(count, generator=generator).tolist()
        start = (step % per_pass) * batch_size
        yield order[start : start + batch_size]


@torch.no_grad()
def chosen_ratio_counts(
    model: Any, windows: list[dict[str, torch.Tensor]], prompt_length: int, batch_size: int
) -> dict[str, int]:
    """{ratio: how many training prompts the retainer gives it at inference}."""
    device, counts = model_device(model), Counter()
    for start in range(0, len(windows), batch_size):
        ids = torch.stack([w["input_ids"][:prompt_length] for w in windows[start : start + batch_size]])
        ids = ids.to(device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
        embeds = model.get_input_embeddings()(ids)
        hidden, _ = model._layers_before_the_cut(embeds, mask, positions, None, False)
        counts.update(
            f"{r:g}" for r in chosen_ratios(model.settings, model.retainer(hidden, mask)[1]).tolist()
        )
    return {ratio: counts[ratio] for ratio in sorted(counts, key=float)}


def train_prompt_retainer(
    model: Any, tokenizer: Any, stage: Any, *, progress: bool = True, checkpointed: bool = False
) -> dict[str, Any]:
    """Train ``model.retainer`` in place (the rest frozen); returns a summary for the stage report.

    AdamW (no weight decay) at ``learning_rate`` with a linear warm-up over the first 5% of the steps, then
    cosine decay; gradient norm clipped at 1; the teacher's weight falls linearly from 1 (first step) to 0
    (last). Data-parallel (torchrun / accelerate launch), each process takes every world-th row of each
    batch and the gradients are all-reduced before each step: every process ends with the retainer one
    process would train. ``checkpointed``: the decoder layers under activation checkpointing (a model whose
    weights are read from disk at each forward: ``engine: sequential``)."""
    started = time.perf_counter()
    windows = text_windows(stage, tokenizer)
    rank, world = rank_and_world()
    if stage.batch_size < world:
        raise DataError(
            f"batch_size: each of the {world} processes needs a row of every batch; batch_size is "
            f"{stage.batch_size}"
        )
    device, prompt_length = model_device(model), stage.max_length - stage.continuation_length
    history = []
    with only_the_retainer_trains(model):
        model.eval()  # no dropout in the frozen backbone; the retainer has none
        parameters = [p for p in model.retainer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=stage.learning_rate, weight_decay=0.0)
        schedule = get_cosine_schedule_with_warmup(
            optimizer, max(1, stage.train_steps // 20), stage.train_steps
        )
        batches = window_batches(len(windows), stage.batch_size, stage.train_steps, stage.seed)
        bar = tqdm(batches, total=stage.train_steps, desc="prompt retainer", disable=not progress or rank > 0)
        for step, batch in enumerate(bar):
            rows = batch[rank::world]
            input_ids = torch.stack([windows[i]["input_ids"] for i in rows]).to(device)
            teacher_weight = 1.0 - step / max(stage.train_steps - 1, 1)
            terms = add_retainer_gradients(
                model, input_ids, stage, teacher_weight, batch_rows=len(batch), checkpointed=checkpointed
            )
            for parameter in parameters:
                if parameter.grad is not None:
                    all_reduce_sum(parameter.grad)
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({k: terms[k].item() for k in ("task", "distill", "flops", "ratio")})
            bar.set_postfix(loss=f"{terms['loss'].item():.4f}")
    last = history[-max(1, len(history) // 10) :]
    summary = {
        "windows": len(windows),
        "steps": stage.train_steps,
        "seconds": round(time.perf_counter() - started, 2),
        "final": {
            k: round(sum(h[k] for h in last) / len(last), 4) for k in ("task", "distill", "flops", "ratio")
        },
    }
    if stage.algorithm == "adtp":
        summary["chosen_ratios"] = chosen_ratio_counts(model, windows, prompt_length, stage.batch_size)
    return summary
