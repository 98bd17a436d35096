"""Training AD-TP's token retainer with ``transformers.Trainer``.

The student is the ``hf_prune_bert`` classifier in training mode (soft keep masks, see
``model_patches/text_token_pruning.py``); its backbone is frozen, so only the retainer learns. The loss of
one batch is

    task cross-entropy
    + distill_weight · [w · KL(teacher IG ‖ saliency) + (1 − w) · KL(student IG ‖ saliency)]
    + flops_weight · (mean expected ratio − target_ratio)²      (adtp only)

where IG are Integrated-Gradients attributions on the input token embeddings (``ig_steps`` steps from a
zero baseline, target = the true label's logit), turned into a distribution over the non-special real
tokens (|IG| L2-normalised, then divided by its sum), the saliency head's scores go through a softmax over
the same tokens, and the teacher's weight w falls linearly from 1 to 0 over training (``TeacherAnnealing``).
The teacher is the unpruned classifier (the same frozen weights, without token pruning).
"""

from __future__ import annotations

import copy
import tempfile
import time
from typing import Any

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

from ..data import read_records
from ..errors import DataError


def integrated_gradients(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor,
                         *, steps: int = 1, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] IG of the ``target`` logit w.r.t. the input token embeddings (zero baseline), summed over the
    hidden size: IG_i = x_i · mean_k ∇F((k/m)·x), k = 1..m. Pads get 0. Model weights get no gradient."""
    embeds = model.get_input_embeddings()(input_ids).detach()
    total = torch.zeros_like(embeds)
    extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
    if hasattr(model, "_special"):  # a token-pruning model finds its special tokens in the ids
        extra["input_ids"] = input_ids
    for k in range(1, steps + 1):
        point = (embeds * (k / steps)).requires_grad_(True)
        logits = model(inputs_embeds=point, attention_mask=attention_mask, **extra).logits
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), point)
        total += grad
    return (embeds * total / steps).sum(-1) * attention_mask


def attribution_distribution(scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """|scores| over the ``eligible`` tokens, L2-normalised per sequence, then divided by their sum."""
    magnitude = scores.abs() * eligible
    magnitude = magnitude / magnitude.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return magnitude / magnitude.sum(dim=1, keepdim=True).clamp_min(1e-12)


def saliency_log_distribution(saliency: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    return saliency.masked_fill(~eligible, float("-inf")).log_softmax(dim=1).masked_fill(~eligible, 0.0)


class TeacherAnnealing(TrainerCallback):
    """Moves the trainer's teacher weight linearly from 1 (first step) to 0 (last step)."""

    def __init__(self, trainer: RetainerTrainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.teacher_weight = 1.0 - state.global_step / max(state.max_steps - 1, 1)


class RetainerTrainer(Trainer):
    """A Trainer whose loss is AD-TP's (see the module docstring)."""

    def __init__(self, *args, teacher: Any, stage: Any, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.stage, self.teacher_weight = teacher, stage, 1.0
        self.add_callback(TeacherAnnealing(self))
        self.history: list[dict[str, float]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None:
            raise DataError("AD-TP training needs labels: every training example must have a label")
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        outputs = model(input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask, labels=labels)
        eligible = mask.bool() & ~model._special(input_ids)
        log_q = saliency_log_distribution(outputs.saliency, eligible)
        # The student's own IG (m = 1 on the same forward) and the teacher's.
        (grad,) = torch.autograd.grad(outputs.logits.gather(1, labels[:, None]).sum(), embeds, retain_graph=True)
        student = attribution_distribution(((embeds * grad).sum(-1) * mask).detach(), eligible)
        with torch.enable_grad():
            teacher = attribution_distribution(
                integrated_gradients(self.teacher, input_ids, mask, labels, steps=self.stage.ig_steps), eligible)

        def kl(target: torch.Tensor) -> torch.Tensor:
            return (target * (target.clamp_min(1e-12).log() - log_q)).sum(1).mean()

        distill = self.teacher_weight * kl(teacher) + (1 - self.teacher_weight) * kl(student)
        loss = outputs.loss + self.stage.distill_weight * distill
        flops = torch.zeros((), device=loss.device)
        if self.stage.algorithm == "adtp":
            flops = (outputs.expected_ratio.mean() - self.stage.target_ratio) ** 2
            loss = loss + self.stage.flops_weight * flops
        self.history.append({"task": outputs.loss.item(), "distill": distill.item(), "flops": flops.item(),
                             "kept": outputs.kept_fraction.detach().mean().item(), "teacher_weight": self.teacher_weight})
        return (loss, outputs) if return_outputs else loss


def training_examples(stage: Any, tokenizer: Any, label2id: dict[str, int]) -> list[dict[str, Any]]:
    """Tokenised ``{"input_ids", "attention_mask", "labels"}`` rows from ``stage.train_data``."""
    rows = read_records(stage.train_data, [stage.text_field, stage.label_field])
    examples = []
    for where, row in rows:
        label = row[stage.label_field]
        if isinstance(label, str):
            if label not in label2id:
                raise DataError(f"{where}: label {label!r} is not one of the model's labels ({', '.join(label2id)})")
            label = label2id[label]
        if not isinstance(label, int) or isinstance(label, bool):
            raise DataError(f"{where}: {stage.label_field} must be an int or a label name, got {label!r}")
        encoded = tokenizer(row[stage.text_field], truncation=True, max_length=stage.max_length)
        examples.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": label})
    if len(examples) < stage.batch_size:
        raise DataError(f"{stage.train_data}: {len(examples)} labelled examples, fewer than one batch ({stage.batch_size})")
    return examples


def train_token_retainer(model: Any, tokenizer: Any, stage: Any, *, progress: bool = True) -> dict[str, Any]:
    """Train ``model.retainer`` in place (the rest frozen); returns a summary for the stage report."""
    started = time.perf_counter()
    teacher = copy.deepcopy(model)
    teacher.__class__ = type(model).stock_class  # the stock classifier: same weights, no token pruning
    teacher.eval().requires_grad_(False)
    examples = training_examples(stage, tokenizer, dict(model.config.label2id))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("retainer."))
    with tempfile.TemporaryDirectory(prefix="hf-prune-retainer-") as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=stage.train_steps, per_device_train_batch_size=stage.batch_size,
                                 learning_rate=stage.learning_rate, warmup_steps=max(1, stage.train_steps // 20),
                                 lr_scheduler_type="cosine", weight_decay=0.0, logging_strategy="no",
                                 save_strategy="no", report_to=[], seed=stage.seed, data_seed=stage.seed,
                                 disable_tqdm=not progress, remove_unused_columns=False,
                                 use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
        trainer = RetainerTrainer(model=model, args=args, train_dataset=examples, teacher=teacher, stage=stage,
                                  data_collator=DataCollatorWithPadding(tokenizer))
        try:
            trainer.train()
        finally:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(flags[name])
            model.eval()
    last = trainer.history[-max(1, len(trainer.history) // 10):]
    return {"examples": len(examples), "steps": stage.train_steps, "seconds": round(time.perf_counter() - started, 2),
            "final": {k: round(sum(h[k] for h in last) / len(last), 4) for k in ("task", "distill", "flops", "kept")}}
