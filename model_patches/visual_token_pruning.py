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

Imports only torch, transformers and the standard library: ``save_pretrained`` copies this file next to
the weights, so ``AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)`` works
without hf_prune. Importing it registers the classes with the Auto classes.
"""

import inspect

import torch

from .clip_relevance import (
    ClipTextTowerRelevance,
    ProjectorInputCapture,
    clip_patch_embeddings,
    clip_text_embeddings,
)
from .patch_classes import (
    NativeLayoutSaving,
    build_and_register,
    build_classes,
    cut_rows,
    with_callers_prompt,
)
from .token_selection import (
    check_settings,
    cosine_similarity_matrix,
    dpp_greedy_map,
    instruction_relevance,
    kept_count,
    pool_grid,
    square_grid,
)

#: family -> (stock config class, stock model class)
FAMILIES = {
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration"),
    "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
}


# ---- the model side --------------------------------------------------------------------------------


class _StopScoring(Exception):
    """Raised by the FastV scoring hook once the scoring layer has run."""


def _image_runs(image_mask: torch.Tensor, counts: list[int]) -> list[tuple[int, torch.Tensor]]:
    """(row, positions) of each image's placeholder block, images in row-major order."""
    flat = torch.nonzero(image_mask.reshape(-1)).squeeze(1)
    if flat.numel() != sum(counts):
        raise ValueError(
            f"the input has {flat.numel()} image tokens but the images give {sum(counts)} features "
            f"({len(counts)} images): each image needs exactly one image placeholder in the text, "
            "expanded by the processor"
        )
    width = image_mask.shape[1]
    runs, start = [], 0
    for count in counts:
        positions = flat[start : start + count]
        start += count
        row = int(positions[0]) // width
        if int(positions[-1]) // width != row:
            raise ValueError("an image's placeholder tokens span two rows of the batch")
        runs.append((row, positions - row * width))
    return runs


def _mixin(stock_model):
    """The token-pruning model class over ``stock_model`` (LlavaForConditionalGeneration or LLaVA-NeXT's)."""
    from dataclasses import dataclass

    from transformers.modeling_outputs import BaseModelOutputWithPooling

    @dataclass
    class PrunedImageFeatures(BaseModelOutputWithPooling):
        """Image features already cut to the budget: ``forward`` passes them on as they are."""

    class TokenPruning(ClipTextTowerRelevance, NativeLayoutSaving, stock_model):
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

        def _settings(self) -> dict:
            return check_settings(self.config.token_pruning or {})

        def _uses_clip_relevance(self) -> bool:
            return self.has_clip_text_tower() and self._settings()["algorithm"] == "cdpruner"

        def _image_features(
            self, pixel_values, mm_encoder_outputs, kwargs
        ) -> tuple[list | None, list | None]:
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

        def _full_position_ids(self, input_ids, attention_mask, kwargs):
            """Position ids of the uncut sequence, when the family's positions are not simply 0..L-1 (LLaVA: None:
            the cut sequence is numbered afresh)."""
            return None

        def _after_prune(self, pruned: dict) -> None:
            """Bookkeeping once ``forward`` has cut a batch (nothing for LLaVA)."""

        def _generation_kwargs(self, pruned: dict) -> dict:
            """Extra keyword arguments for the stock ``generate`` on the cut prompt."""
            return {}

        def _instruction_ids(self, input_ids, attention_mask, image_mask, runs, instruction_ids) -> list:
            """Instruction token ids per image: the override's row, or the row's text after the image up to the next one."""
            pad = self.config.get_text_config().pad_token_id
            if instruction_ids is not None:
                rows = (
                    list(instruction_ids)
                    if not isinstance(instruction_ids, torch.Tensor) or instruction_ids.dim() > 1
                    else [instruction_ids]
                )
                if len(rows) != input_ids.shape[0]:
                    raise ValueError(
                        f"instruction_ids has {len(rows)} rows for a batch of {input_ids.shape[0]}"
                    )
                rows = [torch.as_tensor(r, device=input_ids.device) for r in rows]
                rows = [r[r != pad] if pad is not None else r for r in rows]
                return [rows[row] for row, _ in runs]
            real = (
                attention_mask.bool()
                if attention_mask is not None
                else torch.ones_like(input_ids, dtype=torch.bool)
            )
            text = real & ~image_mask
            out = []
            for i, (row, positions) in enumerate(runs):
                end = next((p[0] for r, p in runs[i + 1 :] if r == row), input_ids.shape[1])
                after = torch.arange(int(positions[-1]) + 1, int(end), device=input_ids.device)
                out.append(input_ids[row, after[text[row, after]]])
            return out

        def _instructions(
            self, input_ids, attention_mask, image_mask, runs, instruction_ids, instruction_text
        ) -> list:
            """Instruction embeddings per image: the language model's input embeddings of its tokens, or (with a
            CLIP text tower) CLIP text embeddings of its text, given as ``instruction_text`` or decoded."""
            if not self._uses_clip_relevance():
                if instruction_text is not None:
                    raise ValueError(
                        "instruction_text needs a checkpoint with a CLIP text tower (text_tower in the "
                        "recipe); pass instruction_ids instead"
                    )
                embed = self.get_input_embeddings()
                return [
                    embed(ids)
                    for ids in self._instruction_ids(
                        input_ids, attention_mask, image_mask, runs, instruction_ids
                    )
                ]
            tokenizers = getattr(self, "relevance_tokenizers", None)
            if tokenizers is None:
                raise ValueError(
                    "this model scores relevance with a CLIP text tower but has no tokenizers for it: "
                    "call set_relevance_tokenizers(language_tokenizer, clip_tokenizer)"
                )
            if instruction_text is not None:
                rows = [instruction_text] if isinstance(instruction_text, str) else list(instruction_text)
                if len(rows) != input_ids.shape[0]:
                    raise ValueError(
                        f"instruction_text has {len(rows)} rows for a batch of {input_ids.shape[0]}"
                    )
                texts = [rows[row] for row, _ in runs]
            else:
                texts = [
                    tokenizers["language"].decode(ids.tolist(), skip_special_tokens=True)
                    for ids in self._instruction_ids(
                        input_ids, attention_mask, image_mask, runs, instruction_ids
                    )
                ]
            return [
                clip_text_embeddings(self.relevance_text_tower, tokenizers["clip"], text) for text in texts
            ]

        def _fastv_received(
            self, input_ids, attention_mask, features, layer, position_ids=None
        ) -> torch.Tensor:
            """[B, L] attention each position receives at decoder layer ``layer`` (mean over heads and real queries)."""
            language_model = self.model.language_model
            if layer >= len(language_model.layers):
                raise ValueError(
                    f"token_pruning.fastv_layer: {layer} is past the last decoder layer "
                    f"({len(language_model.layers) - 1})"
                )
            embeds = self.get_input_embeddings()(input_ids)
            image_mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(image_mask, torch.cat(features).to(embeds.dtype))
            captured = {}

            def hook(module, args, output):
                captured["weights"] = output[1]
                raise _StopScoring

            text_config = language_model.config
            previous = text_config._attn_implementation
            handle = language_model.layers[layer].self_attn.register_forward_hook(hook)
            text_config._attn_implementation = "eager"  # scores exist only with eager attention
            try:
                language_model(
                    inputs_embeds=embeds,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=False,
                )
            except _StopScoring:
                pass
            finally:
                text_config._attn_implementation = previous
                handle.remove()
            weights = captured["weights"].float().mean(dim=1)  # [B, query, key]
            queries = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).float()
            return (weights * queries[:, :, None]).sum(dim=1) / queries.sum(dim=1, keepdim=True).clamp_min(1)

        def _choose(
            self,
            features: torch.Tensor,
            group: torch.Tensor,
            grid,
            count: int,
            settings: dict,
            instruction,
            received,
            generator,
            relevance_space=None,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """(indices kept within ``group``, their features) for one group of one image; the scores carry no
            gradient, the kept (or pooled) features do. ``relevance_space``: the image's tokens in the space of
            ``instruction`` (CLIP's), when not the features' own."""
            tokens = features[group]
            algorithm = settings["algorithm"]
            if algorithm == "pooling":
                return torch.arange(count, device=group.device), pool_grid(tokens, grid, count)
            with torch.no_grad():
                if algorithm == "random":
                    keep = (
                        torch.randperm(group.numel(), generator=generator)[:count]
                        .sort()
                        .values.to(group.device)
                    )
                elif algorithm == "fastv":
                    keep = received[group].topk(count).indices.sort().values
                else:
                    space = tokens if relevance_space is None else relevance_space[group]
                    relevance = (
                        instruction_relevance(space, instruction, settings["relevance_sign"])
                        if algorithm == "cdpruner"
                        else torch.ones(group.numel(), device=tokens.device)
                    )
                    kernel = relevance[:, None] * cosine_similarity_matrix(tokens) * relevance[None, :]
                    keep = dpp_greedy_map(kernel[None], count)[0]
            return keep, tokens[keep]

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
            CLIP text tower. ``kwargs``: the family's vision and sequence keyword arguments (``image_sizes``, ``image_grid_thw``,
            ``mm_token_type_ids``...). Returns ``input_ids``, ``attention_mask``, ``labels``, ``position_ids`` (the
            given or the family's own, cut; None for LLaVA without given ones), the cut ``SEQUENCE_KWARGS``,
            ``features`` (the kept features per image), ``keep`` ([B, L] bool over the input) and ``kept_tokens``.
            """
            settings = self._settings()
            image_mask = input_ids == self.config.image_token_id
            runs = _image_runs(image_mask, [f.shape[0] for f in features])
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
                position_ids = self._full_position_ids(input_ids, attention_mask, kwargs)
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
                **{
                    k: cut_rows(kwargs[k], keep, 0) for k in self.SEQUENCE_KWARGS if kwargs.get(k) is not None
                },
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
            features = relevance_features = None
            done = bool(mm_encoder_outputs) and isinstance(
                mm_encoder_outputs.get("image"), PrunedImageFeatures
            )
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
                self._after_prune(pruned)
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
                **self._generation_kwargs(pruned),
                **kwargs,
            )
            return with_callers_prompt(out, input_ids, pruned["input_ids"].shape[1])

    # generate() checks its keyword arguments against forward's signature: show the stock one plus ours.
    stock = inspect.signature(stock_model.forward)
    parameters = list(stock.parameters.values())
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
        for name in ("instruction_ids", "instruction_text")
    ]
    TokenPruning.forward.__signature__ = stock.replace(parameters=[*parameters[:-1], *extra, parameters[-1]])
    return TokenPruning


def build_family(family: str, families: dict, mixin, module: str) -> tuple:
    """(config class, model class) of ``hf_prune_<family>`` for an image-text-to-text family of ``families``."""
    config_name, model_name = families[family]
    return build_classes(
        family,
        config_name,
        model_name,
        mixin,
        lambda settings, config: check_settings(settings),
        "ForConditionalGeneration",
        module,
    )


#: family -> (config class, model class). `import hf_prune` imports this module, and so does transformers
#: when it loads the copy saved as remote code.
CLASSES = build_and_register(
    FAMILIES,
    lambda family: build_family(family, FAMILIES, _mixin, __name__),
    globals(),
    "AutoModelForImageTextToText",
)
