"""hf-prune: config-driven pruning of Hugging Face Transformers models.

import hf_prune
recipe = hf_prune.load_recipe("recipe.yaml")
result = hf_prune.prune(recipe)             # loads recipe.model, saves to recipe.output
result = hf_prune.prune(model, {"stages": [...], "calibration": {...}})  # a model in memory
"""

from typing import Any

__version__ = "0.1.0"

from .errors import HfPruneError, RecipeError, UnsupportedModelError  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402
from .registry import (  # noqa: E402
    MethodConfig,
    OneShotMethod,
    StageReport,
    TrainingMethod,
    register_method,
    registered_methods,
)

__all__ = [
    "HfPruneError",
    "MethodConfig",
    "OneShotMethod",
    "PruneResult",
    "PruningCallback",
    "Recipe",
    "RecipeError",
    "StageReport",
    "TrainingMethod",
    "UnsupportedModelError",
    "load_recipe",
    "prune",
    "register_method",
    "registered_methods",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # The pipeline pulls in torch and transformers; load it on first use to keep `import hf_prune` light.
    if name in ("prune", "PruneResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "PruningCallback":  # the Trainer glue (layer 3), loaded on first use like the pipeline
        from .integrations.pruning_callback import PruningCallback

        return PruningCallback
    raise AttributeError(f"module 'hf_prune' has no attribute {name!r}")


# Registers the hf_prune_<family> classes with the Auto classes (DESIGN.md §5): per-layer expert counts and
# visual token pruning.
from .model_patches import card_deck as _card_deck  # noqa: F401,E402
from .model_patches import nonuniform_moe as _nonuniform_moe  # noqa: F401,E402
from .model_patches import prompt_token_pruning as _prompt_token_pruning  # noqa: F401,E402
from .model_patches import qwen2_vl_token_pruning as _qwen2_vl_token_pruning  # noqa: F401,E402
from .model_patches import text_token_pruning as _text_token_pruning  # noqa: F401,E402
from .model_patches import visual_token_pruning as _visual_token_pruning  # noqa: F401,E402
