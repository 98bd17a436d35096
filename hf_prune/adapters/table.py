"""The architecture table: where things live in each ``model_type``, and nothing else.

Adding an architecture is one entry here (the language model's layout in ``TEXT_ARCHITECTURES``, a
vision-language wrapper's parts in ``VISION_LANGUAGE_ARCHITECTURES``). The ``hf_prune_<family>`` types of
the checkpoints that ``model_patches/`` writes are not listed by hand: each model_patches module's
``FAMILIES`` table names the stock families it patches, and the patched type gets its stock family's entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model_patches import (
    nonuniform_moe,
    prompt_token_pruning,
    qwen2_vl_token_pruning,
    text_token_pruning,
    visual_token_pruning,
)


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where things live in one decoder family (paths relative to the decoder layer / its MLP)."""

    layers_attr: str = "layers"  # the decoder's ModuleList of layers
    mlp_attr: str = "mlp"
    down_proj_attr: str = "down_proj"
    experts_attr: str | None = None  # fused experts module inside the MLP (MoE layers only)
    router_attr: str | None = None
    shared_expert_attr: str | None = None
    shared_expert_gate_attr: str | None = None
    num_experts_key: str | None = None
    #: Why the MLP output does not enter the residual stream directly (None when it does).
    mlp_not_on_residual: str | None = None
    #: Why only visual token pruning applies to this language model (None when every method may).
    token_pruning_only: str | None = None
    #: An encoder classifier (BERT family) rather than a decoder-only language model.
    is_encoder: bool = False
    #: An image classifier (ViT, ResNet, ...; ``IMAGE_CLASSIFIER``): training-time sparsity and image
    #: tasks only, no one-shot method.
    is_image_classifier: bool = False
    #: q/k/v projections carry a bias whatever ``attention_bias`` says (Qwen2 family).
    qkv_bias: bool = False
    #: RMS norms on queries and keys: "per_head" (weights of head_dim: Qwen3, Gemma3) or "full" (over all
    #: heads: OLMoE, OLMo2); None when there are none.
    qk_norm: str | None = None
    #: A dense MLP's neurons (structured sparsity), as module-name suffixes under one layer: the input
    #: projections (the first one's row silences a neuron: the gate in a gated MLP) and the output one.
    neuron_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    neuron_output: str = "mlp.down_proj"

    @property
    def is_moe(self) -> bool:
        return self.experts_attr is not None


@dataclass(frozen=True)
class VisionLanguageSpec:
    """Where the parts of a vision-language wrapper live: dotted paths below its inner model
    (``model.model``), and the config key of the image placeholder token."""

    vision_tower: str = "vision_tower"
    projector: str = "multi_modal_projector"
    language_model: str = "language_model"
    image_token_key: str = "image_token_id"


_DENSE = ArchitectureSpec()
_POST_FFN_NORM = (
    "a post-feed-forward norm sits between the MLP output and the residual add, "
    "so a linear map cannot be folded into the MLP output projection exactly"
)
_MOE = dict(experts_attr="experts", router_attr="gate")
# Qwen2-VL's language model: visual token pruning only, since calibration forwards through a bare decoder
# would need its 3-D rotary positions.
_MROPE = ArchitectureSpec(
    qkv_bias=True,
    token_pruning_only=(
        "its language model takes 3-D rotary positions from the image grid, which calibration forwards "
        "do not build; only visual token pruning supports it"
    ),
)
#: Encoder classifiers (BERT family): text token pruning only (the other methods assume a decoder).
_ENCODER_ONLY = "an encoder classifier: only text token pruning supports it"
_ENCODER = ArchitectureSpec(
    token_pruning_only=_ENCODER_ONLY,
    is_encoder=True,
    neuron_inputs=("intermediate.dense",),
    neuron_output="output.dense",
)
_DISTILBERT = ArchitectureSpec(
    token_pruning_only=_ENCODER_ONLY, is_encoder=True, neuron_inputs=("ffn.lin1",), neuron_output="ffn.lin2"
)

#: Language models (decoder-only, and the encoder classifiers), keyed by ``config.model_type``.
TEXT_ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": ArchitectureSpec(qkv_bias=True),
    "qwen3": ArchitectureSpec(qk_norm="per_head"),
    "mixtral": ArchitectureSpec(**_MOE, num_experts_key="num_local_experts"),
    "qwen2_moe": ArchitectureSpec(
        **_MOE,
        num_experts_key="num_experts",
        qkv_bias=True,
        shared_expert_attr="shared_expert",
        shared_expert_gate_attr="shared_expert_gate",
    ),
    "qwen3_moe": ArchitectureSpec(**_MOE, num_experts_key="num_experts", qk_norm="per_head"),
    "olmoe": ArchitectureSpec(**_MOE, num_experts_key="num_experts", qk_norm="full"),
    "gemma2": ArchitectureSpec(mlp_not_on_residual=_POST_FFN_NORM),
    "gemma3_text": ArchitectureSpec(mlp_not_on_residual=_POST_FFN_NORM, qk_norm="per_head"),
    "olmo2": ArchitectureSpec(mlp_not_on_residual=_POST_FFN_NORM, qk_norm="full"),
    "qwen2_vl_text": _MROPE,
    "qwen2_5_vl_text": _MROPE,
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "distilbert": _DISTILBERT,
}

#: Image classifiers: every model type with an ``AutoModelForImageClassification`` class
#: (``image_classifier_types``). Training-time sparsity (gmp, granet, lottery, cards) targets their Conv /
#: Linear weights by name; no one-shot method knows their layout.
IMAGE_CLASSIFIER = ArchitectureSpec(
    is_image_classifier=True,
    token_pruning_only="an image classifier: only training-time sparsity (gmp, granet, lottery, cards) supports it",
)


def image_classifier_types() -> set[str]:
    """The model types transformers has an image-classification head for, and hf-prune's CARD-Deck."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    from ..model_patches.card_deck import CardDeckConfig

    return set(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES) | {CardDeckConfig.model_type}


_LLAVA = VisionLanguageSpec()
_QWEN_VL = VisionLanguageSpec(vision_tower="visual", projector="visual.merger")

#: Vision-language wrappers: the language model inside is looked up in TEXT_ARCHITECTURES by its own type.
VISION_LANGUAGE_ARCHITECTURES: dict[str, VisionLanguageSpec] = {
    "llava": _LLAVA,
    "llava_next": _LLAVA,
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
}

# ---- the hf_prune_<family> types, derived from model_patches ------------------------------------------

#: Prefix of the model types that model_patches/ registers (DESIGN.md §5).
PATCHED_PREFIX = "hf_prune_"

#: The model_patches modules whose checkpoints get their own ``hf_prune_<family>`` model type; each has a
#: ``FAMILIES`` table keyed by stock family (model_type).
PATCH_MODULES = (
    nonuniform_moe,  # different expert counts per layer
    prompt_token_pruning,  # prompt-pruned causal LMs
    text_token_pruning,  # token-pruned encoder classifiers
    visual_token_pruning,  # LLaVA / LLaVA-NeXT visual token pruning
    qwen2_vl_token_pruning,  # Qwen2-VL / Qwen2.5-VL visual token pruning
)


def patched_families() -> dict[str, str]:
    """``hf_prune_<family>`` → its stock family, for every family of every model_patches table."""
    return {PATCHED_PREFIX + family: family for module in PATCH_MODULES for family in module.FAMILIES}


def _add_patched_types() -> None:
    """A patched type keeps its stock family's layout, so it gets the stock family's entry."""
    for patched, family in patched_families().items():
        for table in (TEXT_ARCHITECTURES, VISION_LANGUAGE_ARCHITECTURES):
            if family in table:
                table[patched] = table[family]
                break
        else:
            raise RuntimeError(
                f"model_patches patches {family!r}, which has no entry in the architecture table "
                "(hf_prune/adapters/table.py): add one"
            )


_add_patched_types()

#: Every encoder classifier type, stock and patched.
ENCODER_ARCHITECTURES = tuple(name for name, spec in TEXT_ARCHITECTURES.items() if spec.is_encoder)


def supported_model_types() -> list[str]:
    return sorted([*TEXT_ARCHITECTURES, *VISION_LANGUAGE_ARCHITECTURES])
