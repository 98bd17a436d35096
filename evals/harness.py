"""The evaluation harness: one table of tasks, each with its main metric, direction and model kind.

``run_task`` runs one recipe ``evaluate:`` entry (or one ``hf-prune eval``) on a model; ``retained_fraction``
turns an original / pruned pair into the retained share through the shipped ``retained_performance``
metric module.

Models compared on a task (an original and its pruned model) are scored under the same protocol:
``resolve_task`` fills in what a task leaves to the models (perplexity's ``context_len`` when one of them
prunes its prompt) from the configs of all of them, before either runs, and ``run_task`` takes those configs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..adapters import get_adapter, vision_config
from ..checkpoint import text_tokenizer
from ..errors import HfPruneError, UnsupportedModelError
from ..recipe import EvaluationTask
from .metrics import load_metric
from .pruned_prompt_scoring import config_prunes_prompts


class TaskModelMismatch(HfPruneError, ValueError):
    """The task cannot run on this kind of model (vqa on a text-only model, ...)."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    metric: str  # the headline figure in the task's result dict
    higher_is_better: bool
    model_kind: str  # "causal_lm" | "sequence_classification" | "vision_language" | "image_classification"
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
        context_len=task.context_len,
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


def _corruption_robustness(
    model: Any, preprocessor: Any, task: EvaluationTask, progress: bool
) -> dict[str, Any]:
    from .image_robustness import evaluate_corruption_robustness

    return evaluate_corruption_robustness(
        model,
        preprocessor,  # an image processor, or None (pixel values in [0, 1])
        task.data,
        corruptions=task.corruptions,
        severities=task.severities or (1, 2, 3, 4, 5),
        batch_size=task.batch_size,
        limit=task.limit,
        seed=task.seed,
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
        TaskSpec(
            "corruption_robustness",
            "mean_corrupted_accuracy",
            True,
            "image_classification",
            "image-classification",
            _corruption_robustness,
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise HfPruneError(f"unknown task {name!r} (allowed: {', '.join(TASKS)})")
    return TASKS[name]


def model_kind(config: Any, model_class: str | None = None) -> str:
    """What a model is, in words, for refusals: "LlamaForCausalLM, a prompt-pruned causal LM", ..."""
    classes = [model_class] if model_class else list(getattr(config, "architectures", None) or [])
    name = ", ".join(classes) or getattr(config, "model_type", "?")
    try:
        adapter = get_adapter(config)
    except UnsupportedModelError:
        adapter = None
    encoder = adapter is not None and adapter.is_encoder
    pruned = getattr(config, "token_pruning", None) is not None
    if _is_image_classifier(config, classes):
        kind = "an image classifier"
    elif any(c.endswith("ForSequenceClassification") for c in classes):
        kind = "an encoder classifier" if encoder else "a sequence classifier"
        kind = f"a token-pruned {kind.removeprefix('an ').removeprefix('a ')}" if pruned else kind
    elif vision_config(config) is not None:
        kind = "a visual-token-pruned vision-language model" if pruned else "a vision-language model"
    elif config_prunes_prompts(config):
        kind = "a prompt-pruned causal LM"
    elif encoder:
        kind = "a token-pruned encoder" if pruned else "an encoder"
    else:
        kind = "a causal LM"
    return f"{name}, {kind}"


_KIND_WORDS = {
    "causal_lm": "a causal LM",
    "sequence_classification": "a sequence-classification model",
    "vision_language": "a vision-language model",
}


def _is_image_classifier(config: Any, classes: Sequence[str]) -> bool:
    if any(c.endswith("ForImageClassification") for c in classes):
        return True
    try:
        return get_adapter(config).is_image_classifier
    except UnsupportedModelError:
        return False


def check_task_fits(name: str, config: Any, model_class: str | None = None) -> None:
    """Raise ``TaskModelMismatch`` (one line naming the task and the kind of model) if task ``name`` cannot
    run on a model with this config / class."""
    spec = get_task(name)
    model_type = getattr(config, "model_type", "?")
    classes = [model_class] if model_class else list(getattr(config, "architectures", None) or [])
    is_classifier = any(c.endswith("ForSequenceClassification") for c in classes)
    try:
        is_encoder = get_adapter(config).is_encoder
    except UnsupportedModelError:
        is_encoder = False
    is_image_classifier = _is_image_classifier(config, classes)
    if spec.model_kind == "image_classification" and not is_image_classifier:
        raise TaskModelMismatch(
            f"task {name!r} needs an image classifier (AutoModelForImageClassification); got "
            f"{model_kind(config, model_class)}"
        )
    if spec.model_kind != "image_classification" and is_image_classifier:
        raise TaskModelMismatch(
            f"task {name!r} needs {_KIND_WORDS[spec.model_kind]} (it reads text); got "
            f"{model_kind(config, model_class)} (its task is corruption_robustness)"
        )
    if spec.model_kind == "vision_language" and vision_config(config) is None:
        raise TaskModelMismatch(
            f"task {name!r} needs a vision-language model; {model_type} has no vision tower "
            f"({model_kind(config, model_class)})"
        )
    if spec.model_kind == "sequence_classification" and (
        (classes and not is_classifier) or (not classes and config_prunes_prompts(config))
    ):
        raise TaskModelMismatch(
            f"task {name!r} needs a sequence-classification model; got {model_kind(config, model_class)}"
        )
    if spec.model_kind == "causal_lm" and (is_classifier or is_encoder):
        raise TaskModelMismatch(
            f"task {name!r} needs a language-model head (it scores next-token predictions); got "
            f"{model_kind(config, model_class)}"
        )


def resolve_task(task: EvaluationTask, configs: Sequence[Any]) -> EvaluationTask:
    """``task`` with what it leaves to the models filled in, the same for every model it compares
    (``configs``: the configs of all of them; in a pipeline, the source's and the one its stages will
    leave). Today: perplexity's ``context_len``, ``seq_len // 2`` of the shortest window any of them
    uses, when one of them prunes its prompt (it needs a context to prune; the others are scored on the
    same split)."""
    if task.task != "perplexity" or task.context_len is not None:
        return task
    if not any(config_prunes_prompts(config) for config in configs):
        return task
    from .perplexity import default_context_len, window_length

    seq_len = min(window_length(config, task.seq_len) for config in configs)
    return dataclasses.replace(task, context_len=default_context_len(seq_len))


def auto_class_for_task(name: str, config: Any) -> Any:
    """The Auto class that loads a model with the head task ``name`` needs."""
    import transformers

    kind = get_task(name).model_kind
    if kind == "image_classification":
        return transformers.AutoModelForImageClassification
    if kind == "sequence_classification":
        return transformers.AutoModelForSequenceClassification
    if kind == "vision_language" or vision_config(config) is not None:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def run_task(
    model: Any,
    preprocessor: Any,
    task: EvaluationTask,
    *,
    progress: bool = True,
    configs: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Run one evaluation task; the result carries ``task`` and ``metric`` (the headline key).

    ``configs``: the configs of every model compared on this task (default: this model's alone); the task
    is resolved against them (``resolve_task``), so each model of a comparison gets the same protocol."""
    spec = get_task(task.task)
    check_task_fits(task.task, model.config, type(model).__name__)
    if preprocessor is None and spec.model_kind != "image_classification":  # images need no processor
        raise HfPruneError(f"task {task.task!r} needs the model's tokenizer/processor, and none was found")
    configs = list(configs) if configs is not None else [model.config]
    if config_prunes_prompts(model.config) and not any(config_prunes_prompts(c) for c in configs):
        raise HfPruneError(
            f"task {task.task!r}: the model prunes its prompt, but none of the configs the task was resolved "
            "against does (give this model's config among them)"
        )
    resolved = resolve_task(task, configs)
    result = spec.run(model, preprocessor, resolved, progress)
    if resolved.context_len is not None and task.context_len is None:
        result["context_len_source"] = (
            f"default: seq_len // 2 = {resolved.context_len}, since a model compared on this task prunes its "
            "prompt (a context to prune is needed; every model is scored on the same split); set "
            "context_len (--context-len) to choose"
        )
    return {"task": spec.name, "metric": spec.metric, **result}


def evaluation_entry(task: Any, original: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    """One task's figures before and after, as hf_prune.json, the report and the model card read them."""
    return {
        "task": task.task,
        "metric": pruned["metric"],
        "task_type": get_task(task.task).card_task_type,
        "data": task.data,
        "original": original,
        "pruned": pruned,
        "retained": retained_fraction(task.task, original, pruned),
    }


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
