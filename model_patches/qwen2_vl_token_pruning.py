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

Imports only torch, transformers and its sibling files, which ``save_pretrained`` copies along as remote code.
"""

import torch

from .patch_classes import build_and_register
from .visual_token_pruning import _mixin, build_family

#: family -> (stock config class, stock model class)
FAMILIES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
}


def _qwen_mixin(stock_model):
    class QwenTokenPruning(_mixin(stock_model)):
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

        def _full_position_ids(self, input_ids, attention_mask, kwargs):
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

        def _after_prune(self, pruned: dict) -> None:
            """Cached decoding continues at (largest kept position + 1): the stock rope_deltas bookkeeping."""
            mask = pruned["attention_mask"].bool()
            last = pruned["position_ids"].masked_fill(~mask[None], -1).amax(dim=(0, 2))
            self.model.rope_deltas = (last + 1 - mask.sum(dim=1))[:, None]

        def _generation_kwargs(self, pruned: dict) -> dict:
            self._after_prune(pruned)
            text = self._text_positions(pruned["attention_mask"])[None]
            return {"position_ids": torch.cat([text, pruned["position_ids"]], dim=0)}

    return QwenTokenPruning


#: family -> (config class, model class)
CLASSES = build_and_register(
    FAMILIES,
    lambda family: build_family(family, FAMILIES, _qwen_mixin, __name__),
    globals(),
    "AutoModelForImageTextToText",
)
