"""Qwen2-VL / Qwen2.5-VL that drop visual tokens after the patch merger, by themselves.

The same contract and algorithms as ``visual_token_pruning.py`` (LLaVA), with what this family needs:

- the budget is per image, counted in merged tokens (after the 2×2 patch merger), and pooling works on
  the image's own (height/2) × (width/2) grid, so non-square images pool correctly;
- positions: Qwen2-VL gives each visual token a 3-D rotary position (time, row, column) and the text after
  an image continues from the image's largest one. The kept tokens keep the positions they had in the
  full sequence (their place in the image), the text keeps its own, and later tokens continue from the
  prompt's last position: ``forward`` passes the cut positions and sets ``model.rope_deltas`` for cached
  decoding; ``generate`` passes them as 4-row position ids (text row + 3 rotary rows) that the stock
  loop extends token by token;
- ``mm_token_type_ids`` (from the processor) are cut with the input ids; they are required, as for the
  stock model.

The classes, written out here (``auto_map`` names them in this module): ``HfPruneQwen2VLConfig`` /
``HfPruneQwen2VLForConditionalGeneration`` (``hf_prune_qwen2_vl``) and ``HfPruneQwen2_5_VLConfig`` /
``HfPruneQwen2_5_VLForConditionalGeneration`` (``hf_prune_qwen2_5_vl``): the stock classes with
``Qwen2VLTokenPruningMixin`` (this family's hooks over ``VisualTokenPruningMixin``) in front. Each model
class spells out the stock ``forward`` signature plus ``instruction_ids`` / ``instruction_text``
(``generate`` checks its keyword arguments against it).

Imports only torch, transformers and its sibling files (``visual_pruning_mixin.py`` and what it imports),
which ``save_pretrained`` copies along as remote code.
"""

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from .patch_classes import register_auto_classes
from .visual_pruning_mixin import VisualTokenPruningConfigMixin, VisualTokenPruningMixin

#: family -> (stock config class, stock model class)
FAMILIES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
}


class Qwen2VLTokenPruningMixin(VisualTokenPruningMixin):
    """``VisualTokenPruningMixin`` with Qwen2-VL's image grids, rotary positions and ``mm_token_type_ids``."""

    VISION_KWARGS = ("image_grid_thw",)
    SEQUENCE_KWARGS = ("mm_token_type_ids",)

    def token_groups(self, features: torch.Tensor, index: int, kwargs: dict) -> tuple[list, torch.Tensor]:
        """One group per image, on its merged grid (frames stacked along the rows)."""
        grids = kwargs.get("image_grid_thw")
        arange = torch.arange(features.shape[0], device=features.device)
        if grids is None:
            raise ValueError(
                "Qwen2-VL token pruning needs image_grid_thw (from the processor) with the images"
            )
        frames, height, width = (int(v) for v in grids[index])
        merge = self.config.vision_config.spatial_merge_size
        return [(arange, (frames * height // merge, width // merge), 1.0)], arange[:0]

    def full_position_ids(self, input_ids, attention_mask, kwargs):
        if kwargs.get("mm_token_type_ids") is None:
            raise ValueError(
                "Qwen2-VL token pruning needs mm_token_type_ids (returned by the processor with "
                "input_ids) to place the kept visual tokens"
            )
        positions, _ = self.model.get_rope_index(
            input_ids,
            mm_token_type_ids=kwargs["mm_token_type_ids"],
            image_grid_thw=kwargs.get("image_grid_thw"),
            attention_mask=attention_mask,
        )
        return positions  # [3, B, L]

    @staticmethod
    def _text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
        return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)

    def after_prune(self, pruned: dict) -> None:
        """Cached decoding continues at (largest kept position + 1): the stock rope_deltas bookkeeping."""
        mask = pruned["attention_mask"].bool()
        last = pruned["position_ids"].masked_fill(~mask[None], -1).amax(dim=(0, 2))
        self.model.rope_deltas = (last + 1 - mask.sum(dim=1))[:, None]

    def pruned_generate_kwargs(self, pruned: dict) -> dict:
        self.after_prune(pruned)
        text = self._text_positions(pruned["attention_mask"])[None]
        return {"position_ids": torch.cat([text, pruned["position_ids"]], dim=0)}


class HfPruneQwen2VLConfig(VisualTokenPruningConfigMixin, Qwen2VLConfig):
    model_type = "hf_prune_qwen2_vl"
    token_pruning: dict | None = None


class HfPruneQwen2VLForConditionalGeneration(Qwen2VLTokenPruningMixin, Qwen2VLForConditionalGeneration):
    config_class = HfPruneQwen2VLConfig

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        pixel_values=None,
        pixel_values_videos=None,
        image_grid_thw=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        logits_to_keep=0,
        mm_encoder_outputs=None,
        *,
        instruction_ids=None,
        instruction_text=None,
        **kwargs,
    ):
        """``Qwen2VLForConditionalGeneration.forward``'s parameters plus the instruction overrides."""
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            mm_encoder_outputs=mm_encoder_outputs,
            instruction_ids=instruction_ids,
            instruction_text=instruction_text,
            use_cache=use_cache,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


class HfPruneQwen2_5_VLConfig(VisualTokenPruningConfigMixin, Qwen2_5_VLConfig):
    model_type = "hf_prune_qwen2_5_vl"
    token_pruning: dict | None = None


class HfPruneQwen2_5_VLForConditionalGeneration(Qwen2VLTokenPruningMixin, Qwen2_5_VLForConditionalGeneration):
    config_class = HfPruneQwen2_5_VLConfig

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        pixel_values=None,
        pixel_values_videos=None,
        image_grid_thw=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        second_per_grid_ts=None,
        logits_to_keep=0,
        mm_encoder_outputs=None,
        *,
        instruction_ids=None,
        instruction_text=None,
        **kwargs,
    ):
        """``Qwen2_5_VLForConditionalGeneration.forward``'s parameters plus the instruction overrides."""
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            mm_encoder_outputs=mm_encoder_outputs,
            instruction_ids=instruction_ids,
            instruction_text=instruction_text,
            use_cache=use_cache,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            second_per_grid_ts=second_per_grid_ts,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


#: family -> (config class, model class)
CLASSES = {
    "qwen2_vl": (HfPruneQwen2VLConfig, HfPruneQwen2VLForConditionalGeneration),
    "qwen2_5_vl": (HfPruneQwen2_5_VLConfig, HfPruneQwen2_5_VLForConditionalGeneration),
}
for _config_class, _model_class in CLASSES.values():
    register_auto_classes(_config_class, _model_class, "AutoModelForImageTextToText")
