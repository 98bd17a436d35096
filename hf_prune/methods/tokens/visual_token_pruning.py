"""Visual token pruning for LLaVA, LLaVA-NeXT and Qwen2-VL: the setting is saved into the checkpoint.

The stage changes no weight: it turns the model into an ``hf_prune_<family>`` model whose config holds the
``token_pruning`` settings, so the saved checkpoint reloads with ``AutoModelForImageTextToText`` and drops
visual tokens by itself in ``forward`` and ``generate``. The algorithms live in ``model_patches/``
(``token_selection.py``, ``visual_token_pruning.py``, ``qwen2_vl_token_pruning.py``), which travel with
the checkpoint as remote code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ...adapters import ModelAdapter
from ...context import PruneContext
from ...errors import ConfigFieldError, UnsupportedModelError
from ...model_patches import patch_classes, qwen2_vl_token_pruning, token_selection, visual_token_pruning
from ...registry import MethodConfig, StageReport, config_field, register_method
from ..class_swap import swap_config_and_class


@dataclass
class VisualTokenPruningConfig(MethodConfig):
    """Visual token pruning (CDPruner, FastV, random, pooling, diversity) saved into a LLaVA-style checkpoint."""

    algorithm: Literal["cdpruner", "diversity", "random", "pooling", "fastv"] = config_field(
        "cdpruner", help="cdpruner (instruction-conditioned DPP), diversity (DPP, no instruction), random, "
                         "pooling (spatial average), fastv (attention received at fastv_layer)")
    budget: int | None = config_field(
        None, help="visual tokens kept per image (LLaVA) or per crop (LLaVA-NeXT); give this or keep_ratio")
    keep_ratio: float | None = config_field(None, help="fraction of each image's visual tokens kept, in (0, 1]")
    relevance_sign: Literal["positive", "negative"] = config_field(
        "positive", help="cdpruner: instruction relevance as the paper (positive) or negated (the official code)")
    seed: int = config_field(0, help="random: seed of the choice")
    fastv_layer: int = config_field(2, help="fastv: the decoder layer whose attention scores the tokens")

    def __post_init__(self) -> None:
        try:
            token_selection.check_settings(self.settings())
        except ValueError as error:
            message = str(error)
            key = message.split(":")[0].removeprefix("token_pruning.").removeprefix("token_pruning")
            raise ConfigFieldError(key if key in token_selection.DEFAULTS else "budget",
                                   message.split(": ", 1)[-1]) from None

    def settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in token_selection.DEFAULTS}

    @staticmethod
    def unsupported_reason(adapter: ModelAdapter) -> str | None:
        if not adapter.is_vision_language:
            return (f"visual token pruning needs a vision-language model; {adapter.model_type} has no vision tower "
                    f"(supported: {', '.join(FAMILY_CLASSES)})")
        family = adapter.model_type.removeprefix(patch_classes.PREFIX)
        if family not in FAMILY_CLASSES:
            return f"visual token pruning supports {', '.join(FAMILY_CLASSES)}, not {adapter.model_type}"
        return None

    def check_model(self, model_config: Any, adapter: ModelAdapter) -> None:
        reason = self.unsupported_reason(adapter)
        if reason:
            raise UnsupportedModelError(reason)
        layers = adapter.num_layers(model_config)
        if self.algorithm == "fastv" and self.fastv_layer >= layers:
            raise ConfigFieldError("fastv_layer", f"must be below the language model's {layers} layers, "
                                                  f"got {self.fastv_layer}")


#: family -> (config class, model class) of its hf_prune_<family> token-pruning model.
FAMILY_CLASSES = {**visual_token_pruning.CLASSES, **qwen2_vl_token_pruning.CLASSES}


def token_pruning_classes(model_type: str) -> tuple[type, type]:
    """(config class, model class) for a stock or ``hf_prune_`` model type of a supported family."""
    family = model_type.removeprefix(patch_classes.PREFIX)
    if family not in FAMILY_CLASSES:
        raise UnsupportedModelError(f"visual token pruning does not support model_type {model_type!r} "
                                    f"(supported: {', '.join(FAMILY_CLASSES)})")
    return FAMILY_CLASSES[family]


def visual_tokens_per_crop(model_config: Any) -> int | None:
    """Visual tokens of one crop (one image for LLaVA), from the vision tower's grid; None when the count
    depends on the image (Qwen2-VL's native resolution)."""
    vision = model_config.vision_config
    if not hasattr(vision, "image_size"):
        return None
    tokens = (vision.image_size // vision.patch_size) ** 2
    return tokens + (1 if getattr(model_config, "vision_feature_select_strategy", "default") == "full" else 0)


def apply_visual_token_pruning(model: Any, config: VisualTokenPruningConfig, context: PruneContext) -> StageReport:
    adapter = context.adapter
    config.check_model(model.config, adapter)
    settings = token_selection.check_settings(config.settings())
    config_class, model_class = token_pruning_classes(model.config.model_type)
    swap_config_and_class(model, config_class, model_class, {"token_pruning": settings})
    details: dict[str, Any] = {"token_pruning": settings}
    per_crop = visual_tokens_per_crop(model.config)
    if per_crop is None:
        return StageReport("visual_token_pruning", details)
    kept = token_selection.kept_count(settings, per_crop)
    details.update({"visual_tokens_per_crop": per_crop, "kept_per_crop": kept, "kept_fraction": round(kept / per_crop, 4)})
    if kept == per_crop:
        details["note"] = (f"the budget keeps all {per_crop} visual tokens of a crop: nothing is pruned "
                           "(the checkpoint still records the setting)")
    return StageReport("visual_token_pruning", details)


register_method("visual_token_pruning", VisualTokenPruningConfig, apply_visual_token_pruning)
