"""The pipeline: recipe → load model → calibration → stages → evaluate → save (atomically).

Everything that can be checked without weights (recipe, architecture, budgets, paths, data files) is
checked before the model is loaded, so a bad recipe fails in seconds and writes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .adapters import count_parameters, get_adapter
from .checkpoint import (
    check_device,
    check_output_path,
    library_versions,
    load_config,
    load_model,
    load_preprocessor,
    resolve_device,
    save_pruned_model,
    text_tokenizer,
)
from .context import PruneContext
from .data import looks_like_local_path
from .engine.distributed import barrier, init_from_environment, is_main_process, rank_and_world
from .engine.sequential import check_sequential_recipe, choose_engine, prune_sequential
from .errors import ConfigFieldError, HfPruneError, RecipeError, UnsupportedModelError
from .evals.harness import (
    TaskModelMismatch,
    check_task_fits,
    evaluation_entry,
    resolve_task,
    run_task,
)
from .evals.offloaded_evaluation import OffloadedEvaluation
from .evals.perplexity import window_length
from .evals.report import write_report
from .model_card import public_value
from .output_safety import check_output_folder, weight_files_size
from .recipe import Recipe, load_recipe
from .registry import OneShotMethod, get_method, run_stage


@dataclass
class PruneResult:
    model: Any
    tokenizer: Any  # tokenizer, or processor for vision-language models
    report: dict[str, Any]
    output: Path | None
    #: The push of a recipe's ``publish:`` section (repo and commit URLs), None without one. Not written
    #: into the saved folder, which does not change after the save.
    published: Any = None

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.report["stages"]


def prune(
    model_or_recipe: Any,
    recipe: Any = None,
    *,
    tokenizer: Any = None,
    progress: bool = True,
    overwrite: bool | None = None,
    trust_remote_code: bool | None = None,
) -> PruneResult:
    """Run a recipe. ``prune(recipe)`` loads ``recipe.model``; ``prune(model, recipe)`` prunes a copy of a
    model already in memory (the given model is left untouched). Saves when the recipe has ``output``.

    ``overwrite`` and ``trust_remote_code``, when given, override the recipe's keys (the CLI's flags)."""
    started = time.perf_counter()
    if recipe is None:
        recipe, source_model = load_recipe(model_or_recipe), None
    else:
        recipe, source_model = load_recipe(recipe, model_in_memory=True), model_or_recipe
    overrides = {"overwrite": overwrite, "trust_remote_code": trust_remote_code}
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    config = source_model.config if source_model is not None else load_recipe_config(recipe)
    adapter = get_adapter(config)
    predicted = preflight(recipe, config, adapter, source_model)
    processes = init_from_environment(resolve_device(recipe.device)) and rank_and_world()[1]
    engine, why = choose_engine(recipe, model_in_memory=source_model is not None)
    if processes:
        unsupported = [s.method for s in recipe.stages if not s.config.supports_data_parallel_on(adapter)]
        if unsupported:
            raise RecipeError(
                f"stages: {', '.join(unsupported)} cannot calibrate data-parallel (its statistics are not "
                f"combined across processes); run it in one process, not under torchrun / accelerate launch"
            )
    if engine == "sequential":
        check_sequential_recipe(recipe, adapter)
        evaluation = OffloadedEvaluation(recipe, [config, predicted], progress) if recipe.evaluate else None
        run = prune_sequential(recipe, config, adapter, progress, why, evaluation)
        published = publish_output(recipe, run["output"], progress) if is_main_process() else None
        return PruneResult(None, run["preprocessor"], run["report"], run["output"], published)
    # The original and the pruned model are scored under one protocol, resolved from both configs (the
    # pruned one as the stages predict it) before either runs.
    compared = [config, predicted]

    if source_model is None:
        model = load_model(
            recipe.model,
            dtype=recipe.dtype,
            device=recipe.device,
            trust_remote_code=recipe.trust_remote_code,
            allow_pickle=recipe.allow_pickle,
        )
        preprocessor = tokenizer or load_preprocessor(
            recipe.model,
            vision_language=adapter.is_vision_language,
            trust_remote_code=recipe.trust_remote_code,
        )
    else:
        model = copy.deepcopy(source_model)
        name = recipe.model or getattr(source_model, "name_or_path", "") or None
        preprocessor = tokenizer or (
            load_preprocessor(name, vision_language=adapter.is_vision_language)
            if name and Path(name).exists()
            else None
        )
    if recipe.evaluate and preprocessor is None:
        raise HfPruneError("evaluate: needs a tokenizer, and none was found with the model (pass tokenizer=)")

    params_before = count_parameters(model)
    experts_before = adapter.experts_per_layer(model) if adapter.spec.is_moe else None
    original_scores = [
        run_task(model, preprocessor, task, progress=progress, configs=compared) for task in recipe.evaluate
    ]
    # The prefill sweep runs causal LMs (with generate); an encoder classifier has neither.
    sweep = bool(recipe.evaluate) and not adapter.is_encoder
    latency = {"original": _prefill_sweep(model, preprocessor)} if sweep else {}
    floor, needed_by = calibration_floor(recipe, config)
    context = PruneContext(
        adapter,
        text_tokenizer(preprocessor),
        recipe.calibration,
        progress,
        min_calibration_tokens=floor,
        min_calibration_tokens_by=needed_by,
    )
    stage_reports = []
    for stage in recipe.stages:
        params = count_parameters(model)
        report = run_stage(get_method(stage.method), model, stage.config, context).to_dict()
        report.update(params_before=params, params_after=count_parameters(model), engine="in_memory")
        stage_reports.append(report)
    evaluation = []
    for task, original in zip(recipe.evaluate, original_scores, strict=True):
        pruned = run_task(model, preprocessor, task, progress=progress, configs=compared)
        evaluation.append(evaluation_entry(task, original, pruned))

    report = {
        "recipe": recipe.to_dict(),
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "engine": {"name": "in_memory", "why": why, "processes": rank_and_world()[1]},
        "params_before": params_before,
        "params_after": count_parameters(model),
        "stages": stage_reports,
        "evaluation": evaluation,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if sweep:
        latency["pruned"] = _prefill_sweep(model, preprocessor)
    expert_counts = (
        {"original": experts_before, "pruned": adapter.experts_per_layer(model)}
        if experts_before is not None
        else None
    )

    def write_run_report(folder: Path) -> None:
        if evaluation or expert_counts:
            run = {
                "label": "+".join(s.method for s in recipe.stages),
                "params_before": params_before,
                "params_after": report["params_after"],
                "evaluation": evaluation,
            }
            write_report(
                folder,
                # The source's name only: this report is published with the folder.
                title=f"Pruning report: {public_value(recipe.model, 'model') or 'in-memory model'}",
                runs=[run],
                latency_ms=latency,
                expert_counts=expert_counts,
                notes=[
                    "Latency: median prefill of 3 runs, original measured before pruning and "
                    "pruned after, in the same process (`hf-prune bench` interleaves them)."
                ],
            )

    output = None
    if recipe.output and is_main_process():  # data-parallel: every process holds the same result
        output = save_pruned_model(model, preprocessor, recipe.output, report, write_run_report)
    barrier()
    published = publish_output(recipe, output, progress) if is_main_process() else None
    return PruneResult(model, preprocessor, report, output, published)


def publish_output(recipe: Recipe, output: Path | None, progress: bool) -> Any:
    """Push the saved output when the recipe has a ``publish:`` section (after the save succeeded)."""
    if recipe.publish is None or output is None:
        return None
    from .integrations.hub import push_folder

    settings = recipe.publish
    return push_folder(
        output,
        settings.repo_id,
        endpoint=settings.endpoint,
        private=settings.private,
        revision=settings.revision,
        commit_message=settings.commit_message,
        base_model=settings.base_model,
        progress=progress,
        key="publish.repo_id",
    )


def _prefill_sweep(model: Any, preprocessor: Any) -> dict[int, float]:
    """Median prefill latency (ms) at a few lengths, for the report's latency plot."""
    from .evals.bench import BenchSettings, benchmark_models, prefill_latency_ms

    settings = BenchSettings(seq_lens=(32, 64, 128, 256), decode_tokens=2, repeats=3)
    results = benchmark_models({"model": (model, preprocessor, None)}, settings, progress=False)
    return prefill_latency_ms(results)["model"]


def calibration_floor(recipe: Recipe, config: Any) -> tuple[int, str]:
    """(fewest real calibration tokens, the stage that needs them): the largest
    ``min_calibration_tokens`` among the stages that read calibration data, (0, "") when none has a floor."""
    floors = [
        (stage.config.min_calibration_tokens(config), f"stages[{i}] ({stage.method})")
        for i, stage in enumerate(recipe.stages)
        if stage.config.needs_calibration
    ]
    return max(floors, key=lambda floor: floor[0], default=(0, ""))


def load_recipe_config(recipe: Recipe) -> Any:
    try:
        return load_config(recipe.model, trust_remote_code=recipe.trust_remote_code)
    except HfPruneError as exc:
        raise RecipeError(str(exc)) from exc.__cause__


def preflight(recipe: Recipe, config: Any, adapter: Any, source_model: Any, *, training: bool = False) -> Any:
    """Checks that need the model's config but not its weights; the config the stages will leave.
    ``training``: a ``hf-prune train`` recipe, whose one stage is a training-time method (checked by the
    caller) and which changes no shape."""
    if source_model is None:  # a model in memory stays where it is
        try:
            check_device(recipe.device)
        except HfPruneError as exc:
            raise RecipeError(str(exc)) from None
    if recipe.train is not None and not training:
        raise RecipeError("train: a prune recipe has no train section; run the recipe with hf-prune train")
    if recipe.publish is not None:
        import huggingface_hub

        if huggingface_hub.constants.is_offline_mode():  # refused now, not after the pruning
            raise RecipeError(
                "publish: HF_HUB_OFFLINE is set, and a push needs the Hub; unset it or drop publish"
            )
    predicted = config if training else _check_stages(recipe, config, adapter)
    for i, task in enumerate(recipe.evaluate):
        try:
            check_task_fits(task.task, config)
            check_task_fits(task.task, predicted)
        except TaskModelMismatch as exc:
            raise RecipeError(f"evaluate[{i}].task: {exc}") from None
        resolved = resolve_task(task, [config, predicted])
        window = min(window_length(c, resolved.seq_len) for c in (config, predicted))
        if resolved.context_len is not None and resolved.context_len >= window:
            raise RecipeError(
                f"evaluate[{i}].context_len: {resolved.context_len} leaves nothing to score in windows of "
                f"{window} tokens (seq_len, at most the model's positions): it must be below that"
            )
    floor, needed_by = calibration_floor(recipe, config)
    if recipe.calibration and floor > recipe.calibration.num_samples * recipe.calibration.seq_len:
        calibration = recipe.calibration
        raise RecipeError(
            f"calibration.num_samples: {calibration.num_samples} × seq_len {calibration.seq_len} = "
            f"{calibration.num_samples * calibration.seq_len:,} tokens at most, fewer than the "
            f"{floor:,} that {needed_by} needs on this model"
        )
    local_data = [("calibration.data", recipe.calibration.data)] if recipe.calibration else []
    local_data += [(f"evaluate[{i}].data", task.data) for i, task in enumerate(recipe.evaluate)]
    local_data += [("train.data", recipe.train.data)] if recipe.train else []
    for key, data in local_data:
        if looks_like_local_path(data) and not Path(data).expanduser().exists():
            raise RecipeError(f"{key}: file not found: {data}")
    if recipe.output:
        check_output_path(recipe.output, recipe.model or getattr(source_model, "name_or_path", None))
        required = (
            sum(t.numel() * t.element_size() for t in source_model.state_dict().values())
            if source_model is not None
            else weight_files_size(recipe.model)
        )
        check_output_folder(
            recipe.output,
            overwrite=recipe.overwrite,
            protected_files=_recipe_local_files(recipe),
            required_bytes=required,
        )
    return predicted


def _recipe_local_files(recipe: Recipe) -> list[tuple[str, Path]]:
    """The local files a recipe reads (the recipe itself, data, stage fields naming a path): a save must
    never replace a folder holding one of them."""
    named: list[tuple[str, Any]] = [("the recipe file", recipe.source_file)]
    if recipe.calibration:
        named.append(("calibration.data", recipe.calibration.data))
    named += [(f"evaluate[{i}].data", task.data) for i, task in enumerate(recipe.evaluate)]
    for i, stage in enumerate(recipe.stages):  # e.g. train_data, text_tower: any string naming a local path
        # A choice among fixed words (algorithm: adtp) is no path, even if a folder of that name exists.
        choices = {f.name for f in dataclasses.fields(stage.config) if "Literal[" in str(f.type)}
        named += [
            (f"stages[{i}].{key}", value)
            for key, value in stage.config.to_dict().items()
            if isinstance(value, str) and key not in choices
        ]
    return [(key, Path(value).expanduser()) for key, value in named if value is not None and _exists(value)]


def _exists(path: str | Path) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):  # a string no file could have as its name
        return False


def _check_stages(recipe: Recipe, config: Any, adapter: Any) -> Any:
    """Check each stage against the config as the stages before it will leave it (``predict_config``), so
    stages that together remove too much fail here, not after the first ones ran. The only call of each
    stage's ``check_model``: ``apply`` trusts it. Returns the config the last stage will leave."""
    changed_by: list[str] = []  # the earlier stages that change what a check reads
    for i, stage in enumerate(recipe.stages):
        if not isinstance(stage.config, OneShotMethod):
            raise RecipeError(
                f"stages[{i}].method: {stage.method} is a training-time method; a prune recipe runs "
                "one-shot methods only (train with hf_prune.PruningCallback inside transformers.Trainer)"
            )
        after = f" (the model as {', '.join(changed_by)} will leave it)" if changed_by else ""
        try:
            stage.config.check_model(config, adapter)
        except ConfigFieldError as exc:
            raise RecipeError(f"stages[{i}].{exc.field}: {exc.message}{after}") from None
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"stages[{i}] ({stage.method}): {exc}{after}") from None
        predicted = stage.config.predict_config(config, adapter)
        if predicted is not config:
            changed_by.append(f"stages[{i}] ({stage.method})")
            config = predicted
    return config
