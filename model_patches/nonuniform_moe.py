"""Mixture-of-experts models with a different number of routed experts in each decoder layer.

Expert pruning that keeps the same count in every MoE layer is saved in the stock architecture (the
expert-count key rewritten). When the counts differ, the checkpoint gets its own ``model_type``
(``hf_prune_<family>``) and the classes below: a config subclass of the stock config with one extra field,
``experts_per_layer`` (routed experts per decoder layer, 0 for a dense layer), and a ``*ForCausalLM``
subclass of the stock class whose ``__init__`` builds the stock model and then shrinks each MoE layer's
fused experts and router to its own count, before any weight is loaded. Forward is the stock one.

Weights are saved with fused expert keys (``...mlp.experts.gate_up_proj`` [E_l, 2I, H]), not the legacy
per-expert layout: transformers' key conversion is keyed by the stock ``model_type`` and is not applied to
these classes, so the fused tensors load as they are and a checkpoint whose shapes disagree with
``experts_per_layer`` is refused by ``from_pretrained``.

The classes, written out at the end of this file (``auto_map`` names them here): ``HfPruneMixtralConfig``
/ ``HfPruneMixtralForCausalLM`` (``hf_prune_mixtral``), ``HfPruneQwen2Moe*``, ``HfPruneQwen3Moe*`` and
``HfPruneOlmoe*``: the stock classes with ``NonuniformExpertsConfigMixin`` / ``NonuniformExpertsMixin`` in
front. Each config class names its expert-count key (``expert_count_key``) and its stock config class
(``stock_config_class``), each model class the stock load-balancing loss of its family
(``load_balancing_loss``) and its stock class (``stock_class``); ``stock_classes(model_type)`` gives both
stock classes.

This file imports only torch, transformers and the standard library (no sibling file): ``save_pretrained``
copies it alone next to the weights as remote code, so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works without hf_prune.

Importing it registers the classes with ``AutoConfig`` / ``AutoModelForCausalLM``; ``import hf_prune``
imports it (that pulls in torch and transformers, as ``import peft`` does).
"""

import torch
from torch import nn
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as mixtral_balancing_loss
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func as olmoe_balancing_loss
from transformers.models.qwen2_moe.modeling_qwen2_moe import (
    load_balancing_loss_func as qwen2_moe_balancing_loss,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    load_balancing_loss_func as qwen3_moe_balancing_loss,
)

#: family -> (stock config class, stock causal-LM class, expert-count key in the config).
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "num_local_experts"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "num_experts"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "num_experts"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", "num_experts"),
}
PREFIX = "hf_prune_"


def moe_layer_flags(config) -> list:
    """Which decoder layers the stock class builds as MoE layers (Qwen-MoE: ``mlp_only_layers`` and
    ``decoder_sparse_step``; Mixtral and OLMoE: every layer)."""
    n = config.num_hidden_layers
    if not hasattr(config, "decoder_sparse_step"):
        return [True] * n
    dense = set(config.mlp_only_layers or [])
    step = config.decoder_sparse_step
    return [i not in dense and config.num_experts > 0 and (i + 1) % step == 0 for i in range(n)]


def select_experts(experts, router, indices) -> None:
    """Keep only the experts ``indices`` (in this order) of one MoE layer, in place: every parameter or
    buffer of the fused experts module and the router whose first dimension is the expert count is
    indexed, and ``num_experts`` is updated on both. Works on meta tensors too."""
    old = int(experts.num_experts)
    indices = [int(i) for i in indices]
    for module in (experts, router):
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.dim() == 0 or tensor.shape[0] != old:
                continue
            index = torch.tensor(indices, dtype=torch.long, device=tensor.device)
            new = tensor.detach().index_select(0, index).clone()
            if isinstance(tensor, nn.Parameter):
                setattr(module, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
            else:
                module.register_buffer(name, new, persistent=name not in module._non_persistent_buffers_set)
        module.num_experts = len(indices)


def _moe_blocks(model):
    """(layer index, fused experts module, router) of every MoE layer."""
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            yield i, layer.mlp.experts, layer.mlp.gate


class NonuniformExpertsConfigMixin:
    """Mixed in before a stock MoE config class: checks ``experts_per_layer`` (a field the config class
    declares) against the MoE layers, top-k and the expert count under ``expert_count_key``."""

    #: The stock config's expert-count key (``num_local_experts`` or ``num_experts``); set by each class.
    expert_count_key: str
    #: The stock config class it extends; set by each class.
    stock_config_class: type

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_experts_per_layer()

    def check_experts_per_layer(self):
        counts, count_key = self.experts_per_layer, self.expert_count_key
        if counts is None:
            return
        top_k, most = self.num_experts_per_tok, getattr(self, count_key)
        if len(counts) != self.num_hidden_layers:
            raise ValueError(
                f"experts_per_layer has {len(counts)} entries for {self.num_hidden_layers} layers"
            )
        for i, (n, moe) in enumerate(zip(counts, moe_layer_flags(self), strict=True)):
            if type(n) is not int or (moe and not top_k <= n <= most) or (not moe and n != 0):
                allowed = (
                    f"an int in [{top_k}, {most}] (top-k to {count_key})" if moe else "0 (a dense layer)"
                )
                raise ValueError(f"experts_per_layer[{i}] = {n!r}: must be {allowed}")


class NonuniformExpertsMixin:
    """Mixed in before a stock MoE causal LM: ``__init__`` shrinks each MoE layer to its own expert count
    (``config.experts_per_layer``); weights are saved with fused expert keys; with router logits requested,
    the load-balancing loss is the family's stock function (``load_balancing_loss``, set by each class)
    on every layer's router logits padded with -inf to the widest layer's count: a layer with fewer
    experts counts as the widest one with its missing experts never chosen (probability 0), so equal
    counts give exactly the stock class's loss.

    ``forward`` keeps the generic ``(*args, **kwargs)`` signature it has always had (so ``generate`` treats
    it as a forward that names no parameter: no ``logits_to_keep``, no position ids or attention mask made
    for it)."""

    load_balancing_loss: staticmethod
    #: The stock causal-LM class it extends (the class a model goes back to when its counts are uniform).
    stock_class: type

    def __init__(self, config):
        super().__init__(config)
        counts = config.experts_per_layer
        if counts is None:
            raise ValueError(f"{type(self).__name__} needs config.experts_per_layer")
        blocks = list(_moe_blocks(self))
        moe = {i for i, _, _ in blocks}
        if moe != {i for i, n in enumerate(counts) if n}:
            raise ValueError(f"experts_per_layer {counts} does not match the MoE layers {sorted(moe)}")
        for i, experts, router in blocks:
            if counts[i] != experts.num_experts:
                select_experts(experts, router, range(counts[i]))
        self.num_experts = max(counts)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Fused expert tensors: the per-expert conversion is keyed by the stock model_type only.
        kwargs["save_original_format"] = False
        return super().save_pretrained(save_directory, *args, **kwargs)

    def forward(self, *args, **kwargs):
        want = kwargs.get("output_router_logits")
        if not (self.config.output_router_logits if want is None else want):
            return super().forward(*args, **kwargs)
        # The stock load-balancing loss needs one expert count for all layers: collect the router
        # logits with hooks instead (padded below).
        logits = []
        hooks = [
            router.register_forward_hook(lambda _m, _a, out: logits.append(out[0]))
            for _, _, router in _moe_blocks(self)
        ]
        try:
            out = super().forward(*args, **{**kwargs, "output_router_logits": False})
        finally:
            for hook in hooks:
                hook.remove()
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        # A layer with fewer experts is the widest layer with the missing experts' logits at -inf (never
        # routed to, probability 0): pad to the widest count and apply the stock loss once, so the
        # fractions and probabilities are averaged over all layers' tokens as the stock class does, and a
        # model whose counts are all equal gets exactly the stock class's aux loss.
        width = max(x.shape[-1] for x in logits)
        padded = tuple(
            torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=float("-inf")) for x in logits
        )
        aux = self.load_balancing_loss(padded, width, self.num_experts_per_tok, mask)
        out.router_logits, out.aux_loss = tuple(logits), aux
        if out.loss is not None:
            out.loss = out.loss + self.router_aux_loss_coef * aux.to(out.loss.device)
        return out


class HfPruneMixtralConfig(NonuniformExpertsConfigMixin, MixtralConfig):
    model_type = "hf_prune_mixtral"
    expert_count_key = "num_local_experts"
    experts_per_layer: list[int] | None = None
    stock_config_class = MixtralConfig


class HfPruneMixtralForCausalLM(NonuniformExpertsMixin, MixtralForCausalLM):
    config_class = HfPruneMixtralConfig
    load_balancing_loss = staticmethod(mixtral_balancing_loss)
    stock_class = MixtralForCausalLM


class HfPruneQwen2MoeConfig(NonuniformExpertsConfigMixin, Qwen2MoeConfig):
    model_type = "hf_prune_qwen2_moe"
    expert_count_key = "num_experts"
    experts_per_layer: list[int] | None = None
    stock_config_class = Qwen2MoeConfig


class HfPruneQwen2MoeForCausalLM(NonuniformExpertsMixin, Qwen2MoeForCausalLM):
    config_class = HfPruneQwen2MoeConfig
    load_balancing_loss = staticmethod(qwen2_moe_balancing_loss)
    stock_class = Qwen2MoeForCausalLM


class HfPruneQwen3MoeConfig(NonuniformExpertsConfigMixin, Qwen3MoeConfig):
    model_type = "hf_prune_qwen3_moe"
    expert_count_key = "num_experts"
    experts_per_layer: list[int] | None = None
    stock_config_class = Qwen3MoeConfig


class HfPruneQwen3MoeForCausalLM(NonuniformExpertsMixin, Qwen3MoeForCausalLM):
    config_class = HfPruneQwen3MoeConfig
    load_balancing_loss = staticmethod(qwen3_moe_balancing_loss)
    stock_class = Qwen3MoeForCausalLM


class HfPruneOlmoeConfig(NonuniformExpertsConfigMixin, OlmoeConfig):
    model_type = "hf_prune_olmoe"
    expert_count_key = "num_experts"
    experts_per_layer: list[int] | None = None
    stock_config_class = OlmoeConfig


class HfPruneOlmoeForCausalLM(NonuniformExpertsMixin, OlmoeForCausalLM):
    config_class = HfPruneOlmoeConfig
    load_balancing_loss = staticmethod(olmoe_balancing_loss)
    stock_class = OlmoeForCausalLM


def _register(config_class, model_class) -> None:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModelForCausalLM")
    if (
        config_class.model_type in CONFIG_MAPPING
    ):  # first registration wins (e.g. hf_prune, then a remote copy)
        return
    transformers.AutoConfig.register(config_class.model_type, config_class)
    transformers.AutoModelForCausalLM.register(config_class, model_class)


#: family -> (config class, causal-LM class)
CLASSES = {
    "mixtral": (HfPruneMixtralConfig, HfPruneMixtralForCausalLM),
    "qwen2_moe": (HfPruneQwen2MoeConfig, HfPruneQwen2MoeForCausalLM),
    "qwen3_moe": (HfPruneQwen3MoeConfig, HfPruneQwen3MoeForCausalLM),
    "olmoe": (HfPruneOlmoeConfig, HfPruneOlmoeForCausalLM),
}
_registered = False


def register() -> None:
    """Register every family's classes with the Auto classes (idempotent)."""
    global _registered
    if _registered:
        return
    for config_class, model_class in CLASSES.values():
        _register(config_class, model_class)
    _registered = True


# Register every family on import: `import hf_prune` imports this module, and so does transformers when it
# loads the copy saved next to a checkpoint as remote code.
register()


def stock_family(model_type: str):
    """The stock family (``mixtral``…) of a stock or ``hf_prune_`` model type, or None."""
    family = model_type[len(PREFIX) :] if model_type.startswith(PREFIX) else model_type
    return family if family in FAMILIES else None


def stock_classes(model_type: str):
    """(stock config class, stock causal-LM class) for a stock or ``hf_prune_`` model type of a supported
    family: the classes a model goes back to when every MoE layer keeps the same count again."""
    family = stock_family(model_type)
    if family is None:
        raise ValueError(
            f"no stock MoE classes for model_type {model_type!r} (supported: {', '.join(sorted(FAMILIES))})"
        )
    config_class, model_class = CLASSES[family]
    return config_class.stock_config_class, model_class.stock_class


def nonuniform_classes(model_type: str):
    """(config class, causal-LM class) for a stock or ``hf_prune_`` model type of a supported family."""
    family = stock_family(model_type)
    register()
    if family is None:
        raise ValueError(
            f"no per-layer expert classes for model_type {model_type!r} "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    return CLASSES[family]
