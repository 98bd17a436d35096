"""Training AD-TP's token retainer with ``transformers.Trainer``.

The student is the ``hf_prune_bert`` (``_roberta``, ``_distilbert``) classifier in training mode (soft keep
masks, see ``model_patches/text_token_pruning.py``); its backbone is frozen (dropout off), so only the
retainer learns. The loss of one batch is

    task cross-entropy                 (soft mask at the ratio each sequence would be pruned at)
    + distill_weight · [w · KL(teacher IG ‖ saliency) + (1 − w) · KL(student IG ‖ saliency)]
    + ratio_weight · mean squared error of the ratio head's predicted costs        (adtp only)

where IG are Integrated-Gradients attributions on the input token embeddings (``ig_steps`` steps from a
zero baseline, target = the true label's logit), turned into a distribution over the non-special real
tokens (|IG| L2-normalised, then divided by its sum), the saliency head's scores go through a softmax over
the same tokens, and the teacher's weight w falls linearly from 1 to 0 over training (``TeacherAnnealing``).
The teacher is the unpruned classifier (the same frozen weights, without token pruning).

The ratio head. Trained through the soft mask plus a FLOPs term (mean ratio − target)², as first built,
it chose the same ratio for every sequence: the gradient through the mask is local (it prices one token
more or less, never a jump from 0.3 to 0.1), it is near zero for the many sequences the classifier gets
right anyway, and the FLOPs term moves only the batch mean, the same push for every sequence. Policy
gradients on exact per-candidate losses saturated the softmax on one candidate within a few steps. So
now each batch is pruned hard at every candidate ratio (no gradient, the inference path) and each
sequence's *cost* there is measured: 1 − the pruned student's probability of the teacher's class
(``candidate_costs``). The ratio head regresses those costs; a sequence takes the candidate with the
lowest predicted cost + price·ratio, the price being a Lagrange multiplier of the FLOPs budget: set per
batch (moving average) so the batch's mean chosen ratio meets ``target_ratio``, and at the end of training
on the whole training set (``set_price_on``). The ratio then varies exactly as far as the head can tell
sequences apart, and the mean meets the budget.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from ...adapters import use_cache_restored
from ...data import read_records
from ...errors import DataError


def integrated_gradients(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target: torch.Tensor,
    *,
    steps: int = 1,
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
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


def candidate_costs(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor, answer: torch.Tensor, ratios: list[float]
) -> torch.Tensor:
    """[B, R] per sequence, 1 − the student's probability of ``answer`` (the teacher's class, [B]) when it
    prunes the sequence hard at each candidate ratio. Bounded, unlike a KL, so the few sequences that any
    pruning breaks do not drown the rest."""
    answer = answer[:, None]
    costs = []
    with torch.no_grad():
        for ratio in ratios:
            logits = model(
                input_ids=input_ids, attention_mask=mask, keep_ratios=torch.full((input_ids.shape[0],), ratio)
            ).logits
            costs.append(1 - logits.softmax(-1).gather(1, answer)[:, 0])
    return torch.stack(costs, dim=1)


def budget_price(costs: torch.Tensor, ratios: torch.Tensor, target: float) -> float:
    """The price λ at which choosing, per sequence, the candidate with the lowest ``costs`` + λ·ratio gives a
    mean ratio closest to ``target`` (bisection; the mean falls as λ grows; λ < 0 spends a budget that the
    costs alone leave unused). Ties go to the smaller ratio (``ratios`` ascending)."""

    def mean_ratio(price: float) -> float:
        return float(ratios[(costs + price * ratios).argmin(dim=1)].mean())

    if len(ratios) == 1:
        return 0.0
    gap = float((ratios[1:] - ratios[:-1]).min())
    bound = (
        float(costs.max() - costs.min()) / gap + 1.0
    )  # beyond ±bound every sequence takes an end candidate
    low, high = -bound, bound
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_ratio(middle) > target else (low, middle)
    return min((low, high), key=lambda price: abs(mean_ratio(price) - target))


def retainer_training_arguments(stage: Any, output_dir: str, progress: bool) -> TrainingArguments:
    """The stage's steps, batch size, learning rate and seed, with warm-up then cosine decay; nothing logged,
    saved or reported (the stage report gets the summary)."""
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=stage.train_steps,
        per_device_train_batch_size=stage.batch_size,
        learning_rate=stage.learning_rate,
        warmup_steps=max(1, stage.train_steps // 20),
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        seed=stage.seed,
        data_seed=stage.seed,
        disable_tqdm=not progress,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


@contextlib.contextmanager
def only_the_retainer_trains(model: Any) -> Iterator[None]:
    """Freeze everything but ``model.retainer`` for the block; restore every flag (and eval mode, and
    ``config.use_cache``, which Trainer sets) after it."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("retainer."))
    try:
        with use_cache_restored(model):
            yield
    finally:
        for name, parameter in model.named_parameters():
            if name in flags:  # (hooks of a dispatched model may untie a tied weight: a new name, left be)
                parameter.requires_grad_(flags[name])
        model.eval()


def silence_when_quiet(trainer: Trainer, progress: bool) -> Trainer:
    """Without progress bars Trainer prints its logs (the final metrics) instead: drop that printer too."""
    if not progress:
        trainer.remove_callback(PrinterCallback)
    return trainer


class TeacherAnnealing(TrainerCallback):
    """Moves a retainer trainer's ``teacher_weight`` linearly from 1 (first step) to 0 (last step)."""

    def __init__(self, trainer: Trainer):
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
        for module in model.modules():  # the backbone is frozen: its dropout would only add noise
            if isinstance(module, nn.Dropout):
                module.eval()
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        outputs = model(input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask, labels=labels)
        eligible = mask.bool() & ~model._special(input_ids)
        log_q = saliency_log_distribution(outputs.saliency, eligible)
        # The student's own IG (m = 1 on the same forward) and the teacher's.
        (grad,) = torch.autograd.grad(
            outputs.logits.gather(1, labels[:, None]).sum(), embeds, retain_graph=True
        )
        student = attribution_distribution(((embeds * grad).sum(-1) * mask).detach(), eligible)
        with torch.enable_grad():
            teacher = attribution_distribution(
                integrated_gradients(self.teacher, input_ids, mask, labels, steps=self.stage.ig_steps),
                eligible,
            )

        def kl(target: torch.Tensor) -> torch.Tensor:
            return (target * (target.clamp_min(1e-12).log() - log_q)).sum(1).mean()

        distill = self.teacher_weight * kl(teacher) + (1 - self.teacher_weight) * kl(student)
        loss = outputs.loss + self.stage.distill_weight * distill
        record = {
            "task": outputs.loss.item(),
            "distill": distill.item(),
            "kept": outputs.kept_fraction.detach().mean().item(),
            "teacher_weight": self.teacher_weight,
        }
        if self.stage.algorithm == "adtp":
            ratios = model.settings["candidate_ratios"]
            with torch.no_grad():
                answer = self.teacher(input_ids=input_ids, attention_mask=mask).logits.argmax(-1)
            costs = candidate_costs(model, input_ids, mask, answer, ratios)
            # The ratio head learns the cost of each candidate (its conditional mean, by squared error); the
            # price follows the batch's budget (a moving average), so the soft mask trains near the ratios
            # inference will choose. train_token_retainer sets the final price on the whole training set.
            ratio_loss = F.mse_loss(outputs.predicted_costs, costs)
            candidates = torch.tensor(ratios, device=costs.device)
            price = budget_price(outputs.predicted_costs.detach(), candidates, self.stage.target_ratio)
            model.retainer.price.mul_(0.8).add_(0.2 * price)
            loss = loss + self.stage.ratio_weight * ratio_loss
            chosen = outputs.ratio_logits.argmax(-1)
            record.update(
                {
                    "ratio": ratio_loss.item(),
                    "price": float(model.retainer.price),
                    "chosen_ratio": float(candidates[chosen].mean()),
                    "chosen_cost": float(costs.gather(1, chosen[:, None]).mean()),
                }
            )
        self.history.append(record)
        return (loss, outputs) if return_outputs else loss


def training_examples(stage: Any, tokenizer: Any, label2id: dict[str, int]) -> list[dict[str, Any]]:
    """Tokenised ``{"input_ids", "attention_mask", "labels"}`` rows from ``stage.train_data``."""
    rows = read_records(stage.train_data, [stage.text_field, stage.label_field])
    examples = []
    for where, row in rows:
        label = row[stage.label_field]
        if isinstance(label, str):
            if label not in label2id:
                raise DataError(
                    f"{where}: label {label!r} is not one of the model's labels ({', '.join(label2id)})"
                )
            label = label2id[label]
        if not isinstance(label, int) or isinstance(label, bool):
            raise DataError(f"{where}: {stage.label_field} must be an int or a label name, got {label!r}")
        encoded = tokenizer(row[stage.text_field], truncation=True, max_length=stage.max_length)
        examples.append(
            {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": label}
        )
    if len(examples) < stage.batch_size:
        raise DataError(
            f"{stage.train_data}: {len(examples)} labelled examples, fewer than one batch ({stage.batch_size})"
        )
    return examples


def train_token_retainer(model: Any, tokenizer: Any, stage: Any, *, progress: bool = True) -> dict[str, Any]:
    """Train ``model.retainer`` in place (the rest frozen); returns a summary for the stage report."""
    started = time.perf_counter()
    teacher = copy.deepcopy(model)
    teacher.__class__ = type(model).stock_class  # the stock classifier: same weights, no token pruning
    teacher.eval().requires_grad_(False)
    examples = training_examples(stage, tokenizer, dict(model.config.label2id))
    with only_the_retainer_trains(model), tempfile.TemporaryDirectory(prefix="hf-prune-retainer-") as tmp:
        args = retainer_training_arguments(stage, tmp, progress)
        ratio_head = [p for n, p in model.named_parameters() if n.startswith("retainer.ratio.")]
        others = [
            p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("retainer.ratio.")
        ]
        optimizer = torch.optim.AdamW(
            [{"params": others}, {"params": ratio_head, "lr": stage.ratio_learning_rate}],
            lr=stage.learning_rate,
            weight_decay=0.0,
        )
        trainer = RetainerTrainer(
            model=model,
            args=args,
            train_dataset=examples,
            teacher=teacher,
            stage=stage,
            data_collator=DataCollatorWithPadding(tokenizer),
            optimizers=(optimizer, None),
        )
        silence_when_quiet(trainer, progress).train()
    last = trainer.history[-max(1, len(trainer.history) // 10) :]
    summary = {
        "examples": len(examples),
        "steps": stage.train_steps,
        "final": {
            k: round(sum(h[k] for h in last) / len(last), 4) for k in last[-1] if k != "teacher_weight"
        },
    }
    if stage.algorithm == "adtp":
        summary["ratio_choice"] = set_price_on(
            model, examples, DataCollatorWithPadding(tokenizer), stage.target_ratio
        )
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def set_price_on(
    model: Any, examples: list[dict[str, Any]], collator: Any, target: float, batch_size: int = 64
) -> dict[str, Any]:
    """Set ``model.retainer.price`` so that the mean ratio the model chooses on ``examples`` is ``target``;
    returns the price and the share of examples per candidate ratio."""
    predicted = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            inputs = collator(
                [
                    {k: v for k, v in row.items() if k != "labels"}
                    for row in examples[start : start + batch_size]
                ]
            ).to(model.device)
            predicted.append(model(**inputs).predicted_costs)
    costs = torch.cat(predicted)
    candidates = torch.tensor(model.settings["candidate_ratios"], device=costs.device)
    price = budget_price(costs, candidates, target)
    model.retainer.price.fill_(price)
    chosen = candidates[(costs + price * candidates).argmin(dim=1)]
    return {
        "price": round(price, 6),
        "mean_ratio": round(float(chosen.mean()), 4),
        "share": {f"{c:g}": round(float((chosen == c).float().mean()), 4) for c in candidates.tolist()},
    }
