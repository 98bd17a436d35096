"""Evaluating and benchmarking saved checkpoints: what ``hf-prune eval`` and ``hf-prune bench`` run.

Both load each model with the head its task needs, on CUDA when present (bfloat16 there by default,
the checkpoint's dtype on CPU; ``device_map="auto"`` spreads a model too large for one GPU).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from ..adapters import count_parameters, get_adapter, vision_config
from ..checkpoint import load_config, load_image_processor, load_model, load_preprocessor, resolve_device
from ..errors import UnsupportedModelError
from ..recipe import EvaluationTask
from .harness import auto_class_for_task, check_task_fits, get_task, retained_fraction, run_task
from .report import write_report


def default_dtype(dtype: str | None, device: str) -> str:
    """bfloat16 on CUDA unless a dtype is given; on CPU the checkpoint's own dtype."""
    if dtype:
        return dtype
    return "bfloat16" if resolve_device(device).startswith("cuda") else "auto"


def load_for_task(
    name: str,
    task: str | None,
    *,
    device: str = "auto",
    device_map: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer or processor) for ``task``; the task is checked against the config first.

    ``trust_remote_code`` is always passed explicitly, so transformers never prompts to run a folder's code."""
    config = load_config(name, trust_remote_code=trust_remote_code)
    if task is not None:
        check_task_fits(task, config)
        auto_class = auto_class_for_task(task, config)
    else:
        auto_class = None  # the adapter's class (bench)
    model = load_model(
        name,
        dtype=default_dtype(dtype, device),
        device=device,
        device_map=device_map,
        auto_class=auto_class,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    if task is not None and get_task(task).model_kind == "image_classification":
        # The image processor's mean / std, or None: the pixel values are then the images in [0, 1].
        return model, load_image_processor(name, trust_remote_code=trust_remote_code)
    vision_language = vision_config(config) is not None
    return model, load_preprocessor(
        name, vision_language=vision_language, trust_remote_code=trust_remote_code
    )


def _describe(model: Any) -> dict[str, Any]:
    parameter = next(model.parameters())
    return {
        "parameters": count_parameters(model),
        "device": str(parameter.device),
        "dtype": str(parameter.dtype),
    }


def _release(model: Any) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_checkpoint(
    name: str,
    task: EvaluationTask,
    *,
    device: str = "auto",
    device_map: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    model, preprocessor = load_for_task(
        name,
        task.task,
        device=device,
        device_map=device_map,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    result = {"model": name, **_describe(model), **run_task(model, preprocessor, task, progress=progress)}
    _release(model)
    return result


def _expert_counts(model: Any) -> list[int] | None:
    try:
        adapter = get_adapter(model.config)
    except UnsupportedModelError:
        return None
    return adapter.experts_per_layer(model) if adapter.spec.is_moe else None


def compare_checkpoints(
    name: str,
    original: str,
    task: EvaluationTask,
    *,
    report_dir: Path,
    device: str = "auto",
    device_map: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    bench: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``name`` and ``original`` on ``task``, benchmark both, write report.md and plots."""
    placement = {
        "device": device,
        "device_map": device_map,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "allow_pickle": allow_pickle,
    }
    loaded = {
        label: load_for_task(path, task.task, **placement)
        for label, path in (("pruned", name), ("original", original))
    }
    # Both models are scored under one protocol (e.g. perplexity's context_len when one prunes its prompt).
    configs = [model.config for model, _ in loaded.values()]
    scores = {
        label: {**_describe(model), **run_task(model, pre, task, progress=progress, configs=configs)}
        for label, (model, pre) in loaded.items()
    }
    spec = get_task(task.task)
    retained = retained_fraction(task.task, scores["original"], scores["pruned"])
    entry = {
        "task": task.task,
        "metric": spec.metric,
        "data": task.data,
        "original": scores["original"],
        "pruned": scores["pruned"],
        "retained": retained,
    }
    run = {
        "label": Path(name).name,
        "params_before": scores["original"]["parameters"],
        "params_after": scores["pruned"]["parameters"],
        "evaluation": [entry],
    }
    latency, table, notes = None, None, []
    if spec.name == "corruption_robustness":
        from .image_robustness import plot_corruption_robustness

        labels = (Path(original).name + " (original)", Path(name).name + " (pruned)")
        plot = plot_corruption_robustness(
            list(zip(labels, (scores["original"], scores["pruned"]), strict=True)),
            Path(report_dir) / "corruption_robustness.png",
        )
        notes.append(f"![corruption robustness]({plot.name})")
    if bench and spec.model_kind in ("causal_lm", "vision_language"):
        from .bench import BenchSettings, benchmark_models, format_bench_table, prefill_latency_ms

        settings = BenchSettings(seq_lens=(64, 128, 256, 512), decode_tokens=16, repeats=3)
        bench_results = benchmark_models(
            {
                label: (model, pre, Path(path) if Path(path).is_dir() else None)
                for (label, (model, pre)), path in zip(loaded.items(), (name, original), strict=True)
            },
            settings,
            progress=progress,
        )
        latency, table = prefill_latency_ms(bench_results), format_bench_table(bench_results, "original")
    elif bench:
        image = spec.model_kind == "image_classification"
        kind = "an image classifier" if image else "a sequence-classification model"
        notes.append(f"No speed benchmark: it drives generation, and {kind} has none.")
    counts = {label: _expert_counts(model) for label, (model, _) in loaded.items()}
    expert_counts = {k: v for k, v in counts.items() if v is not None} or None
    report = write_report(
        report_dir,
        title=f"{Path(name).name} vs {Path(original).name}: {task.task}",
        runs=[run],
        latency_ms=latency,
        expert_counts=expert_counts,
        bench_table=table,
        notes=notes,
    )
    for model, _ in loaded.values():
        _release(model)
    return {
        "task": task.task,
        "metric": spec.metric,
        "model": name,
        "original_model": original,
        "pruned": scores["pruned"],
        "original": scores["original"],
        "retained": retained,
        "report": str(report),
    }


def bench_checkpoints(
    name: str,
    vs: str | None,
    *,
    seq_lens: tuple[int, ...],
    batch_size: int,
    decode_tokens: int,
    repeats: int,
    warmup: int,
    device: str = "auto",
    device_map: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> tuple[dict[str, Any], str]:
    """Benchmark ``name`` (and ``vs``) in one process, interleaved; the results and a printable table."""
    from .bench import BenchSettings, benchmark_models, format_bench_table

    paths = {"pruned": name, "original": vs} if vs else {Path(name).name: name}
    for path in paths.values():  # refuse before any weights load
        if get_adapter(load_config(path, trust_remote_code=trust_remote_code)).is_encoder:
            raise UnsupportedModelError(
                f"{path}: bench times prefill and generation, and an encoder classifier "
                "has no generation; evaluate it with 'hf-prune eval --task classification'"
            )
    models = {}
    for label, path in paths.items():
        model, pre = load_for_task(
            path,
            None,
            device=device,
            device_map=device_map,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
        )
        models[label] = (model, pre, Path(path) if Path(path).is_dir() else None)
    settings = BenchSettings(
        seq_lens=seq_lens, batch_size=batch_size, decode_tokens=decode_tokens, repeats=repeats, warmup=warmup
    )
    results = benchmark_models(models, settings, progress=progress)
    return results, format_bench_table(results, "original" if vs else None)
