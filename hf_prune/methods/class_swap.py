"""Turning a loaded model into an ``hf_prune_<family>`` model (or back) without touching its weights."""

from __future__ import annotations

from typing import Any

from torch import nn


def swap_config_and_class(
    model: nn.Module,
    config_class: type,
    model_class: type,
    updates: dict[str, Any],
    drop: tuple[str, ...] = (),
) -> None:
    """Replace ``model.config`` by a ``config_class`` built from its dict (plus ``updates``, minus ``drop``)
    everywhere a module holds it, and ``model.__class__`` by ``model_class`` (same modules, same weights).

    Sub-configs (a vision-language model's ``text_config`` / ``vision_config``) stay the very objects the
    inner modules hold, so a runtime setting changed on one is seen by both.
    """
    old = model.config
    aliases = getattr(config_class, "attribute_map", {})  # Qwen3-MoE: num_experts is num_local_experts
    updates = {aliases.get(k, k): v for k, v in updates.items()}
    data = {k: v for k, v in old.to_dict().items() if k not in ("model_type", "auto_map", *drop)}
    new = config_class.from_dict({**data, **updates})
    for attr in ("_attn_implementation", "_experts_implementation"):
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    for key in getattr(old, "sub_configs", {}):
        if getattr(old, key, None) is not None:
            setattr(new, key, getattr(old, key))
    new.name_or_path = old.name_or_path
    for module in model.modules():
        if module.__dict__.get("config") is old:  # PreTrainedModels, experts (implementation), attention...
            module.config = new
    model.__class__ = model_class
