"""The model side of visual token pruning, shared by LLaVA / LLaVA-NeXT (``visual_token_pruning.py``) and
Qwen2-VL / Qwen2.5-VL (``qwen2_vl_token_pruning.py``): what ``token_pruning`` means and the algorithms are
described in ``visual_token_pruning.py``.

Public API, imported by those two files:

- ``VisualTokenPruningConfigMixin``: mixed in before a stock config class; checks its ``token_pruning``
  dict (the config class itself declares the field ``token_pruning: dict | None = None``);
- ``VisualTokenPruningMixin``: mixed in before a stock image-text-to-text class; its ``forward`` cuts the
  visual tokens and calls the stock one, its ``generate`` prunes once and runs the stock loop on the
  shorter prompt. ``generate`` passes on only the keyword arguments that the model's ``forward``
  signature names, so each model class writes its ``forward`` with the stock parameters (in the stock
  order) plus ``instruction_ids`` / ``instruction_text``, and calls this one. A family changes the
  hooks ``token_groups``, ``full_position_ids``, ``after_prune`` and ``pruned_generate_kwargs`` and
  the class attributes ``VISION_KWARGS`` / ``SEQUENCE_KWARGS``;
- ``PrunedImageFeatures``: image features already cut to the budget (``forward`` passes them on as they are).

Imports only torch, transformers and its sibling files: ``save_pretrained`` copies it next to the weights
with the modeling file that imports it.
"""

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .clip_relevance import ClipTextTowerRelevance, ProjectorInputCapture, clip_patch_embeddings
from .patch_classes import NativeLayoutSaving, cut_rows, with_callers_prompt
from .token_selection import check_settings, image_runs, kept_count, square_grid
from .visual_token_scoring import VisualTokenScoring


@dataclass
class PrunedImageFeatures(BaseModelOutputWithPooling):
    """Image features already cut to the budget: ``forward`` passes them on as they are."""


class VisualTokenPruningConfigMixin:
    """Mixed in before a stock vision-language config class: its ``token_pruning`` dict (a field the config
    class declares) is checked, defaults filled in, when the config is built."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.token_pruning is not None:
            self.token_pruning = check_settings(self.token_pruning)


class VisualTokenPruningMixin(VisualTokenScoring, ClipTextTowerRelevance, NativeLayoutSaving):
    """Mixed in before a stock image-text-to-text class (``class HfPruneLlavaForConditionalGeneration(
    VisualTokenPruningMixin, LlavaForConditionalGeneration)``): drops visual tokens in ``forward`` and
    ``generate``. The model class writes ``forward`` with the stock signature (see the module docstring).
    How tokens are scored and chosen: ``VisualTokenScoring`` (``visual_token_scoring.py``)."""

    #: Keyword arguments the vision side consumes (dropped once the features are computed and cut).
    VISION_KWARGS = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")
    #: [B, L] keyword arguments cut along with the input ids.
    SEQUENCE_KWARGS = ()

    # ---- family hooks (Qwen2-VL overrides them) --------------------------------------------------
    def token_groups(self, features: torch.Tensor, index: int, kwargs: dict) -> tuple[list, torch.Tensor]:
        """([(indices into the image's tokens, grid, crops)], indices always kept) for one image.

        LLaVA: one group, the whole square grid, one crop. LLaVA-NeXT: the base image (one crop) and the
        unpadded high-resolution grid (its token count over a crop's), its newline tokens always kept."""
        n = features.shape[0]
        arange = torch.arange(n, device=features.device)
        newline = getattr(self.model, "image_newline", None)
        vision = self.config.vision_config
        base = (vision.image_size // vision.patch_size) ** 2
        if newline is None or n <= base:
            return [(arange, square_grid(n), 1.0)], arange[:0]
        is_newline = (features[base:] == newline.to(features.dtype)).all(dim=-1)
        rows = int(is_newline.sum())
        hires = arange[base:][~is_newline]
        if rows == 0 or hires.numel() % rows:
            return [
                (arange[:base], square_grid(base), 1.0),
                (hires, (1, hires.numel()), hires.numel() / base),
            ], arange[base:][is_newline]
        return (
            [
                (arange[:base], square_grid(base), 1.0),
                (hires, (rows, hires.numel() // rows), hires.numel() / base),
            ],
            arange[base:][is_newline],
        )

    def _image_features(self, pixel_values, mm_encoder_outputs, kwargs) -> tuple[list | None, list | None]:
        """(features per image, and their CLIP-space embeddings when CLIP relevance is in use, else None)."""
        if mm_encoder_outputs and mm_encoder_outputs.get("image") is not None:
            return list(mm_encoder_outputs["image"].pooler_output), None
        if pixel_values is None:
            return None, None
        extra = {k: kwargs[k] for k in self.VISION_KWARGS if kwargs.get(k) is not None}
        if not self._uses_clip_relevance():
            output = self.model.get_image_features(pixel_values=pixel_values, return_dict=True, **extra)
            return list(output.pooler_output), None
        with ProjectorInputCapture(self.model.multi_modal_projector) as captured:
            output = self.model.get_image_features(pixel_values=pixel_values, return_dict=True, **extra)
        return list(output.pooler_output), clip_patch_embeddings(self, captured.inputs, extra)

    def full_position_ids(self, input_ids, attention_mask, kwargs):
        """Position ids of the uncut sequence, when the family's positions are not simply 0..L-1 (LLaVA: None:
        the cut sequence is numbered afresh)."""
        return None

    def after_prune(self, pruned: dict) -> None:
        """Bookkeeping once ``forward`` has cut a batch (nothing for LLaVA)."""

    def pruned_generate_kwargs(self, pruned: dict) -> dict:
        """Extra keyword arguments for the stock ``generate`` on the cut prompt."""
        return {}

    def prune_visual_tokens(
        self,
        input_ids,
        attention_mask=None,
        features=None,
        *,
        labels=None,
        position_ids=None,
        instruction_ids=None,
        instruction_text=None,
        relevance_features=None,
        **kwargs,
    ) -> dict | None:
        """Cut the visual tokens of a batch; None when nothing is to be cut.

        ``relevance_features``: each image's tokens in CLIP space (from ``_image_features``), needed with a
        CLIP text tower. ``kwargs``: the family's vision and sequence keyword arguments (``image_sizes``,
        ``image_grid_thw``, ``mm_token_type_ids``...). Returns ``input_ids``, ``attention_mask``, ``labels``,
        ``position_ids`` (the given or the family's own, cut; None for LLaVA without given ones), the cut
        ``SEQUENCE_KWARGS``,
        ``features`` (the kept features per image), ``keep`` ([B, L] bool over the input) and ``kept_tokens``.
        """
        settings = self._settings()
        image_mask = input_ids == self.config.image_token_id
        runs = image_runs(image_mask, [f.shape[0] for f in features])
        plans = []
        for index, ((row, positions), image) in enumerate(zip(runs, features, strict=True)):
            groups, always = self.token_groups(image, index, kwargs)
            plans.append(
                (
                    row,
                    positions,
                    image,
                    [(g, grid, kept_count(settings, g.numel(), crops)) for g, grid, crops in groups],
                    always,
                )
            )
        if all(count == g.numel() for *_, groups, _ in plans for g, _, count in groups):
            return None
        if position_ids is None:
            position_ids = self.full_position_ids(input_ids, attention_mask, kwargs)
        if self._uses_clip_relevance() and relevance_features is None:
            raise ValueError(
                "CLIP text-tower relevance needs the images as pixel_values (it embeds the vision "
                "tower's features), not precomputed image features"
            )
        with torch.no_grad():
            instructions = (
                self._instructions(
                    input_ids, attention_mask, image_mask, runs, instruction_ids, instruction_text
                )
                if settings["algorithm"] == "cdpruner"
                else [None] * len(runs)
            )
            received = (
                self._fastv_received(
                    input_ids, attention_mask, features, settings["fastv_layer"], position_ids
                )
                if settings["algorithm"] == "fastv"
                else None
            )
        generator = torch.Generator().manual_seed(settings["seed"])
        keep = ~image_mask
        kept_features = []
        for index, (row, positions, image, groups, always) in enumerate(plans):
            slots, values = [always], [image[always]]
            for group, grid, count in groups:
                scores = received[row, positions] if received is not None else None
                chosen, chosen_features = self._choose(
                    image,
                    group,
                    grid,
                    count,
                    settings,
                    instructions[index],
                    scores,
                    generator,
                    relevance_features[index] if relevance_features is not None else None,
                )
                slots.append(group[chosen])
                values.append(chosen_features)
            slots_all = torch.cat(slots)
            order = slots_all.argsort()
            keep[row, positions[slots_all]] = True
            kept_features.append(torch.cat(values)[order])
        pad = self.config.get_text_config().pad_token_id
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return {
            "input_ids": cut_rows(input_ids, keep, pad if pad is not None else 0),
            "attention_mask": cut_rows(mask, keep, 0),
            "labels": cut_rows(labels, keep, -100),
            "position_ids": cut_rows(position_ids, keep, 0),
            "features": kept_features,
            **{k: cut_rows(kwargs[k], keep, 0) for k in self.SEQUENCE_KWARGS if kwargs.get(k) is not None},
            "keep": keep,
            "kept_tokens": [f.shape[0] for f in kept_features],
        }

    # ---- forward and generate ----------------------------------------------------------------
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        mm_encoder_outputs=None,
        instruction_ids=None,
        instruction_text=None,
        **kwargs,
    ):
        """Cut the visual tokens, then run the stock forward on the shorter sequence. Model classes override
        ``forward`` with the stock signature and call this one (``super().forward``)."""
        features = relevance_features = None
        done = bool(mm_encoder_outputs) and isinstance(mm_encoder_outputs.get("image"), PrunedImageFeatures)
        if input_ids is not None and not done and (pixel_values is not None or mm_encoder_outputs):
            features, relevance_features = self._image_features(pixel_values, mm_encoder_outputs, kwargs)
        pruned = None
        if features:
            pruned = self.prune_visual_tokens(
                input_ids,
                attention_mask,
                features,
                labels=labels,
                position_ids=position_ids,
                instruction_ids=instruction_ids,
                instruction_text=instruction_text,
                relevance_features=relevance_features,
                **kwargs,
            )
        if pruned is not None:
            self.after_prune(pruned)
            input_ids, attention_mask, labels = (
                pruned["input_ids"],
                pruned["attention_mask"],
                pruned["labels"],
            )
            position_ids = pruned["position_ids"]
            kwargs.update({k: pruned[k] for k in self.SEQUENCE_KWARGS if k in pruned})
            pixel_values = None
            mm_encoder_outputs = {"image": PrunedImageFeatures(pooler_output=pruned["features"])}
        elif features is not None and pixel_values is not None:
            pixel_values, mm_encoder_outputs = (
                None,
                {"image": BaseModelOutputWithPooling(pooler_output=features)},
            )
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )

    def generate(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        instruction_ids=None,
        instruction_text=None,
        **kwargs,
    ):
        features = relevance_features = None
        if input_ids is not None and pixel_values is not None:
            features, relevance_features = self._image_features(pixel_values, None, kwargs)
        pruned = features and self.prune_visual_tokens(
            input_ids,
            attention_mask,
            features,
            instruction_ids=instruction_ids,
            instruction_text=instruction_text,
            relevance_features=relevance_features,
            **kwargs,
        )
        if not pruned:
            return super().generate(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs
            )
        for key in self.VISION_KWARGS:
            kwargs.pop(key, None)
        kwargs.update({k: pruned[k] for k in self.SEQUENCE_KWARGS if k in pruned})
        out = super().generate(
            input_ids=pruned["input_ids"],
            attention_mask=pruned["attention_mask"],
            mm_encoder_outputs={"image": PrunedImageFeatures(pooler_output=pruned["features"])},
            **self.pruned_generate_kwargs(pruned),
            **kwargs,
        )
        return with_callers_prompt(out, input_ids, pruned["input_ids"].shape[1])
