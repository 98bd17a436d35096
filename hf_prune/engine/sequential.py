"""The ``engine: sequential`` pipeline, and the choice ``engine: auto`` makes.

Same recipe, same output folder as ``hf_prune.pipeline.prune``, but the model is never whole in memory:
the checkpoint's files are checked, the model is opened with its weights on disk (``OffloadedModel``), the
stage's ``apply_sequential`` runs the calibration one decoder layer at a time, and the writer copies the
weights shard by shard into the atomic output folder, applying the stage's edits on the way.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..adapters import auto_model_class, count_parameters, get_adapter
from ..checkpoint import library_versions, load_preprocessor, save_pruned_checkpoint, text_tokenizer
from ..context import PruneContext
from ..errors import RecipeError
from ..output_safety import format_bytes, weight_files_size
from ..registry import get_method
from .activation_store import ActivationStore, check_disk_space
from .checkpoint_files import read_checkpoint_files
from .distributed import barrier, is_main_process, rank_and_world
from .layers import LayerRunner, OffloadedModel, release_freed_memory
from .writer import write_pruned_weights

#: Multiple of the weight files' size the in-memory engine needs (weights, a deep copy for the original
#: model never being modified, activations); ``engine: auto`` goes sequential above it.
IN_MEMORY_FACTOR = 2.5
#: Bump when the layout of cached activations changes: old caches are then cleared, not reused.
CACHE_VERSION = 1


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable``), or a large number when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def choose_engine(recipe: Any, *, model_in_memory: bool) -> tuple[str, str]:
    """(engine, why) for a recipe: its ``engine`` unless auto; auto is sequential when the local weight
    files need more than the available memory."""
    if recipe.engine != "auto":
        return recipe.engine, "set by the recipe"
    if model_in_memory:
        return "in_memory", "the model was given in memory"
    size, free = weight_files_size(recipe.model), available_memory()
    if size and size * IN_MEMORY_FACTOR > free:
        return (
            "sequential",
            f"weights {format_bytes(size)} × {IN_MEMORY_FACTOR} > {format_bytes(free)} available",
        )
    return "in_memory", f"weights {format_bytes(size)} fit in {format_bytes(free)} available"


def check_sequential_recipe(recipe: Any, adapter: Any) -> None:
    """What the sequential engine cannot do, refused before anything loads."""
    if recipe.model is None or not Path(recipe.model).expanduser().is_dir():
        raise RecipeError(
            f"engine: sequential reads a local checkpoint folder; model {recipe.model!r} is not one"
        )
    read_checkpoint_files(recipe.model)
    for index, stage in enumerate(recipe.stages):
        if not stage.config.supports_sequential(adapter):
            algorithm = getattr(stage.config, "algorithm", None)
            what = f"{stage.method} (algorithm {algorithm})" if algorithm else stage.method
            raise RecipeError(
                f"stages[{index}].method: {what} has no layer-by-layer variant; use engine: in_memory (the "
                "whole model in memory)"
            )


def activation_bytes(batches: list[Any], hidden_size: int, num_layers: int, itemsize: int) -> int:
    """What the layer-by-layer pass of a depth method caches at most: every layer's output and MLP output."""
    positions = sum(b.input_ids.numel() for b in batches)
    return (2 * num_layers + 1) * positions * hidden_size * itemsize


def _fingerprint(folder: Path, dtype: str, stage: Any, batches: list[Any]) -> str:
    """Identifies what the cached activations depend on; a different one clears the cache."""
    files = read_checkpoint_files(folder, check_tensors=False)
    digest = hashlib.sha256()
    for shard in files.shards:
        stat = (files.folder / shard).stat()
        digest.update(f"{shard}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(json.dumps([CACHE_VERSION, dtype, stage.to_dict(), rank_and_world()]).encode())
    for batch in batches:
        digest.update(batch.input_ids.numpy().tobytes())
        digest.update(batch.attention_mask.numpy().tobytes())
    return digest.hexdigest()


def default_cache_folder(recipe: Any) -> Path:
    output = Path(recipe.output).expanduser().resolve()
    return output.parent / f".{output.name}.activations"


def prune_sequential(
    recipe: Any, config: Any, adapter: Any, progress: bool, why: str, evaluation: Any = None
) -> dict:
    """Run ``recipe`` layer by layer; returns ``{"report", "output" (folder or None), "preprocessor"}``.

    Several stages run in turn, each on the checkpoint the previous one wrote (shard by shard) into the
    cache folder; the last one writes the output. ``evaluation`` (the pipeline's
    ``evals.offloaded_evaluation.OffloadedEvaluation``, for an ``evaluate:`` section) scores the original
    checkpoint before the stages and the pruned one before the output is renamed into place."""
    started = time.perf_counter()
    preprocessor = load_preprocessor(recipe.model, trust_remote_code=recipe.trust_remote_code)
    context = PruneContext(adapter, text_tokenizer(preprocessor), recipe.calibration, progress)

    def batches_of(stage: Any) -> list[Any]:
        if recipe.calibration is None:
            return []
        return context.calibration_batches(split=stage.config.data_parallel_split)

    rank, world = rank_and_world()
    cache_root = (
        Path(recipe.activation_cache).expanduser()
        if recipe.activation_cache
        else default_cache_folder(recipe)
    )
    root_existed = cache_root.exists()
    barrier()  # every process looked before any creates its folder in it
    cache = cache_root / f"rank-{rank}" if world > 1 else cache_root
    text = adapter.text_config(config)
    itemsize = 2 if recipe.dtype in ("bfloat16", "float16") else 4
    needed = max(
        activation_bytes(batches_of(stage), text.hidden_size, adapter.num_layers(config), itemsize)
        for stage in recipe.stages
    )
    budget = (
        int(recipe.activation_memory_gb * 1e9)
        if recipe.activation_memory_gb is not None
        else available_memory() // 2
    )
    # the checkpoints between stages go to the cache folder too
    between = weight_files_size(recipe.model) * (len(recipe.stages) - 1) if is_main_process() else 0
    check_disk_space(cache, max(0, needed - budget) + between)
    report = {
        "recipe": recipe.to_dict(),
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "engine": {"name": "sequential", "why": why, "processes": world},
        "stages": [],
        "evaluation": [],
    }
    source_folder = Path(recipe.model).expanduser()
    output = None
    evaluating = evaluation is not None and is_main_process() and bool(recipe.output)
    if evaluating:  # the original, before anything changes
        evaluation.original(source_folder, preprocessor, budget, cache_root / "evaluation-offload")
    for index, stage in enumerate(recipe.stages):
        last = index == len(recipe.stages) - 1
        stage_cache = cache if len(recipe.stages) == 1 else cache / f"stage-{index}"
        step = _run_stage(recipe, stage, source_folder, stage_cache, batches_of(stage), context, budget)
        report["stages"].append(step["report"])
        report.setdefault("params_before", step["report"]["params_before"])
        report["params_after"] = step["report"]["params_after"]
        if last and is_main_process() and recipe.output:

            def write_weights(folder: Path, step: dict = step) -> None:
                step["write"](folder)
                if evaluating:  # the pruned checkpoint as written, before the folder is renamed into place
                    offload = cache_root / "evaluation-offload"
                    evaluation.pruned(folder, preprocessor, budget, offload, report)
                report["seconds"] = round(time.perf_counter() - started, 3)

            output = save_pruned_checkpoint(
                write_weights, step["final"].config, preprocessor, recipe.output, report
            )
        elif not last:
            source_folder = cache_root / f"stage-{index}-output"  # shared by the processes
            if is_main_process():
                shutil.rmtree(source_folder, ignore_errors=True)
                source_folder.mkdir(parents=True)
                step["write"](source_folder)
            barrier()
            context.adapter = get_adapter(step["final"].config)
        step["store"].close()
    barrier()
    if is_main_process():
        for index in range(len(recipe.stages) - 1):
            shutil.rmtree(cache_root / f"stage-{index}-output", ignore_errors=True)
        if (world > 1 or len(recipe.stages) > 1) and not root_existed:  # emptied: remove it
            with contextlib.suppress(OSError):
                cache_root.rmdir()
    return {"report": report, "output": output, "preprocessor": preprocessor}


def _run_stage(
    recipe: Any,
    stage: Any,
    folder: Path,
    cache: Path,
    batches: list[Any],
    context: PruneContext,
    budget: int,
) -> dict:
    """One stage on the checkpoint in ``folder``: its report, its store, the weightless pruned model and a
    ``write(folder)`` that writes the pruned checkpoint's weights, config and remote code there."""
    adapter = context.adapter
    store = ActivationStore(cache, budget, _fingerprint(folder, recipe.dtype, stage, batches))
    opening = time.perf_counter()
    source = OffloadedModel(
        folder,
        auto_model_class(adapter),
        offload_folder=cache / "offload",
        dtype=recipe.dtype,
        trust_remote_code=recipe.trust_remote_code,
        # MoE checkpoints store one tensor per expert, which transformers fuses while it loads
        converted_on_load=adapter.spec.is_moe,
    )
    open_seconds = time.perf_counter() - opening
    calibration_started = time.perf_counter()
    runner = LayerRunner(source, adapter, batches)
    plan = stage.config.apply_sequential(runner, store, context)
    seconds = time.perf_counter() - calibration_started
    # The structural change on a weightless copy: the output's config, class and remote code.
    final = copy.deepcopy(source.model)
    if plan.structural_edit is not None:
        plan.structural_edit(final)  # may complete plan.report (what was removed)
    stage_report = {
        "method": get_method(stage.method).name,
        "seconds": round(seconds, 3),
        **plan.report,
        "params_before": count_parameters(source.model),
        "params_after": count_parameters(final),
        "engine": "sequential",
        "open_seconds": round(open_seconds, 3),  # opening the checkpoint with its weights on disk
        "activations": {
            "spilled_bytes": store.spilled_bytes,
            "reused_after_restart": store.reused,
            "memory_budget_bytes": budget,
        },
    }
    store.drop_memory()  # the plan is made: keep memory for the writer (spilled entries stay for a restart)
    del runner
    release_freed_memory()

    def write(target: Path) -> None:
        kept = adapter.num_layers(source.model.config) - len(plan.removed_layers)
        with tqdm(total=kept, desc="write layers", disable=not context.progress, leave=False) as bar:
            shards = write_pruned_weights(
                source,
                adapter,
                target,
                removed_layers=plan.removed_layers,
                layer_edits=plan.layer_edits,
                layout_model=final,
                new_tensors=plan.new_tensors,
                progress=bar.update,
            )
        save_config_and_code(final, target)
        generation = folder / "generation_config.json"
        if generation.is_file():
            (target / generation.name).write_bytes(generation.read_bytes())
        stage_report["shards"] = len(shards)

    return {"report": stage_report, "store": store, "final": final, "write": write}


def save_config_and_code(model: Any, folder: Path) -> None:
    """What ``save_pretrained`` writes besides the weights: ``config.json`` and, for a class registered for
    the Auto classes (``hf_prune_<family>``), its modeling files and ``auto_map``."""
    from transformers.dynamic_module_utils import custom_object_save

    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    if getattr(model, "_auto_class", None) is not None:
        custom_object_save(model, folder, config=model.config)
    model.config.save_pretrained(folder)
