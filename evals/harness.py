"""The evaluation harness: one table of tasks, each with its main metric, direction and model kind.

``run_task`` runs one recipe ``evaluate:`` entry (or one ``hf-prune eval``) on a model; ``retained_fraction``
turns an original / pruned pair into the retained share through the shipped ``retained_performance``
metric module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..adapters import vision_config
from ..checkpoint import text_tokenizer
from ..errors import HfPruneError
from ..recipe import EvaluationTask
from .metrics import load_metric


class TaskModelMismatch(HfPruneError, ValueError):
    """The task cannot run on this kind of model (vqa on a text-only model, ...)."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    metric: str  # the headline figure in the task's result dict
    higher_is_better: bool
    model_kind: str  # "causal_lm" | "sequence_classification" | "vision_language"
    card_task_type: str  # model-index task type on the model card
    run: Callable[[Any, Any, EvaluationTask, bool], dict[str, Any]]


def _perplexity(model: Any, preprocessor: Any, task: EvaluationTask, progress: bool) -> dict[str, Any]:
    from .perplexity import evaluate_perplexity

    return evaluate_perplexity(
        model,
        text_tokenizer(preprocessor),
        task.data,
        seq_len=task.seq_len,
        batch_size=task.batch_size,
        limit=task.limit,
        text_field=task.text_field,
        progress=progress,
    )


def _multiple_choice(model: Any, preprocessor: Any, task: EvaluationTask, progress: bool) -> dict[str, Any]:
    from .multiple_choice import evaluate_multiple_choice

    return evaluate_multiple_choice(
        model,
        text_tokenizer(preprocessor),
        task.data,
        batch_size=task.batch_size,
        limit=task.limit,
        progress=progress,
    )


def _classification(model: Any, preprocessor: Any, task: EvaluationTask, progress: bool) -> dict[str, Any]:
    from .classification import evaluate_classification

    return evaluate_classification(
        model,
        text_tokenizer(preprocessor),
        task.data,
        text_field=task.text_field,
        text_pair_field=task.text_pair_field,
        label_field=task.label_field,
        batch_size=task.batch_size,
        limit=task.limit,
        progress=progress,
    )


def _vqa(model: Any, preprocessor: Any, task: EvaluationTask, progress: bool) -> dict[str, Any]:
    from .vqa import evaluate_vqa

    return evaluate_vqa(
        model,
        preprocessor,
        task.data,
        batch_size=task.batch_size,
        limit=task.limit,
        max_new_tokens=task.max_new_tokens,
        progress=progress,
    )


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("perplexity", "perplexity", False, "causal_lm", "text-generation", _perplexity),
        TaskSpec("multiple_choice", "accuracy", True, "causal_lm", "multiple-choice", _multiple_choice),
        TaskSpec(
            "classification",
            "accuracy",
            True,
            "sequence_classification",
            "text-classification",
            _classification,
        ),
        TaskSpec("vqa", "vqa_accuracy", True, "vision_language", "visual-question-answering", _vqa),
    )
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise HfPruneError(f"unknown task {name!r} (allowed: {', '.join(TASKS)})")
    return TASKS[name]


def check_task_fits(name: str, config: Any, model_class: str | None = None) -> None:
    """Raise ``TaskModelMismatch`` if task ``name`` cannot run on a model with this config / class."""
    spec = get_task(name)
    model_type = getattr(config, "model_type", "?")
    classes = [model_class] if model_class else list(getattr(config, "architectures", None) or [])
    is_classifier = any(c.endswith("ForSequenceClassification") for c in classes)
    if spec.model_kind == "vision_language" and vision_config(config) is None:
        raise TaskModelMismatch(
            f"task {name!r} needs a vision-language model; {model_type} has no vision tower"
        )
    if spec.model_kind == "sequence_classification" and classes and not is_classifier:
        raise TaskModelMismatch(
            f"task {name!r} needs a sequence-classification model; got {', '.join(classes)}"
        )
    if spec.model_kind == "causal_lm" and is_classifier:
        raise TaskModelMismatch(f"task {name!r} needs a language-model head; got {', '.join(classes)}")


def auto_class_for_task(name: str, config: Any) -> Any:
    """The Auto class that loads a model with the head task ``name`` needs."""
    import transformers

    kind = get_task(name).model_kind
    if kind == "sequence_classification":
        return transformers.AutoModelForSequenceClassification
    if kind == "vision_language" or vision_config(config) is not None:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def run_task(model: Any, preprocessor: Any, task: EvaluationTask, *, progress: bool = True) -> dict[str, Any]:
    """Run one evaluation task; the result carries ``task`` and ``metric`` (the headline key)."""
    spec = get_task(task.task)
    check_task_fits(task.task, model.config, type(model).__name__)
    if preprocessor is None:
        raise HfPruneError(f"task {task.task!r} needs the model's tokenizer/processor, and none was found")
    result = spec.run(model, preprocessor, task, progress)
    return {"task": spec.name, "metric": spec.metric, **result}


def retained_fraction(name: str, original: dict[str, Any], pruned: dict[str, Any]) -> float | None:
    """Share of the original's quality the pruned model keeps (original / pruned when lower is better);
    None when the original scores 0 on a higher-is-better metric (no baseline to keep a share of)."""
    spec = get_task(name)
    if spec.higher_is_better and original[spec.metric] == 0:
        return None
    metric = load_metric("retained_performance")
    result = metric.compute(
        pruned=[pruned[spec.metric]], original=[original[spec.metric]], higher_is_better=spec.higher_is_better
    )
    return float(result["retained"])
