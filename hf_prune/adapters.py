"""Architecture knowledge, in one table keyed by ``model_type``.

Methods never hard-code where things live: they ask the adapter for the decoder layers, the MLP output
projections (dense, every expert, the shared expert), the router, the expert-count key and whether the
MLP output goes straight into the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where things live in one decoder family (paths relative to the decoder layer / its MLP)."""

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

    @property
    def is_moe(self) -> bool:
        return self.experts_attr is not None


_DENSE = ArchitectureSpec()
_POST_FFN_NORM = (
    "a post-feed-forward norm sits between the MLP output and the residual add, "
    "so a linear map cannot be folded into the MLP output projection exactly"
)
_MOE = dict(experts_attr="experts", router_attr="gate")

#: Decoder-only language models, keyed by ``config.model_type``.
TEXT_ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "mixtral": ArchitectureSpec(**_MOE, num_experts_key="num_local_experts"),
    "qwen2_moe": ArchitectureSpec(
        **_MOE,
        num_experts_key="num_experts",
        shared_expert_attr="shared_expert",
        shared_expert_gate_attr="shared_expert_gate",
    ),
    "qwen3_moe": ArchitectureSpec(**_MOE, num_experts_key="num_experts"),
    "olmoe": ArchitectureSpec(**_MOE, num_experts_key="num_experts"),
    "gemma2": ArchitectureSpec(mlp_not_on_residual=_POST_FFN_NORM),
    "gemma3_text": ArchitectureSpec(mlp_not_on_residual=_POST_FFN_NORM),
    "olmo2": ArchitectureSpec(mlp_not_on_residual=_POST_FFN_NORM),
}

# Expert-pruned checkpoints with different expert counts per layer (model_patches/nonuniform_moe.py) and
# prompt-token-pruned causal LMs (model_patches/prompt_token_pruning.py) keep their family's layout under an
# hf_prune_ model type.
TEXT_ARCHITECTURES.update(
    {
        f"hf_prune_{family}": TEXT_ARCHITECTURES[family]
        for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama", "qwen2", "mistral")
    }
)

# Qwen2-VL's language model: visual token pruning only, since calibration forwards through a bare decoder
# would need its 3-D rotary positions.
_MROPE = ArchitectureSpec(
    token_pruning_only=(
        "its language model takes 3-D rotary positions from the image grid, which calibration forwards do not "
        "build; only visual token pruning supports it"
    )
)
TEXT_ARCHITECTURES.update({"qwen2_vl_text": _MROPE, "qwen2_5_vl_text": _MROPE})

#: Encoder classifiers (BERT family): text token pruning only (the other methods assume a decoder).
ENCODER_ARCHITECTURES = (
    "bert",
    "roberta",
    "distilbert",
    "hf_prune_bert",
    "hf_prune_roberta",
    "hf_prune_distilbert",
)
_ENCODER = ArchitectureSpec(token_pruning_only="an encoder classifier: only text token pruning supports it")
TEXT_ARCHITECTURES.update(dict.fromkeys(ENCODER_ARCHITECTURES, _ENCODER))

#: Vision-language wrappers: the language model inside is looked up in TEXT_ARCHITECTURES by its own type.
VISION_LANGUAGE_ARCHITECTURES = (
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    # visual-token-pruned checkpoints (model_patches/*token_pruning.py)
    "hf_prune_llava",
    "hf_prune_llava_next",
    "hf_prune_qwen2_vl",
    "hf_prune_qwen2_5_vl",
)


def supported_model_types() -> list[str]:
    return sorted([*TEXT_ARCHITECTURES, *VISION_LANGUAGE_ARCHITECTURES])


@dataclass(frozen=True)
class ModelAdapter:
    """The adapter for one model: an ArchitectureSpec plus where its language model sits."""

    model_type: str
    text_model_type: str
    spec: ArchitectureSpec
    is_vision_language: bool

    @property
    def is_encoder(self) -> bool:
        return self.model_type in ENCODER_ARCHITECTURES

    # ---- config -------------------------------------------------------------------------
    def text_config(self, config: Any) -> Any:
        return config.get_text_config() if self.is_vision_language else config

    def num_layers(self, config: Any) -> int:
        return int(self.text_config(config).num_hidden_layers)

    def num_experts(self, config: Any) -> int | None:
        key = self.spec.num_experts_key
        return int(getattr(self.text_config(config), key)) if key else None

    def describe(self, config: Any) -> dict[str, Any]:
        """Architecture facts for ``hf-prune inspect``."""
        text = self.text_config(config)
        facts: dict[str, Any] = {
            "model_type": self.model_type,
            "language_model_type": self.text_model_type,
            "decoder_layers": self.num_layers(config),
            "hidden_size": text.hidden_size,
            "intermediate_size": getattr(text, "intermediate_size", None),
            "attention_heads": getattr(text, "num_attention_heads", None),
            "kv_heads": getattr(text, "num_key_value_heads", None),
            "vocab_size": getattr(text, "vocab_size", None),
        }
        if self.spec.is_moe:
            facts["experts"] = self.num_experts(config)
            facts["experts_per_token"] = getattr(text, "num_experts_per_tok", None)
            facts["moe_intermediate_size"] = getattr(text, "moe_intermediate_size", None)
            facts["shared_expert"] = self.spec.shared_expert_attr is not None
        if self.is_vision_language:
            vision = config.vision_config
            facts["vision_tower"] = (
                f"{vision.model_type} ({vision.num_hidden_layers} layers, hidden {vision.hidden_size})"
            )
            facts["image_token_id"] = getattr(config, "image_token_id", None)
        return facts

    # ---- modules ------------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        """The module that owns ``layers`` and runs them (LlamaModel and friends)."""
        inner = getattr(model, "model", model)
        if self.is_vision_language:
            inner = inner.language_model
        if not hasattr(inner, "layers"):
            raise UnsupportedModelError(
                f"{type(model).__name__}: no decoder layers found where the "
                f"{self.model_type} adapter expects them"
            )
        return inner

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.spec.mlp_attr)

    def is_moe_layer(self, layer: nn.Module) -> bool:
        return self.spec.is_moe and hasattr(self.mlp(layer), self.spec.experts_attr)

    def top_k(self, config: Any) -> int | None:
        """Experts each token is routed to (``num_experts_per_tok``), None for dense models."""
        return int(self.text_config(config).num_experts_per_tok) if self.spec.is_moe else None

    def experts(self, layer: nn.Module) -> nn.Module:
        """The fused experts module of an MoE layer (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I])."""
        return getattr(self.mlp(layer), self.spec.experts_attr)

    def router(self, layer: nn.Module) -> nn.Module:
        """The router of an MoE layer: ``weight`` [E, H]; forward returns (logits, top-k weights, top-k indices)."""
        return getattr(self.mlp(layer), self.spec.router_attr)

    def moe_layer_indices(self, model: nn.Module) -> list[int]:
        return [i for i, layer in enumerate(self.layers(model)) if self.is_moe_layer(layer)]

    def experts_per_layer(self, model: nn.Module) -> list[int]:
        """Routed experts in each decoder layer (0 for a dense layer)."""
        return [
            int(self.experts(layer).num_experts) if self.is_moe_layer(layer) else 0
            for layer in self.layers(model)
        ]

    def mlp_output_projections(self, layer: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter | None]]:
        """(name, weight, bias) of every projection whose output sums into the layer's MLP output.

        Dense layers: ``down_proj`` ([out, in]). MoE layers: every expert's down projection
        (fused ``[E, out, in]``) and the shared expert's ``down_proj``. Routing weights and the shared
        expert gate are per-token scalars, so a linear map on the output commutes with them.
        """
        mlp = self.mlp(layer)
        if not self.is_moe_layer(layer):
            down = getattr(mlp, self.spec.down_proj_attr)
            return [(f"{self.spec.mlp_attr}.{self.spec.down_proj_attr}", down.weight, down.bias)]
        experts = getattr(mlp, self.spec.experts_attr)
        projections = [
            (
                f"{self.spec.mlp_attr}.{self.spec.experts_attr}.down_proj",
                experts.down_proj,
                getattr(experts, "down_proj_bias", None),
            )
        ]
        if self.spec.shared_expert_attr:
            down = getattr(getattr(mlp, self.spec.shared_expert_attr), self.spec.down_proj_attr)
            projections.append(
                (
                    f"{self.spec.mlp_attr}.{self.spec.shared_expert_attr}.{self.spec.down_proj_attr}",
                    down.weight,
                    down.bias,
                )
            )
        return projections

    # ---- structural edits ---------------------------------------------------------------
    def remove_layers(self, model: nn.Module, remove: list[int]) -> None:
        """Delete decoder layers in place and make config, ``layer_types`` and every ``layer_idx`` agree."""
        layers = self.layers(model)
        config = self.text_config(model.config)
        doomed = set(remove)
        kept_old = [i for i in range(len(layers)) if i not in doomed]
        moe_flags = [self.is_moe_layer(layers[i]) for i in kept_old]
        new_layers = nn.ModuleList([layers[i] for i in kept_old])
        for new_idx, layer in enumerate(new_layers):
            # The KV cache indexes by layer_idx: stale indices break generate (not a plain forward).
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx
        self.decoder(model).layers = new_layers
        self.keep_layers_in_config(config, kept_old, moe_flags)

    @staticmethod
    def keep_layers_in_config(text_config: Any, kept_old: list[int], moe_flags: list[bool]) -> None:
        """Rewrite a text config in place for the decoder layers ``kept_old`` (old indices, in order), whose
        layers are MoE where ``moe_flags`` says so: the layer count and every per-layer list."""
        text_config.num_hidden_layers = len(kept_old)
        if getattr(text_config, "layer_types", None) is not None:
            text_config.layer_types = [text_config.layer_types[i] for i in kept_old]
        if getattr(text_config, "experts_per_layer", None) is not None:  # non-uniform expert counts
            text_config.experts_per_layer = [text_config.experts_per_layer[i] for i in kept_old]
        if hasattr(text_config, "mlp_only_layers") and hasattr(text_config, "decoder_sparse_step"):
            # Qwen-MoE decides sparse vs dense from the layer index; rewrite so a reload rebuilds the
            # same mix of layers after the indices shifted.
            text_config.mlp_only_layers = [i for i, is_moe in enumerate(moe_flags) if not is_moe]
            text_config.decoder_sparse_step = 1

    def experts_per_layer_from_config(self, config: Any) -> list[int]:
        """Routed experts in each decoder layer (0 for a dense layer), from the config alone (no weights)."""
        text = self.text_config(config)
        per_layer = getattr(text, "experts_per_layer", None)
        if per_layer is not None:
            return [int(n) for n in per_layer]
        experts = self.num_experts(config) or 0
        num_layers = self.num_layers(config)
        if hasattr(text, "decoder_sparse_step") and hasattr(text, "mlp_only_layers"):  # Qwen2/3-MoE
            step = int(text.decoder_sparse_step or 1)
            dense = set(text.mlp_only_layers or [])
            return [
                experts if i not in dense and experts > 0 and (i + 1) % step == 0 else 0
                for i in range(num_layers)
            ]
        return [experts] * num_layers


def get_adapter(config: Any) -> ModelAdapter:
    """The adapter for a model config; unsupported types fail at once, listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type in VISION_LANGUAGE_ARCHITECTURES:
        text_type = config.get_text_config().model_type
        if text_type not in TEXT_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{model_type}: its language model type {text_type!r} is not supported "
                f"(supported language models: {', '.join(sorted(TEXT_ARCHITECTURES))})"
            )
        return ModelAdapter(model_type, text_type, TEXT_ARCHITECTURES[text_type], True)
    if model_type not in TEXT_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(supported_model_types())})"
        )
    return ModelAdapter(model_type, model_type, TEXT_ARCHITECTURES[model_type], False)


def auto_model_class(adapter: ModelAdapter) -> Any:
    """The Auto class that loads a model of this adapter's type with its head."""
    import transformers

    if adapter.is_vision_language:
        return transformers.AutoModelForImageTextToText
    if adapter.is_encoder:
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM


def max_positions(model: Any) -> int | None:
    """``max_position_embeddings`` of a model's (text) config, or None when the config does not say."""
    config = getattr(model, "config", None)
    candidates = [config.get_text_config()] if hasattr(config, "get_text_config") else []
    for candidate in [*candidates, config]:
        value = getattr(candidate, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
