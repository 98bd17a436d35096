"""Which weights a training-time sparsity method prunes: Linear and Conv weights picked by name patterns,
and, for the ``neurons`` pattern, the dense MLPs the architecture table knows."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from ...adapters import get_adapter
from ...errors import RecipeError, UnsupportedModelError
from ..base import config_field
from .masks import NeuronGroup

#: Modules whose ``weight`` can be pruned (GPT-2's ``Conv1D`` is a Linear stored transposed).
PRUNABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)

#: Module-name patterns skipped unless the recipe says otherwise: the output layers (a language model's
#: ``lm_head``, a classifier's head and BERT's pooler in front of it), as the lottery-ticket and GMP papers
#: leave them dense. The pooler too: all-MiniLM-L6-v2's was never trained, its weights are the smallest, and
#: global magnitude pruning at 80% removed all of them, leaving the classifier a constant input.
DEFAULT_EXCLUDE = ["lm_head", "score", "classifier", "classifier.*", "*pooler*"]


def scope_field() -> Any:
    return config_field("global", help="global (one magnitude threshold for all) | layer (per weight)")


def targets_field() -> Any:
    return config_field(
        help="globs over module names picking the Linear / Conv modules to prune",
        default_factory=lambda: ["*"],
    )


def exclude_field() -> Any:
    return config_field(
        help="globs of modules left dense (output heads by default)",
        default_factory=lambda: list(DEFAULT_EXCLUDE),
    )


def prunable_weights(model: nn.Module, targets: list[str], exclude: list[str]) -> dict[str, nn.Parameter]:
    """``{parameter name: weight}`` of every Linear / Conv module whose name matches a ``targets`` glob and
    no ``exclude`` glob (the output embedding is always left out: it is usually tied to the input one).
    Embeddings, norms and biases are never included. A ``targets`` pattern matching nothing is an error."""
    output_embedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_MODULES) and module is not output_embedding and name
    }
    for pattern in targets:
        if not any(fnmatchcase(name, pattern) for name in candidates):
            example = next(iter(candidates), "none")
            raise RecipeError(
                f"targets: {pattern!r} matches no Linear or Conv module of {type(model).__name__} "
                f"(globs over module names such as {example!r})"
            )
    chosen = {
        f"{name}.weight": module.weight
        for name, module in candidates.items()
        if any(fnmatchcase(name, p) for p in targets) and not any(fnmatchcase(name, p) for p in exclude)
    }
    if not chosen:
        raise RecipeError(f"exclude: {exclude} leaves none of the modules that targets {targets} matched")
    return chosen


def neuron_groups(model: nn.Module, targets: list[str], exclude: list[str]) -> list[NeuronGroup]:
    """The dense MLPs whose output projection ``targets`` picks, as ``NeuronGroup`` s of parameter names."""
    try:
        adapter = get_adapter(model.config)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"pattern neurons needs to know where the MLPs are: {error}") from None
    picked = prunable_weights(model, targets, exclude)
    modules = dict(model.named_modules())
    groups = []
    for inputs, output in adapter.mlp_neurons(model):
        if f"{output}.weight" not in picked:
            continue
        biases = [f"{name}.bias" if modules[name].bias is not None else None for name in inputs]
        groups.append(NeuronGroup([f"{name}.weight" for name in inputs], biases, f"{output}.weight"))
    if not groups:
        raise RecipeError(
            f"pattern: neurons found no dense MLP among the modules targets {targets} picks in "
            f"{type(model).__name__} (MLP output projections end in {adapter.spec.neuron_output!r})"
        )
    return groups
