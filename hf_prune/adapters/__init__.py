"""Architecture knowledge, in one place (DESIGN.md §2): where the decoder layers, MLP output projection,
experts, router, shared expert, vision tower, projector and image-token id live for each ``model_type``.

- ``table.py``: the table itself (``ArchitectureSpec`` / ``VisionLanguageSpec`` per ``model_type``); the
  ``hf_prune_<family>`` types are derived from the ``FAMILIES`` tables of ``model_patches/``;
- ``model_adapter.py``: ``ModelAdapter``, the table's answers for one model, and ``get_adapter``;
- ``model_utils.py``: facts that need no table (parameter count, device, context length).

Adding an architecture (``model_type`` as transformers names it):

- a dense decoder: one entry in ``table.TEXT_ARCHITECTURES`` (``_DENSE``, or a spec naming what differs:
  module names, or ``mlp_not_on_residual`` when a norm follows the MLP);
- an MoE decoder: one entry with ``experts_attr`` / ``router_attr`` / ``num_experts_key`` (and the shared
  expert's names if any); different expert counts per layer need its family in
  ``model_patches/nonuniform_moe.FAMILIES``, and a sparse-layer rule other than Qwen-MoE's belongs in
  ``nonuniform_moe.moe_layer_flags`` (read) and ``model_adapter.set_moe_layer_flags`` (write);
- a vision-language wrapper: one entry in ``table.VISION_LANGUAGE_ARCHITECTURES`` (the paths of its
  vision tower, projector and language model, the image token key) and one for its language model's type;
- a model_patches family (``FAMILIES`` of a module in ``table.PATCH_MODULES``) gets its ``hf_prune_<family>``
  type here by itself; tests/tiny_models.py builds a tiny model of each type the tests cover.
"""

from .model_adapter import (
    ModelAdapter,
    auto_model_class,
    get_adapter,
    set_moe_layer_flags,
    vision_config,
)
from .model_utils import count_parameters, max_positions, model_device, use_cache_restored
from .table import (
    ENCODER_ARCHITECTURES,
    PATCHED_PREFIX,
    TEXT_ARCHITECTURES,
    VISION_LANGUAGE_ARCHITECTURES,
    ArchitectureSpec,
    VisionLanguageSpec,
    patched_families,
    supported_model_types,
)

__all__ = [
    "ENCODER_ARCHITECTURES",
    "PATCHED_PREFIX",
    "TEXT_ARCHITECTURES",
    "VISION_LANGUAGE_ARCHITECTURES",
    "ArchitectureSpec",
    "ModelAdapter",
    "VisionLanguageSpec",
    "auto_model_class",
    "count_parameters",
    "get_adapter",
    "max_positions",
    "model_device",
    "patched_families",
    "set_moe_layer_flags",
    "supported_model_types",
    "use_cache_restored",
    "vision_config",
]
