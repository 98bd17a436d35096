"""LLaVA-style models that drop visual tokens before the language model, by themselves.

The config of an ``hf_prune_<family>`` checkpoint holds a ``token_pruning`` dict; the model keeps, per
image (LLaVA) or per crop (LLaVA-NeXT), ``budget`` of its visual tokens (or ``keep_ratio`` of them) and
removes the others from the sequence before the first language-model layer, in ``forward`` and in
``generate``. Algorithms (``algorithm``):

- ``cdpruner`` (CDPruner, NeurIPS 2025): kernel L = diag(r)·S·diag(r), S the cosine similarity of the
  projected visual features, r the instruction relevance of each token (mean cosine between the token
  and the language model's input embeddings of the instruction tokens, min-max normalised; ``relevance_sign:
  negative`` flips the cosine, as the official code does with CLIP), then greedy MAP inference of the DPP.
  With a CLIP text tower in the checkpoint (``relevance_text_tower``, see ``clip_relevance.py``) the
  relevance is measured in CLIP's joint space instead, as in the paper;
- ``diversity``: the same DPP with r ≡ 1 (DivPrune-style, no instruction);
- ``random``: a seeded uniform choice;
- ``pooling``: the visual features average-pooled on their spatial grid down to the budget;
- ``fastv``: the tokens that receive the most attention (mean over heads and non-pad queries) at decoder
  layer ``fastv_layer``, from one scoring pass over the full sequence with eager attention up to that
  layer. Unlike FastV, which keeps every token in the first layers, all layers then see the kept tokens.

Kept tokens stay in their original order. ``input_ids`` placeholders, ``attention_mask``, ``labels`` and
given ``position_ids`` are cut the same way, so logits (and the loss) are those of the shorter sequence:
positions are renumbered contiguously (the stock behaviour of a shorter prompt). Rows that lose different
numbers of tokens are left-padded. The instruction is the text after each image in its row (up to the next
image), or ``instruction_ids`` when given (one 1-D tensor per row, or a [B, M] tensor; pad ids ignored), or,
with a CLIP text tower, ``instruction_text`` (one string per row).
``generate`` prunes once, then runs the stock loop on the shorter prompt; the returned sequences start
with the caller's own ``input_ids``.

The classes, written out here (``auto_map`` names them in this module): ``HfPruneLlavaConfig`` /
``HfPruneLlavaForConditionalGeneration`` (``hf_prune_llava``) and ``HfPruneLlavaNextConfig`` /
``HfPruneLlavaNextForConditionalGeneration`` (``hf_prune_llava_next``), each the stock class with a mixin
from ``visual_pruning_mixin.py`` in front. Each model class spells out the stock ``forward`` signature
plus ``instruction_ids`` / ``instruction_text``: ``generate`` refuses keyword arguments that ``forward``'s
signature does not name, and reads it to decide whether to pass ``logits_to_keep`` and
``mm_encoder_outputs``.

Imports only torch, transformers and its sibling files: ``save_pretrained`` copies this file and the ones
it imports (``visual_pruning_mixin.py``, ``visual_token_scoring.py``, ``token_selection.py``,
``clip_relevance.py``, ``patch_classes.py``) next to the weights, so
``AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)`` works without hf_prune.
Importing it registers the classes with the Auto classes.
"""

from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from .patch_classes import register_auto_classes
from .visual_pruning_mixin import VisualTokenPruningConfigMixin, VisualTokenPruningMixin

#: family -> (stock config class, stock model class)
FAMILIES = {
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration"),
    "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
}


class HfPruneLlavaConfig(VisualTokenPruningConfigMixin, LlavaConfig):
    model_type = "hf_prune_llava"
    token_pruning: dict | None = None


class HfPruneLlavaForConditionalGeneration(VisualTokenPruningMixin, LlavaForConditionalGeneration):
    config_class = HfPruneLlavaConfig

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        labels=None,
        logits_to_keep=0,
        image_sizes=None,
        mm_encoder_outputs=None,
        *,
        instruction_ids=None,
        instruction_text=None,
        **kwargs,
    ):
        """``LlavaForConditionalGeneration.forward``'s parameters plus the instruction overrides."""
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
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            logits_to_keep=logits_to_keep,
            image_sizes=image_sizes,
            **kwargs,
        )


class HfPruneLlavaNextConfig(VisualTokenPruningConfigMixin, LlavaNextConfig):
    model_type = "hf_prune_llava_next"
    token_pruning: dict | None = None


class HfPruneLlavaNextForConditionalGeneration(VisualTokenPruningMixin, LlavaNextForConditionalGeneration):
    config_class = HfPruneLlavaNextConfig

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        image_sizes=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        mm_encoder_outputs=None,
        *,
        instruction_ids=None,
        instruction_text=None,
        **kwargs,
    ):
        """``LlavaNextForConditionalGeneration.forward``'s parameters plus the instruction overrides."""
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
            image_sizes=image_sizes,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


#: family -> (config class, model class). `import hf_prune` imports this module, and so does transformers
#: when it loads the copy saved as remote code.
CLASSES = {
    "llava": (HfPruneLlavaConfig, HfPruneLlavaForConditionalGeneration),
    "llava_next": (HfPruneLlavaNextConfig, HfPruneLlavaNextForConditionalGeneration),
}
for _config_class, _model_class in CLASSES.values():
    register_auto_classes(_config_class, _model_class, "AutoModelForImageTextToText")
