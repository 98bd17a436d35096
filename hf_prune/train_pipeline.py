"""``hf-prune train RECIPE``: fine-tune with ``transformers.Trainer`` while a training-time method prunes,
then save like ``prune`` does (stock architecture, ``hf_prune.json``, model card, evaluation report).

    model: path/to/model
    output: out/sparse
    train:
      data: train.jsonl          # text (causal_lm) or {text, label} rows (classification)
      max_length: 128
      arguments: {max_steps: 200, learning_rate: 1.0e-4, per_device_train_batch_size: 8}
    stages:
      - {method: gmp, final_sparsity: 0.8, end_step: 150, frequency: 10}
    evaluate:
      - {task: perplexity, data: valid.txt}

Everything is checked before any weights load: the keys of the recipe and of ``train.arguments`` (the
fields of ``transformers.TrainingArguments``), the method's config, the output folder. Trainer's own
checkpoints go to ``train.arguments.output_dir`` (default: ``<output>.checkpoints`` beside the output);
``trainer.train(resume_from_checkpoint=...)`` is ``train.arguments.resume_from_checkpoint``. A ``lottery``
stage runs its rounds through ``run_lottery``, one Trainer per round.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .adapters import get_adapter, use_cache_restored
from .checkpoint import (
    library_versions,
    load_image_processor,
    load_model,
    load_preprocessor,
    save_pruned_model,
    text_tokenizer,
)
from .data import load_text_records, packed_token_windows, read_records
from .errors import DataError, RecipeError
from .evals.harness import evaluation_entry, run_task
from .image_data import read_image_set
from .integrations.cards import AugmentingImageCollator, ImageClassificationDataset, train_cards
from .integrations.pruning_callback import PruningCallback, run_lottery, training_method_from
from .methods.robust.cards import CardsConfig
from .methods.sparsity.lottery import LotteryConfig
from .pipeline import load_recipe_config, preflight, publish_output
from .recipe import Recipe, TrainingConfig, load_recipe


@dataclasses.dataclass
class TrainResult:
    model: Any
    tokenizer: Any
    report: dict[str, Any]
    output: Path | None
    published: Any = None  # the push of a publish: section, as PruneResult.published


def train(
    recipe_source: Any,
    *,
    progress: bool = True,
    overwrite: bool | None = None,
    trust_remote_code: bool | None = None,
) -> TrainResult:
    """Run a training recipe (see the module docstring) and save the sparse model to ``recipe.output``."""
    started = time.perf_counter()
    recipe = load_recipe(recipe_source)
    overrides = {"overwrite": overwrite, "trust_remote_code": trust_remote_code}
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    if recipe.train is None:
        raise RecipeError("train: missing: hf-prune train needs a train section (data, arguments)")
    if len(recipe.stages) != 1:
        raise RecipeError(
            f"stages: hf-prune train runs exactly one training-time method, got {len(recipe.stages)}"
        )
    name, method = training_method_from(recipe.stages[0].to_dict())
    config = load_recipe_config(recipe)
    adapter = get_adapter(config)
    task = training_task(recipe.train, adapter, recipe.model)
    method.check_model(config, adapter)  # the method's architecture check (cards: image classifiers only)
    arguments = training_arguments(recipe, progress)
    preflight(recipe, config, adapter, None, training=True)
    # The data is read (and each bad row named) before the model loads.
    if task == "image_classification":
        preprocessor = load_image_processor(recipe.model, trust_remote_code=recipe.trust_remote_code)
        dataset = read_image_set(recipe.train.data, split=recipe.train.split, limit=recipe.train.limit)
    else:
        preprocessor = load_preprocessor(recipe.model, trust_remote_code=recipe.trust_remote_code)
        dataset = build_dataset(recipe.train, task, text_tokenizer(preprocessor))

    model = load_model(
        recipe.model, dtype=recipe.dtype, device=recipe.device, trust_remote_code=recipe.trust_remote_code
    )
    original = [run_task(model, preprocessor, t, progress=progress) for t in recipe.evaluate]
    params_before = sum(p.numel() for p in model.parameters())
    model.train()
    resume = arguments.get("resume_from_checkpoint")  # kept in the arguments too: the callback reads it
    write_members = None
    with use_cache_restored(model):  # Trainer sets config.use_cache; the saved config keeps the source's
        if isinstance(method, CardsConfig):
            began = time.perf_counter()
            cards = train_cards(model, dataset, method, arguments=arguments, processor=preprocessor)
            model, write_members = cards.deck, _member_writer(cards, preprocessor)
            stage = {"method": name, **cards.report, "seconds": round(time.perf_counter() - began, 3)}
        elif isinstance(method, LotteryConfig):
            _, reports = run_lottery(
                lambda r: _trainer(model, arguments, dataset, preprocessor, task, round_index=r),
                method,
                resume_from_checkpoint=resume,
            )
            stage = reports[-1].to_dict()
            stage["rounds_seconds"] = [round(r.seconds, 3) for r in reports]
        else:
            callback = PruningCallback(method)
            trainer = _trainer(model, arguments, dataset, preprocessor, task, callbacks=[callback])
            trainer.train(resume_from_checkpoint=resume)
            stage = callback.report.to_dict()
            stage["final_train_loss"] = _last_loss(trainer)
    model.eval()
    evaluation = [
        evaluation_entry(spec, before, run_task(model, preprocessor, spec, progress=progress))
        for spec, before in zip(recipe.evaluate, original, strict=True)
    ]
    params = sum(p.numel() for p in model.parameters())
    report = {
        "recipe": recipe.to_dict(),
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "params_before": params_before,
        "params_after": params,
        "nonzero_params_after": sum(int((p != 0).sum()) for p in model.parameters()),
        "stages": [stage],
        "evaluation": evaluation,
        "seconds": round(time.perf_counter() - started, 3),
    }
    output = save_pruned_model(model, preprocessor, recipe.output, report, write_extra=write_members)
    return TrainResult(model, preprocessor, report, output, publish_output(recipe, output, progress))


def training_task(config: TrainingConfig, adapter: Any, model_name: str) -> str:
    """``train.task``, or the one the model's kind implies; a task the model cannot train for is refused."""
    implied = (
        "classification"
        if adapter.is_encoder
        else "image_classification"
        if adapter.is_image_classifier
        else "causal_lm"
    )
    task = config.task or implied
    wrong_head = task == "classification" and not adapter.is_encoder
    if wrong_head or (task == "image_classification") != adapter.is_image_classifier:
        kinds = {
            "classification": "a sequence classifier",
            "image_classification": "an image classifier",
            "causal_lm": "a causal LM",
        }
        raise RecipeError(f"train.task: {task} needs {kinds[task]}, {model_name} is {kinds[implied]}")
    return task


def _member_writer(cards: Any, processor: Any) -> Any:
    """Each CARD also as a stock checkpoint of its own, in ``cards/member-<i>-<domain>/`` of the output."""

    def write(folder: Path) -> None:
        for index, (member, domain) in enumerate(zip(cards.members, cards.domains, strict=True)):
            target = folder / "cards" / f"member-{index}-{domain}"
            member.save_pretrained(target)
            if processor is not None:
                processor.save_pretrained(target)

    return write


def training_arguments(recipe: Recipe, progress: bool) -> dict[str, Any]:
    """``train.arguments`` checked against ``TrainingArguments``' fields, with hf-prune's defaults."""
    from transformers import TrainingArguments

    allowed = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    given = dict(recipe.train.arguments)
    for key in given:
        if key not in allowed:
            raise RecipeError(f"train.arguments.{key}: not a transformers.TrainingArguments field")
    output = Path(recipe.output)
    defaults = {
        "output_dir": str(output.with_name(output.name + ".checkpoints")),
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10,
        "disable_tqdm": not progress,
        "use_cpu": not torch.cuda.is_available(),
    }
    return {**defaults, **given}


def build_dataset(config: TrainingConfig, task: str, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    """Tokenized examples: packed ``max_length`` windows of all text (causal_lm), or one truncated text
    per labelled row (classification)."""
    if task == "causal_lm":
        texts = load_text_records(
            config.data, text_field=config.text_field, split=config.split, sample_by=config.sample_by
        )
        windows = packed_token_windows(texts, tokenizer, config.max_length)
        if not windows:
            raise DataError(f"{config.data}: fewer tokens than one window of max_length={config.max_length}")
        return [{"input_ids": torch.tensor(w), "labels": torch.tensor(w)} for w in windows]
    examples = []
    for where, row in read_records(config.data, (config.text_field, config.label_field), split=config.split):
        label = row[config.label_field]
        if not isinstance(label, int) or isinstance(label, bool):
            raise DataError(f"{where}: field {config.label_field!r} must be an integer label, got {label!r}")
        encoded = tokenizer(row[config.text_field], truncation=True, max_length=config.max_length)
        examples.append(
            {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": label}
        )
    return examples


def _trainer(model, arguments, dataset, preprocessor, task, *, callbacks=(), round_index=None):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    args = dict(arguments)
    if round_index is not None:
        args["output_dir"] = str(Path(args["output_dir"]) / f"round-{round_index}")
    collator = DataCollatorWithPadding(preprocessor) if task == "classification" else None
    if task == "image_classification":  # pixel values made per batch from uint8 images, not augmented
        args["remove_unused_columns"] = False
        channels = int(dataset.images.shape[1])
        collator = AugmentingImageCollator("none", preprocessor, channels, seed=int(args.get("seed", 42)))
        dataset = ImageClassificationDataset(dataset)
    return Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=dataset,
        data_collator=collator,
        callbacks=list(callbacks),
    )


def _last_loss(trainer: Any) -> float | None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if losses:
        return round(float(losses[-1]), 6)
    final = [entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry]
    return round(float(final[-1]), 6) if final else None
