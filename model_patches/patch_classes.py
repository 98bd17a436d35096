"""What every token-pruning modeling file shares: the settings check, Auto registration, native-layout
saving and cutting kept tokens out of a batch.

Public helpers, all imported by name by the modeling files (``prompt_token_pruning.py``,
``text_token_pruning.py``, ``visual_pruning_mixin.py`` and the visual / Qwen2-VL files through it, and
``token_selection.py``):

- ``PREFIX``: the ``model_type`` prefix of every hf_prune class (``hf_prune_<family>``);
- ``settings_with_defaults``: a ``token_pruning`` dict over the file's defaults, unknown keys refused;
- ``register_auto_classes``: one (config class, model class) pair registered with ``AutoConfig``, an Auto
  model class and ``auto_map`` export (each modeling file calls it for every class pair it defines);
- ``NativeLayoutSaving``: a mixin that saves the native weight layout;
- ``cut_rows`` and ``with_callers_prompt``: cutting kept tokens out of a batch, and giving ``generate``'s
  output back the caller's prompt.

Imports only torch and transformers; ``save_pretrained`` copies it next to the weights with the modeling
file that imports it.
"""

import torch

PREFIX = "hf_prune_"


def settings_with_defaults(settings, defaults: dict) -> dict:
    """``settings`` over ``defaults``; ValueError for a non-dict or an unknown key (naming the allowed ones)."""
    if not isinstance(settings, dict):
        raise ValueError(f"token_pruning must be a dict, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"token_pruning.{unknown[0]}: unknown key (allowed: {', '.join(defaults)})")
    return {**defaults, **settings}


def register_auto_classes(config_class: type, model_class: type, auto_model: str) -> None:
    """Register with AutoConfig and ``auto_model`` (and for ``auto_map`` export); the first registration
    of a model type wins (hf_prune's, then a remote-code copy)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class.register_for_auto_class()
    model_class.register_for_auto_class(auto_model)
    if config_class.model_type in CONFIG_MAPPING:
        return
    transformers.AutoConfig.register(config_class.model_type, config_class)
    getattr(transformers, auto_model).register(config_class, model_class)


class NativeLayoutSaving:
    """Mixed in before a stock model class: save the native key layout, since transformers' renaming to
    the legacy layout is keyed by the stock model type and would not be undone when loading this one."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        kwargs["save_original_format"] = False
        return super().save_pretrained(save_directory, *args, **kwargs)


def cut_rows(tensor, keep: torch.Tensor, fill):
    """The ``keep`` positions ([B, L] bool) of a [B, L, ...] tensor, each row left-padded with ``fill`` to the
    longest; a [k, B, L] tensor (multimodal rotary positions) is cut along its last two dims; None stays None."""
    if tensor is None:
        return None
    if tensor.dim() == 3 and tensor.shape[1:] == keep.shape:
        return cut_rows(tensor.permute(1, 2, 0), keep, fill).permute(2, 0, 1)
    width = int(keep.sum(1).max())
    out = tensor.new_full((tensor.shape[0], width, *tensor.shape[2:]), fill)
    for row in range(tensor.shape[0]):
        kept = tensor[row][keep[row]]
        out[row, width - kept.shape[0] :] = kept
    return out


def with_callers_prompt(output, input_ids: torch.Tensor, cut_length: int):
    """A ``generate`` output on a cut prompt, with the caller's own ``input_ids`` in front of the new tokens."""
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
    restored = torch.cat([prompt, sequences[:, cut_length:]], dim=1)
    if isinstance(output, torch.Tensor):
        return restored
    output.sequences = restored
    return output
