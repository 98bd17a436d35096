"""The recipe's ``evaluate:`` section on the sequential engine.

Neither model need fit in memory: the original checkpoint (before the stages) and the pruned one (in the
output's temporary folder, before it is renamed into place) are each loaded with accelerate's big-model
inference, ``device_map="auto"`` under the engine's memory budget, the rest offloaded to disk and read back
module by module during the forward. The tasks are the in-memory path's (``harness.run_task``), resolved
against both configs so both models are scored under one protocol; the figures go into ``hf_prune.json``,
``report.md`` and the model card as the in-memory path writes them. No prefill latency sweep: latency of an
offloaded model measures the disk. The pipeline builds an :class:`OffloadedEvaluation` and the engine calls it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_model, resolve_device
from ..engine.layers import release_freed_memory
from ..model_card import public_value
from .harness import evaluation_entry, run_task
from .report import write_report


def offloaded_memory(device: str, budget: int) -> dict[Any, int]:
    """``max_memory`` for accelerate: ``budget`` bytes of CPU memory, and every GPU's free memory when
    ``device`` resolves to CUDA."""
    memory: dict[Any, int] = {"cpu": max(budget, 1)}
    if resolve_device(device).startswith("cuda"):
        for index in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(index)
            memory[index] = int(free * 0.9)
    return memory


class OffloadedEvaluation:
    """Scores the original and the pruned checkpoint of a sequential run (see the module docstring)."""

    def __init__(self, recipe: Any, configs: list[Any], progress: bool):
        self.recipe, self.configs, self.progress = recipe, configs, progress
        self.before: list[dict[str, Any]] = []

    def score(self, folder: str | Path, preprocessor: Any, budget: int, offload_folder: Path) -> list[dict]:
        """Every task on the checkpoint in ``folder``, loaded offloaded."""
        recipe = self.recipe
        model = load_model(
            str(folder),
            dtype=recipe.dtype,
            device_map="auto",
            max_memory=offloaded_memory(recipe.device, budget),
            offload_folder=offload_folder,
            trust_remote_code=recipe.trust_remote_code,
        )
        try:
            return [
                run_task(model, preprocessor, task, progress=self.progress, configs=self.configs)
                for task in recipe.evaluate
            ]
        finally:
            del model
            shutil.rmtree(offload_folder, ignore_errors=True)
            release_freed_memory()

    def original(self, folder: Path, preprocessor: Any, budget: int, offload_folder: Path) -> None:
        self.before = self.score(folder, preprocessor, budget, offload_folder)

    def pruned(
        self, folder: Path, preprocessor: Any, budget: int, offload_folder: Path, report: dict[str, Any]
    ) -> None:
        """Score the pruned checkpoint in ``folder``; the before / after figures into ``report``
        (hf_prune.json, the model card) and ``report.md`` there."""
        after = self.score(folder, preprocessor, budget, offload_folder)
        recipe = self.recipe
        report["evaluation"] = [
            evaluation_entry(task, before, pruned)
            for task, before, pruned in zip(recipe.evaluate, self.before, after, strict=True)
        ]
        run = {
            "label": "+".join(s.method for s in recipe.stages),
            "params_before": report["params_before"],
            "params_after": report["params_after"],
            "evaluation": report["evaluation"],
        }
        write_report(
            folder,
            title=f"Pruning report: {public_value(recipe.model, 'model') or 'model'}",
            runs=[run],
            latency_ms={},
            notes=["Evaluated on the sequential engine: both models loaded with accelerate's disk offload."],
        )
