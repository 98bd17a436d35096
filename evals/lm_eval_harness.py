"""``hf-prune eval MODEL --harness lm-eval --tasks T1,T2``: lm-evaluation-harness tasks on hf-prune checkpoints.

Each model runs through lm-eval's ``simple_evaluate`` as the ``hf-prune`` model of its registry (the one
``lm_eval --model hf-prune`` uses, ``hf_prune.integrations.lm_eval_model``), so a prompt-pruned checkpoint
is scored with its context pruned at prefill and any other exactly as ``--model hf`` scores it.

Results come out in the shape of hf-prune's own tasks: per task ``{"task", "metric", <metric>: value, ...}``
with lm-eval's figures under their metric names (``acc``, ``acc_stderr``, ``word_perplexity``; a filter
other than ``none`` stays in the name, ``exact_match,strict-match``), the headline being the task's first
metric. ``--compare ORIGINAL`` adds the retained fraction per task, benchmarks both models and writes the same
``report.md`` with plots as ``hf-prune eval --compare`` (``report.py``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..checkpoint import resolve_device
from ..errors import HfPruneError
from .metrics import load_metric
from .report import write_report
from .run_checkpoints import _describe, _release, default_dtype

#: lm-eval's name of the model (``integrations/lm_eval_hook.py`` registers it).
LM_EVAL_MODEL = "hf-prune"
#: Model-card task type by lm-eval output type.
CARD_TASK_TYPES = {
    "multiple_choice": "multiple-choice",
    "loglikelihood": "text-generation",
    "loglikelihood_rolling": "text-generation",
    "generate_until": "text-generation",
}
INSTALL_HINT = "pip install 'hf-prune[lm-eval]'"


def lm_eval_task_manager(tasks: list[str], include_path: str | None) -> Any:
    """An lm-eval ``TaskManager`` that knows every task in ``tasks`` (else a one-line ``HfPruneError``)."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise HfPruneError(f"--harness lm-eval needs lm-evaluation-harness ({exc}); {INSTALL_HINT}") from exc
    if not tasks:
        raise HfPruneError("--harness lm-eval needs --tasks, e.g. --tasks hellaswag,arc_easy")
    if include_path is not None and not Path(include_path).is_dir():
        raise HfPruneError(
            f"--include-path {include_path}: no such folder (a folder of lm-eval task YAML files)"
        )
    manager = None
    if include_path is not None:
        # Indexing lm-eval's own ~15,000 task files takes seconds: skip it when DIR defines every task asked.
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in set(manager.all_tasks)]
    if unknown:
        where = (
            f"in lm-eval or {include_path}"
            if include_path
            else "in lm-eval (add --include-path DIR for yours)"
        )
        raise HfPruneError(
            f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}: none is defined {where}"
        )
    return manager


def load_lm(
    name: str,
    *,
    device: str = "auto",
    dtype: str | None = None,
    batch_size: int = 1,
    trust_remote_code: bool = False,
) -> Any:
    """The ``hf-prune`` lm-eval model for checkpoint ``name``, through lm-eval's registry."""
    import lm_eval.models  # noqa: F401  (fills the registry; an installed hf-prune adds its model there)
    from lm_eval.api.registry import get_model, model_registry

    from ..integrations.lm_eval_hook import register

    register(model_registry)  # a source checkout run without the installed .pth hook
    if not Path(name).exists() and name.count("/") != 1:
        raise FileNotFoundError(f"{name}: no such model folder (or hub id)")
    resolved = resolve_device(device)
    return get_model(LM_EVAL_MODEL)(
        pretrained=name,
        device=resolved,
        dtype=default_dtype(dtype, resolved),
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
    )


def task_figures(results: dict[str, Any], task: str) -> dict[str, Any]:
    """One task's figures from ``simple_evaluate``'s results, in the shape of hf-prune's tasks."""
    raw = results["results"][task]
    figures: dict[str, Any] = {}
    for key, value in raw.items():
        if "," not in key or value == "N/A":
            continue
        metric, _, filter_name = key.partition(",")
        figures[metric if filter_name == "none" else key] = value
    order = list(results.get("higher_is_better", {}).get(task, {})) or [
        k for k in figures if not k.endswith("_stderr")
    ]
    metric = next((m for m in order if m in figures), None)
    if metric is None:
        raise HfPruneError(f"lm-eval task {task!r} reported no metric")
    config = results.get("configs", {}).get(task, {})
    return {
        "task": task,
        "metric": metric,
        "higher_is_better": bool(results.get("higher_is_better", {}).get(task, {}).get(metric, True)),
        "output_type": config.get("output_type"),
        **figures,
        "num_samples": results.get("n-samples", {}).get(task, {}).get("effective"),
    }


def run_lm_eval(lm: Any, tasks: list[str], manager: Any, *, limit: int | None = None) -> list[dict[str, Any]]:
    """``simple_evaluate`` of ``lm`` on ``tasks``: the figures of each task, in order."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    return [task_figures(results, task) for task in tasks]


def retained(figures_original: dict[str, Any], figures_pruned: dict[str, Any]) -> float | None:
    """The share of the original's headline figure the pruned model keeps (None without a baseline)."""
    metric, higher = figures_original["metric"], figures_original["higher_is_better"]
    original, pruned = figures_original[metric], figures_pruned[metric]
    if (higher and original == 0) or not all(map(math.isfinite, (original, pruned))):
        return None
    result = load_metric("retained_performance").compute(
        pruned=[pruned], original=[original], higher_is_better=higher
    )
    return float(result["retained"])


def evaluate_with_lm_eval(
    name: str,
    tasks: list[str],
    *,
    include_path: str | None = None,
    limit: int | None = None,
    placement: dict[str, Any],
) -> dict[str, Any]:
    """Evaluate one checkpoint on lm-eval ``tasks``: {"model", parameters..., "harness", "results": [...]}."""
    manager = lm_eval_task_manager(tasks, include_path)
    lm = load_lm(name, **placement)
    result = {"model": name, "harness": "lm-eval", **_describe(lm.model)}
    result["results"] = run_lm_eval(lm, tasks, manager, limit=limit)
    _release(lm)
    return result


def compare_with_lm_eval(
    name: str,
    original: str,
    tasks: list[str],
    *,
    report_dir: Path,
    include_path: str | None = None,
    limit: int | None = None,
    placement: dict[str, Any],
    bench: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``name`` and ``original`` on lm-eval ``tasks``, benchmark both, write report.md and plots."""
    manager = lm_eval_task_manager(tasks, include_path)
    lms = {"pruned": load_lm(name, **placement), "original": load_lm(original, **placement)}
    scores = {label: run_lm_eval(lm, tasks, manager, limit=limit) for label, lm in lms.items()}
    described = {label: _describe(lm.model) for label, lm in lms.items()}
    entries = []
    for pruned, base in zip(scores["pruned"], scores["original"], strict=True):
        entries.append(
            {
                "task": pruned["task"],
                "metric": pruned["metric"],
                "task_type": CARD_TASK_TYPES.get(pruned["output_type"], "text-generation"),
                "data": f"lm-eval:{pruned['task']}",
                "original": {**described["original"], **base},
                "pruned": {**described["pruned"], **pruned},
                "retained": retained(base, pruned),
            }
        )
    run = {
        "label": Path(name).name,
        "params_before": described["original"]["parameters"],
        "params_after": described["pruned"]["parameters"],
        "evaluation": entries,
    }
    latency, table = None, None
    if bench:
        from .bench import BenchSettings, benchmark_models, format_bench_table, prefill_latency_ms

        settings = BenchSettings(seq_lens=(64, 128, 256, 512), decode_tokens=16, repeats=3)
        models = {
            label: (lm.model, lm.tokenizer, Path(path) if Path(path).is_dir() else None)
            for (label, lm), path in zip(lms.items(), (name, original), strict=True)
        }
        results = benchmark_models(models, settings, progress=progress)
        latency, table = prefill_latency_ms(results), format_bench_table(results, "original")
    report = write_report(
        report_dir,
        title=f"{Path(name).name} vs {Path(original).name}: lm-eval {', '.join(tasks)}",
        runs=[run],
        latency_ms=latency,
        bench_table=table,
        notes=[f"Scored with lm-evaluation-harness (`--model {LM_EVAL_MODEL}`)."],
    )
    for lm in lms.values():
        _release(lm)
    return {
        "harness": "lm-eval",
        "model": name,
        "original_model": original,
        "evaluation": entries,
        "report": str(report),
    }
