"""How a visual-token-pruning model scores its visual tokens, mixed into ``VisualTokenPruningMixin``
(``visual_pruning_mixin.py``): the instruction of each image (language-model embeddings of its tokens, or
CLIP text embeddings with a CLIP text tower), the attention each token receives (FastV), and the choice of
the kept tokens within one group of one image (``_choose``, for every algorithm).

``VisualTokenScoring`` is a mixin whose methods run on the model (``self.config``, ``self.model``,
``self.get_input_embeddings()``, and ``has_clip_text_tower`` / ``relevance_text_tower`` from
``ClipTextTowerRelevance``).

Imports only torch and its sibling files: ``save_pretrained`` copies it next to the weights with the
modeling file that imports it.
"""

import torch

from .clip_relevance import clip_text_embeddings
from .token_selection import (
    check_settings,
    cosine_similarity_matrix,
    dpp_greedy_map,
    instruction_relevance,
    pool_grid,
)


class _StopScoring(Exception):
    """Raised by the FastV scoring hook once the scoring layer has run."""


class VisualTokenScoring:
    """The scoring half of ``VisualTokenPruningMixin``: settings, instructions, FastV attention, the
    choice."""

    def _settings(self) -> dict:
        return check_settings(self.config.token_pruning or {})

    def _uses_clip_relevance(self) -> bool:
        return self.has_clip_text_tower() and self._settings()["algorithm"] == "cdpruner"

    def _instruction_ids(self, input_ids, attention_mask, image_mask, runs, instruction_ids) -> list:
        """Instruction token ids per image: the override's row, or the row's text after the image up to the
        next one."""
        pad = self.config.get_text_config().pad_token_id
        if instruction_ids is not None:
            rows = (
                list(instruction_ids)
                if not isinstance(instruction_ids, torch.Tensor) or instruction_ids.dim() > 1
                else [instruction_ids]
            )
            if len(rows) != input_ids.shape[0]:
                raise ValueError(f"instruction_ids has {len(rows)} rows for a batch of {input_ids.shape[0]}")
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
                for ids in self._instruction_ids(input_ids, attention_mask, image_mask, runs, instruction_ids)
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
                raise ValueError(f"instruction_text has {len(rows)} rows for a batch of {input_ids.shape[0]}")
            texts = [rows[row] for row, _ in runs]
        else:
            texts = [
                tokenizers["language"].decode(ids.tolist(), skip_special_tokens=True)
                for ids in self._instruction_ids(input_ids, attention_mask, image_mask, runs, instruction_ids)
            ]
        return [clip_text_embeddings(self.relevance_text_tower, tokenizers["clip"], text) for text in texts]

    def _fastv_received(self, input_ids, attention_mask, features, layer, position_ids=None) -> torch.Tensor:
        """[B, L] attention each position receives at decoder layer ``layer`` (mean over heads and real
        queries)."""
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
                    torch.randperm(group.numel(), generator=generator)[:count].sort().values.to(group.device)
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
