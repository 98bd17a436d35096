"""The adapter of one model: the architecture table's answers for its ``model_type``.

Methods and evaluations never hard-code where things live: they ask the adapter for the decoder layers,
the MLP output projections (dense, every expert, the shared expert), the router, the expert-count key,
which layers are MoE layers, whether the MLP output goes straight into the residual stream, and for a
vision-language model the vision tower, the projector, the language model and the image token id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from ..model_patches import nonuniform_moe
from .table import (
    IMAGE_CLASSIFIER,
    TEXT_ARCHITECTURES,
    VISION_LANGUAGE_ARCHITECTURES,
    ArchitectureSpec,
    VisionLanguageSpec,
    image_classifier_types,
    supported_model_types,
)


@dataclass(frozen=True)
class ModelAdapter:
    """The adapter for one model: an ArchitectureSpec plus, for a vision-language wrapper, its parts."""

    model_type: str
    text_model_type: str
    spec: ArchitectureSpec
    is_vision_language: bool
    vision: VisionLanguageSpec | None = None

    @property
    def is_encoder(self) -> bool:
        return self.spec.is_encoder

    @property
    def is_image_classifier(self) -> bool:
        return self.spec.is_image_classifier

    # ---- config -------------------------------------------------------------------------
    def text_config(self, config: Any) -> Any:
        return config.get_text_config() if self.is_vision_language else config

    def num_layers(self, config: Any) -> int:
        return int(self.text_config(config).num_hidden_layers)

    def prunes_prompts(self, config: Any) -> bool:
        """Whether this is a prompt-pruned causal LM (``model_patches/prompt_token_pruning.py``): its
        prefill drops prompt tokens, so it is scored with the context pruned at prefill and the
        continuation through the cache (``evals/pruned_prompt_scoring.py``)."""
        pruned = getattr(config, "token_pruning", None) is not None
        return pruned and not self.is_encoder and not self.is_vision_language

    def num_experts(self, config: Any) -> int | None:
        key = self.spec.num_experts_key
        return int(getattr(self.text_config(config), key)) if key else None

    def describe(self, config: Any) -> dict[str, Any]:
        """Architecture facts for ``hf-prune inspect``."""
        if self.is_image_classifier:
            return {
                "model_type": self.model_type,
                "kind": "image classifier",
                "labels": getattr(config, "num_labels", None),
                "image_size": getattr(config, "image_size", None),
                "channels": getattr(config, "num_channels", None),
            }
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
            vision = vision_config(config)
            facts["vision_tower"] = (
                f"{vision.model_type} ({vision.num_hidden_layers} layers, hidden {vision.hidden_size})"
            )
            facts["image_token_id"] = self.image_token_id(config)
        return facts

    def image_token_id(self, config: Any) -> int | None:
        """The id of the image placeholder token of a vision-language config (None for a language model)."""
        return getattr(config, self.vision.image_token_key, None) if self.is_vision_language else None

    # ---- modules ------------------------------------------------------------------------
    @staticmethod
    def _inner(model: nn.Module) -> nn.Module:
        """The base model under the head (``model.model``), or the model itself when it has no head."""
        return getattr(model, "model", model)

    def _part(self, model: nn.Module, field: str) -> nn.Module:
        """The module at the VisionLanguageSpec path ``field`` (a dotted path below ``model.model``)."""
        if not self.is_vision_language:
            raise UnsupportedModelError(f"{self.model_type} is not a vision-language model")
        part = self._inner(model)
        for name in getattr(self.vision, field).split("."):
            part = getattr(part, name)
        return part

    def vision_tower(self, model: nn.Module) -> nn.Module:
        """The vision encoder of a vision-language model (LLaVA: a CLIP / SigLIP vision model)."""
        return self._part(model, "vision_tower")

    def projector(self, model: nn.Module) -> nn.Module:
        """The module that maps vision features into the language model's embedding space."""
        return self._part(model, "projector")

    def language_model(self, model: nn.Module) -> nn.Module:
        """The language model (without its head) inside a vision-language model."""
        return self._part(model, "language_model")

    def decoder(self, model: nn.Module) -> nn.Module:
        """The module that owns the decoder layers and runs them (LlamaModel and friends)."""
        inner = self.language_model(model) if self.is_vision_language else self._inner(model)
        if not hasattr(inner, self.spec.layers_attr):
            raise UnsupportedModelError(
                f"{type(model).__name__}: no decoder layers found where the "
                f"{self.model_type} adapter expects them"
            )
        return inner

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.decoder(model), self.spec.layers_attr)

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
        """The router of an MoE layer: ``weight`` [E, H]; forward returns (logits, top-k weights, top-k
        indices)."""
        return getattr(self.mlp(layer), self.spec.router_attr)

    def expert_count(self, layer: nn.Module) -> int:
        """Routed experts of one MoE layer, as its fused experts module says."""
        return int(self.experts(layer).num_experts)

    @staticmethod
    def set_head_expert_count(model: nn.Module, count: int) -> None:
        """Update the causal-LM head's copy of the expert count (its load-balancing loss reads it)."""
        if hasattr(model, "num_experts"):
            model.num_experts = count

    def moe_layer_indices(self, model: nn.Module) -> list[int]:
        return [i for i, layer in enumerate(self.layers(model)) if self.is_moe_layer(layer)]

    def experts_per_layer(self, model: nn.Module) -> list[int]:
        """Routed experts in each decoder layer (0 for a dense layer)."""
        return [self.expert_count(layer) if self.is_moe_layer(layer) else 0 for layer in self.layers(model)]

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

    def mlp_neurons(self, model: nn.Module) -> list[tuple[list[str], str]]:
        """(input projection module names, output projection module name) of every dense MLP in ``model``,
        found by the spec's ``neuron_inputs`` / ``neuron_output`` suffixes under one parent: neuron j is
        row j of each input and column j of the output. Experts' fused MLPs are not among them."""
        modules = dict(model.named_modules())
        groups = []
        for name, module in modules.items():
            suffix = "." + self.spec.neuron_output
            if not (name.endswith(suffix) and isinstance(module, nn.Linear)):
                continue
            parent = name[: -len(self.spec.neuron_output)]
            inputs = [parent + s for s in self.spec.neuron_inputs]
            if all(isinstance(modules.get(i), nn.Linear) for i in inputs):
                groups.append((inputs, name))
        return groups

    def adapter_targets(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """(Linear modules, fused 3-D expert parameters) of every decoder layer, by full name in ``model``:
        what a LoRA adapter trains (attention and MLP projections, each expert's fused ``gate_up_proj`` /
        ``down_proj``). Routers and the shared-expert gate are left out: they pick experts, and a
        low-rank change there re-routes tokens instead of healing what pruning removed."""
        names = {id(module): name for name, module in model.named_modules()}
        linears: list[str] = []
        fused: list[str] = []
        for layer in self.layers(model):
            skipped: set[int] = set()
            if self.is_moe_layer(layer):
                mlp = self.mlp(layer)
                skipped |= {id(m) for m in self.router(layer).modules()}
                if self.spec.shared_expert_gate_attr:
                    skipped |= {id(m) for m in getattr(mlp, self.spec.shared_expert_gate_attr).modules()}
                experts = self.experts(layer)
                fused += [
                    f"{names[id(experts)]}.{name}"
                    for name, param in experts.named_parameters(recurse=False)
                    if param.dim() == 3
                ]
            linears += [
                names[id(m)] for m in layer.modules() if isinstance(m, nn.Linear) and id(m) not in skipped
            ]
        return linears, fused

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
        setattr(self.decoder(model), self.spec.layers_attr, new_layers)
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
        set_moe_layer_flags(text_config, moe_flags)

    def moe_layer_flags(self, config: Any) -> list[bool]:
        """Which decoder layers are MoE layers, from the config alone: the rule the stock classes build
        by (``model_patches/nonuniform_moe.moe_layer_flags``: Qwen-MoE's ``mlp_only_layers`` and
        ``decoder_sparse_step``, every layer for Mixtral and OLMoE); all False for a dense model."""
        text = self.text_config(config)
        if not self.spec.is_moe:
            return [False] * int(text.num_hidden_layers)
        step = getattr(text, "decoder_sparse_step", 1)
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:  # the stock class divides by it
            raise UnsupportedModelError(
                f"config decoder_sparse_step must be a positive integer, got {step!r}"
            )
        return [bool(flag) for flag in nonuniform_moe.moe_layer_flags(text)]

    def experts_per_layer_from_config(self, config: Any) -> list[int]:
        """Routed experts in each decoder layer (0 for a dense layer), from the config alone (no weights)."""
        text = self.text_config(config)
        per_layer = getattr(text, "experts_per_layer", None)
        if per_layer is not None:
            return [int(n) for n in per_layer]
        experts = self.num_experts(config) or 0
        return [experts if is_moe else 0 for is_moe in self.moe_layer_flags(config)]

    def set_experts_in_config(self, config: Any, counts: list[int]) -> None:
        """Write routed-expert counts per decoder layer (0 for a dense layer) into a config in place: the
        per-layer ``experts_per_layer`` when the config has one (``hf_prune_<family>``), else the family's
        one count key (the counts must then be the same in every MoE layer)."""
        text = self.text_config(config)
        if getattr(text, "experts_per_layer", None) is not None:
            text.experts_per_layer = counts
        else:
            setattr(text, self.spec.num_experts_key, max(counts))


def set_moe_layer_flags(text_config: Any, moe_flags: list[bool]) -> None:
    """Make a Qwen-MoE config build MoE layers exactly where ``moe_flags`` says (after layers were removed,
    the index rule would rebuild a different mix); other configs have no such rule and stay as they are."""
    if hasattr(text_config, "mlp_only_layers") and hasattr(text_config, "decoder_sparse_step"):
        text_config.mlp_only_layers = [i for i, is_moe in enumerate(moe_flags) if not is_moe]
        text_config.decoder_sparse_step = 1


def vision_config(config: Any) -> Any:
    """The vision sub-config of any transformers config (supported or not); None for a language model."""
    return getattr(config, "vision_config", None)


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
        vision = VISION_LANGUAGE_ARCHITECTURES[model_type]
        return ModelAdapter(model_type, text_type, TEXT_ARCHITECTURES[text_type], True, vision)
    if model_type not in TEXT_ARCHITECTURES and model_type in image_classifier_types():
        return ModelAdapter(model_type, model_type, IMAGE_CLASSIFIER, False)
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
    if adapter.is_image_classifier:
        return transformers.AutoModelForImageClassification
    return transformers.AutoModelForCausalLM
