"""The pipeline: recipe → load model → calibration → stages → evaluate → save (atomically).

Everything that can be checked without weights (recipe, architecture, budgets, paths, data files) is
checked before the model is loaded, so a bad recipe fails in seconds and writes nothing.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .adapters import count_parameters, get_adapter
from .checkpoint import (
    check_output_path,
    library_versions,
    load_model,
    load_preprocessor,
    save_pruned_model,
    text_tokenizer,
)
from .context import PruneContext
from .data import looks_like_local_path
from .errors import ConfigFieldError, HfPruneError, RecipeError, UnsupportedModelError
from .recipe import Recipe, load_recipe
from .registry import get_method, run_stage


@dataclass
class PruneResult:
    model: Any
    tokenizer: Any  # tokenizer, or processor for vision-language models
    report: dict[str, Any]
    output: Path | None

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.report["stages"]


def prune(model_or_recipe: Any, recipe: Any = None, *, tokenizer: Any = None, progress: bool = True) -> PruneResult:
    """Run a recipe. ``prune(recipe)`` loads ``recipe.model``; ``prune(model, recipe)`` prunes a copy of a
    model already in memory (the given model is left untouched). Saves when the recipe has ``output``."""
    started = time.perf_counter()
    if recipe is None:
        recipe, source_model = load_recipe(model_or_recipe), None
    else:
        recipe, source_model = load_recipe(recipe, model_in_memory=True), model_or_recipe
    config = source_model.config if source_model is not None else _load_config(recipe)
    adapter = get_adapter(config)
    _preflight(recipe, config, adapter, source_model)

    if source_model is None:
        model = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device,
                           trust_remote_code=recipe.trust_remote_code, allow_pickle=recipe.allow_pickle)
        preprocessor = tokenizer or load_preprocessor(recipe.model, vision_language=adapter.is_vision_language,
                                                      trust_remote_code=recipe.trust_remote_code)
    else:
        model = copy.deepcopy(source_model)
        name = recipe.model or getattr(source_model, "name_or_path", "") or None
        preprocessor = tokenizer or (load_preprocessor(name, vision_language=adapter.is_vision_language)
                                     if name and Path(name).exists() else None)
    text_tok = text_tokenizer(preprocessor)
    if recipe.evaluate and text_tok is None:
        raise HfPruneError("evaluate: needs a tokenizer, and none was found with the model (pass tokenizer=)")

    params_before = count_parameters(model)
    original_scores = [_evaluate(model, text_tok, task, progress) for task in recipe.evaluate]
    context = PruneContext(adapter, text_tok, recipe.calibration, progress)
    stage_reports = []
    for stage in recipe.stages:
        params = count_parameters(model)
        report = run_stage(get_method(stage.method), model, stage.config, context).to_dict()
        report.update(params_before=params, params_after=count_parameters(model))
        stage_reports.append(report)
    evaluation = []
    for task, original in zip(recipe.evaluate, original_scores, strict=True):
        pruned = _evaluate(model, text_tok, task, progress)
        evaluation.append({"task": task.task, "data": task.data, "original": original, "pruned": pruned,
                           "retained": retained_fraction(task.task, original, pruned)})

    report = {
        "recipe": recipe.to_dict(),
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "params_before": params_before,
        "params_after": count_parameters(model),
        "stages": stage_reports,
        "evaluation": evaluation,
        "seconds": round(time.perf_counter() - started, 3),
    }
    output = save_pruned_model(model, preprocessor, recipe.output, report) if recipe.output else None
    return PruneResult(model, preprocessor, report, output)


def retained_fraction(task: str, original: dict[str, Any], pruned: dict[str, Any]) -> float:
    """Pruned / original quality; for perplexity (lower is better) original / pruned."""
    if task == "perplexity":
        return original["perplexity"] / pruned["perplexity"]
    return pruned[task] / original[task]


def _evaluate(model: Any, tokenizer: Any, task: Any, progress: bool) -> dict[str, Any]:
    from .evals.perplexity import evaluate_perplexity

    return evaluate_perplexity(model, tokenizer, task.data, seq_len=task.seq_len, batch_size=task.batch_size,
                               limit=task.limit, text_field=task.text_field, progress=progress)


def _load_config(recipe: Recipe) -> Any:
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(recipe.model, trust_remote_code=recipe.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"model: cannot load a config from {recipe.model!r}: {exc}") from exc


def _preflight(recipe: Recipe, config: Any, adapter: Any, source_model: Any) -> None:
    """Checks that need the model's config but not its weights."""
    for i, stage in enumerate(recipe.stages):
        try:
            stage.config.check_model(config, adapter)
        except ConfigFieldError as exc:
            raise RecipeError(f"stages[{i}].{exc.field}: {exc.message}") from None
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"stages[{i}] ({stage.method}): {exc}") from None
    if recipe.output:
        source = recipe.model or getattr(source_model, "name_or_path", None)
        check_output_path(recipe.output, source)
    local_data = [("calibration.data", recipe.calibration.data)] if recipe.calibration else []
    local_data += [(f"evaluate[{i}].data", task.data) for i, task in enumerate(recipe.evaluate)]
    for key, data in local_data:
        if looks_like_local_path(data) and not Path(data).expanduser().exists():
            raise RecipeError(f"{key}: file not found: {data}")

