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

from ...adapters import ModelAdapter, get_adapter, vision_config
from ...context import PruneContext
from ...engine.plan import SequentialPlan
from ...errors import ConfigFieldError, UnsupportedModelError
from ...model_patches import (
    clip_relevance,
    patch_classes,
    qwen2_vl_token_pruning,
    token_selection,
    visual_token_pruning,
)
from ...registry import register_method
from ..base import OneShotMethod, config_field
from ..class_swap import swap_config_and_class


@dataclass
class VisualTokenPruningConfig(OneShotMethod):
    """Visual token pruning (CDPruner, FastV, random, pooling, diversity) saved into a LLaVA-style checkpoint."""

    algorithm: Literal["cdpruner", "diversity", "random", "pooling", "fastv"] = config_field(
        "cdpruner",
        help="cdpruner (instruction-conditioned DPP), diversity (DPP, no instruction), random, "
        "pooling (spatial average), fastv (attention received at fastv_layer)",
    )
    budget: int | None = config_field(
        None, help="visual tokens kept per image (LLaVA) or per crop (LLaVA-NeXT); give this or keep_ratio"
    )
    keep_ratio: float | None = config_field(
        None, help="fraction of each image's visual tokens kept, in (0, 1]"
    )
    relevance_sign: Literal["positive", "negative"] = config_field(
        "positive",
        help="cdpruner: instruction relevance as the paper (positive) or negated (the official code)",
    )
    seed: int = config_field(0, help="random: seed of the choice")
    fastv_layer: int = config_field(2, help="fastv: the decoder layer whose attention scores the tokens")
    text_tower: str | None = config_field(
        None,
        help="cdpruner: a CLIP checkpoint (folder or Hub id of a CLIPModel) whose text tower scores the "
        "instruction relevance in CLIP space, as in the paper; stored in the pruned checkpoint. Its "
        "vision width must match the model's CLIP vision tower (LLaVA, LLaVA-NeXT). Default: the "
        "language model's own embeddings of the instruction",
    )

    def __post_init__(self) -> None:
        try:
            token_selection.check_settings(self.settings())
        except ValueError as error:
            message = str(error)
            key = message.split(":")[0].removeprefix("token_pruning.").removeprefix("token_pruning")
            raise ConfigFieldError(
                key if key in token_selection.DEFAULTS else "budget", message.split(": ", 1)[-1]
            ) from None
        if self.text_tower is not None and self.algorithm != "cdpruner":
            raise ConfigFieldError(
                "text_tower", f"only cdpruner scores instruction relevance, not {self.algorithm}"
            )

    def settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in token_selection.DEFAULTS}

    @classmethod
    def unsupported_reason(cls, adapter: ModelAdapter) -> str | None:
        if not adapter.is_vision_language:
            return (
                f"visual token pruning needs a vision-language model; {adapter.model_type} has no vision tower "
                f"(supported: {', '.join(FAMILY_CLASSES)})"
            )
        family = adapter.model_type.removeprefix(patch_classes.PREFIX)
        if family not in FAMILY_CLASSES:
            return f"visual token pruning supports {', '.join(FAMILY_CLASSES)}, not {adapter.model_type}"
        return None

    def check_model(self, model_config: Any, adapter: ModelAdapter) -> None:
        super().check_model(model_config, adapter)
        family = model_config.model_type.removeprefix(patch_classes.PREFIX)
        if self.text_tower is not None and family not in visual_token_pruning.CLASSES:
            raise ConfigFieldError(
                "text_tower",
                f"{model_config.model_type} has no CLIP vision tower; a CLIP text "
                f"tower works with {', '.join(visual_token_pruning.CLASSES)}",
            )
        layers = adapter.num_layers(model_config)
        if self.algorithm == "fastv" and self.fastv_layer >= layers:
            raise ConfigFieldError(
                "fastv_layer", f"must be below the language model's {layers} layers, got {self.fastv_layer}"
            )

    def apply(self, model: Any, context: PruneContext) -> dict[str, Any]:
        return apply_visual_token_pruning(model, self, context)

    #: nothing is calibrated: every process makes the same change
    supports_data_parallel = True

    def supports_sequential(self, adapter: ModelAdapter) -> bool:
        return self.text_tower is None  # a CLIP text tower adds weights the writer does not hold

    def apply_sequential(self, runner: Any, store: Any, context: PruneContext) -> SequentialPlan:
        """No calibration (every algorithm selects tokens at inference): the writer copies the weights as
        they are, under the token-pruning class and config."""
        plan = SequentialPlan(report={})

        def structural_edit(model: Any) -> None:
            plan.report.update(apply_visual_token_pruning(model, self, context))

        plan.structural_edit = structural_edit
        return plan


#: family -> (config class, model class) of its hf_prune_<family> token-pruning model.
FAMILY_CLASSES = {**visual_token_pruning.CLASSES, **qwen2_vl_token_pruning.CLASSES}


def token_pruning_classes(model_type: str) -> tuple[type, type]:
    """(config class, model class) for a stock or ``hf_prune_`` model type of a supported family."""
    family = model_type.removeprefix(patch_classes.PREFIX)
    if family not in FAMILY_CLASSES:
        raise UnsupportedModelError(
            f"visual token pruning does not support model_type {model_type!r} "
            f"(supported: {', '.join(FAMILY_CLASSES)})"
        )
    return FAMILY_CLASSES[family]


def visual_tokens_per_crop(model_config: Any) -> int | None:
    """Visual tokens of one crop (one image for LLaVA), from the vision tower's grid; None when the count
    depends on the image (Qwen2-VL's native resolution)."""
    vision = vision_config(model_config)
    if not hasattr(vision, "image_size"):
        return None
    tokens = (vision.image_size // vision.patch_size) ** 2
    return tokens + (1 if getattr(model_config, "vision_feature_select_strategy", "default") == "full" else 0)


def apply_visual_token_pruning(
    model: Any, config: VisualTokenPruningConfig, context: PruneContext
) -> dict[str, Any]:
    settings = token_selection.check_settings(config.settings())
    config_class, model_class = token_pruning_classes(model.config.model_type)
    swap_config_and_class(model, config_class, model_class, {"token_pruning": settings})
    details: dict[str, Any] = {"token_pruning": settings}
    if config.text_tower is not None:
        details.update(attach_clip_text_tower(model, config.text_tower, context.tokenizer))
    if settings["algorithm"] == "cdpruner":
        details.setdefault(
            "relevance", "clip_text_tower" if model.has_clip_text_tower() else "language_model_embeddings"
        )
    per_crop = visual_tokens_per_crop(model.config)
    if per_crop is None:
        return details
    kept = token_selection.kept_count(settings, per_crop)
    details.update(
        {
            "visual_tokens_per_crop": per_crop,
            "kept_per_crop": kept,
            "kept_fraction": round(kept / per_crop, 4),
        }
    )
    if kept == per_crop:
        details["note"] = (
            f"the budget keeps all {per_crop} visual tokens of a crop: nothing is pruned "
            "(the checkpoint still records the setting)"
        )
    return details


def attach_clip_text_tower(model: Any, source: str, language_tokenizer: Any) -> dict[str, Any]:
    """Copy the text tower, text projection and visual projection of the CLIP model at ``source`` into
    ``model`` (an ``hf_prune_llava*`` model) with the tokenizers that carry the instruction over to it."""
    import torch
    from transformers import AutoTokenizer, CLIPModel

    try:
        clip = CLIPModel.from_pretrained(source, dtype=torch.float32, trust_remote_code=False)
        clip_tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigFieldError(
            "text_tower",
            f"cannot load a CLIP model and its tokenizer from {source!r}: {str(error).splitlines()[0]}",
        ) from None
    vision, clip_vision = vision_config(model.config), vision_config(clip.config)
    if clip_vision.hidden_size != vision.hidden_size:
        raise ConfigFieldError(
            "text_tower",
            f"its vision width {clip_vision.hidden_size} does not "
            f"match the model's vision tower ({vision.hidden_size})",
        )
    if not isinstance(model.config.vision_feature_layer, int):
        raise ConfigFieldError(
            "text_tower",
            "needs a single vision_feature_layer (the model concatenates "
            f"layers {model.config.vision_feature_layer})",
        )
    if language_tokenizer is None:
        raise ConfigFieldError("text_tower", "needs the model's tokenizer, to turn the instruction into text")
    tower = get_adapter(model.config).vision_tower(model)
    try:
        clip_relevance.post_layernorm(tower)
    except ValueError as error:
        raise ConfigFieldError("text_tower", str(error)) from None
    model.add_relevance_text_tower(
        {**clip.config.text_config.to_dict(), "projection_dim": clip.config.projection_dim}
    )
    model.relevance_text_tower.text_model.load_state_dict(clip.text_model.state_dict())
    model.relevance_text_tower.text_projection.load_state_dict(clip.text_projection.state_dict())
    model.relevance_visual_projection.load_state_dict(clip.visual_projection.state_dict())
    model.relevance_text_tower.to(tower.dtype)
    model.relevance_visual_projection.to(tower.dtype)
    model.set_relevance_tokenizers(language_tokenizer, clip_tokenizer)
    ours = getattr(
        tower, "vision_model", tower
    ).embeddings.patch_embedding.weight  # v5 CLIPVisionModel is flat
    theirs = clip.vision_model.embeddings.patch_embedding.weight
    same_tower = ours.shape == theirs.shape and torch.equal(ours.detach().float().cpu(), theirs.detach())
    details: dict[str, Any] = {
        "relevance": "clip_text_tower",
        "text_tower": str(source),
        "text_tower_parameters": sum(p.numel() for p in model.relevance_text_tower.parameters())
        + model.relevance_visual_projection.weight.numel(),
        "text_tower_matches_vision_tower": same_tower,
    }
    if not same_tower:
        details["text_tower_note"] = (
            "the CLIP model's vision weights differ from the model's vision tower: the "
            "relevance compares tokens and text across two embedding spaces"
        )
    return details


register_method("visual_token_pruning", VisualTokenPruningConfig)
