"""Training the prompt retainer of a causal LM (``adtp`` / ``fixed`` prompt pruning) with ``transformers.Trainer``.

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

    NLL of the continuation after the softly pruned prompt (teacher-forced)
    + distill_weight · [w · KL(teacher IG ‖ saliency) + (1 − w) · KL(self IG ‖ saliency)]
    + flops_weight · (mean ρ − target_ratio)²                                       (adtp only)

IG: Integrated Gradients (``ig_steps`` steps, zero baseline) of the continuation's NLL w.r.t. the prompt's
input embeddings, summed over the hidden size; the teacher's is the unpruned model's (the same frozen
weights: an ``inputs_embeds`` forward runs the stock model), the self IG (m = 1) the softly pruned model's
on the same forward. Each becomes a distribution over the eligible tokens (|IG| L2-normalised, divided by
its sum); the saliency goes through a softmax over them. The teacher's weight w falls linearly from 1 to 0.
The ratio head learns per prompt through q: the continuation's NLL pulls ρ up where dropping tokens
costs, the FLOPs term pulls the batch mean of the chosen ratios to ``target_ratio``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from ...adapters import get_adapter
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
    TeacherAnnealing,
    attribution_distribution,
    only_the_retainer_trains,
    retainer_training_arguments,
    saliency_log_distribution,
    silence_when_quiet,
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


def soft_pruned_forward(model: Any, embeds: torch.Tensor, prompt_length: int) -> dict[str, torch.Tensor]:
    """The model on whole windows ``embeds`` [B, L, H] (no padding) with the first ``prompt_length`` tokens
    softly pruned at ``layer``: {logits, saliency [B, P], ratio_logits, ratio [B], keep_probability [B, L],
    eligible [B, L]}."""
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
        if index == settings["layer"]:
            prompt = mask.clone()
            prompt[:, prompt_length:] = False
            eligible = prompt & ~always_kept(prompt)
            saliency, ratio_logits = model.retainer(hidden[:, :prompt_length], mask[:, :prompt_length])
            # Straight through: the ratio inference would choose (the argmax candidate) in the forward, the
            # gradient of the softmax-weighted mean candidate in the backward.
            expected = expected_ratios(settings, ratio_logits)
            ratio = expected + (chosen_ratios(settings, ratio_logits) - expected).detach()
            scores = torch.cat([saliency, saliency.new_zeros(batch, length - prompt_length)], dim=1)
            keep = soft_keep(scores, eligible, ratio, settings["temperature"])
            biases = {}
            out = {
                "saliency": saliency,
                "ratio_logits": ratio_logits,
                "ratio": ratio,
                "keep_probability": keep,
                "eligible": eligible,
            }
        if windows[index] not in biases:
            biases[windows[index]] = soft_attention_bias(keep, mask, windows[index])
        hidden = layer(hidden, attention_mask=biases[windows[index]], **inputs)
    return {"logits": model.lm_head(decoder.norm(hidden)), **out}


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
    model: Any, embeds: torch.Tensor, input_ids: torch.Tensor, prompt_length: int, steps: int
) -> torch.Tensor:
    """[B, P] IG of the unpruned model's continuation NLL w.r.t. the prompt's input embeddings (zero
    baseline, ``steps`` steps), summed over the hidden size."""
    prompt, rest = embeds[:, :prompt_length].detach(), embeds[:, prompt_length:].detach()
    total = torch.zeros_like(prompt)
    for k in range(1, steps + 1):
        point = (prompt * (k / steps)).requires_grad_(True)
        logits = model(
            inputs_embeds=torch.cat([point, rest], dim=1), use_cache=False
        ).logits  # the stock model
        (grad,) = torch.autograd.grad(continuation_nll(logits, input_ids, prompt_length).sum(), point)
        total += grad
    return (prompt * total / steps).sum(-1)


def kl_to_saliency(target: torch.Tensor, saliency: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(target ‖ softmax of the saliency over the eligible tokens)."""
    log_q = saliency_log_distribution(saliency, eligible)
    return (target * (target.clamp_min(1e-12).log() - log_q)).sum(1).mean()


class PromptRetainerTrainer(Trainer):
    """A Trainer whose loss is the one in the module docstring."""

    def __init__(self, *args, stage: Any, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage, self.teacher_weight, self.history = stage, 1.0, []
        self.prompt_length = stage.max_length - stage.continuation_length
        self.add_callback(TeacherAnnealing(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model.eval()  # no dropout in the frozen backbone; the retainer has none
        input_ids, prompt_length = inputs["input_ids"], self.prompt_length
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        out = soft_pruned_forward(model, embeds, prompt_length)
        nll = continuation_nll(out["logits"], input_ids, prompt_length)
        task = nll.sum() / nll.new_tensor(input_ids.shape[0] * (input_ids.shape[1] - prompt_length))
        eligible = out["eligible"][:, :prompt_length]
        (grad,) = torch.autograd.grad(nll.sum(), embeds, retain_graph=True)
        self_ig = (embeds * grad).sum(-1)[:, :prompt_length].detach()
        with torch.enable_grad():
            teacher_ig = teacher_integrated_gradients(
                model, embeds, input_ids, prompt_length, self.stage.ig_steps
            )
        distill = self.teacher_weight * kl_to_saliency(
            attribution_distribution(teacher_ig, eligible), out["saliency"], eligible
        ) + (1 - self.teacher_weight) * kl_to_saliency(
            attribution_distribution(self_ig, eligible), out["saliency"], eligible
        )
        loss = task + self.stage.distill_weight * distill
        flops = torch.zeros((), device=loss.device)
        if self.stage.algorithm == "adtp":
            flops = (out["ratio"].mean() - self.stage.target_ratio) ** 2
            loss = loss + self.stage.flops_weight * flops
        self.history.append(
            {
                "task": task.item(),
                "distill": distill.item(),
                "flops": flops.item(),
                "ratio": out["ratio"].detach().mean().item(),
            }
        )
        return (loss, out) if return_outputs else loss


@torch.no_grad()
def chosen_ratio_counts(
    model: Any, windows: list[dict[str, torch.Tensor]], prompt_length: int
) -> dict[str, int]:
    """{ratio: how many training prompts the retainer gives it at inference}."""
    ids = torch.stack([w["input_ids"][:prompt_length] for w in windows]).to(model.device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    hidden, _ = model._layers_before_the_cut(model.get_input_embeddings()(ids), mask, positions, None, False)
    ratios = chosen_ratios(model.settings, model.retainer(hidden, mask)[1])
    values, counts = ratios.unique(return_counts=True)
    return {f"{v:g}": int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)}


def train_prompt_retainer(model: Any, tokenizer: Any, stage: Any, *, progress: bool = True) -> dict[str, Any]:
    """Train ``model.retainer`` in place (the rest frozen); returns a summary for the stage report."""
    started = time.perf_counter()
    windows = text_windows(stage, tokenizer)
    with (
        only_the_retainer_trains(model),
        tempfile.TemporaryDirectory(prefix="hf-prune-prompt-retainer-") as tmp,
    ):
        args = retainer_training_arguments(stage, tmp, progress)
        trainer = PromptRetainerTrainer(
            model=model,
            args=args,
            train_dataset=windows,
            stage=stage,
            data_collator=lambda rows: {"input_ids": torch.stack([r["input_ids"] for r in rows])},
        )
        silence_when_quiet(trainer, progress).train()
    last = trainer.history[-max(1, len(trainer.history) // 10) :]
    summary = {
        "windows": len(windows),
        "steps": stage.train_steps,
        "seconds": round(time.perf_counter() - started, 2),
        "final": {
            k: round(sum(h[k] for h in last) / len(last), 4) for k in ("task", "distill", "flops", "ratio")
        },
    }
    if stage.algorithm == "adtp":
        summary["chosen_ratios"] = chosen_ratio_counts(model, windows, trainer.prompt_length)
    return summary
