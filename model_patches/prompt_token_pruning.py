"""Llama-family causal LMs that drop prompt tokens before prefill, by themselves (attention / random).

The config of an ``hf_prune_<family>`` checkpoint holds ``token_pruning`` = {algorithm, keep_ratio, layer,
seed}. When a prompt arrives (a forward without cache, or ``generate``), the model keeps its first token
(BOS), its last real token (the one the next token follows) and ⌈keep_ratio·n⌉ of the other n real tokens:

- ``attention``: the tokens that receive the most attention at decoder layer ``layer`` (mean over heads
  and real queries), from one scoring pass over layers 0..layer with eager attention;
- ``random``: seeded.

The kept tokens then go through the whole model as a shorter prompt (positions renumbered 0..L'-1, rows
left-padded), so the cache, the attention mask and ``generate`` stay the stock ones; unlike pruning inside
layer ``layer``, the layers before it see the shorter prompt too. ``forward`` returns the logits of the
kept tokens (``labels`` are cut alike); ``generate`` returns the caller's prompt followed by the new tokens.

Imports only torch and transformers: ``save_pretrained`` copies this file next to the weights as remote code.
"""

import torch

from .patch_classes import (
    NativeLayoutSaving,
    build_and_register,
    build_classes,
    cut_rows,
    settings_with_defaults,
    with_callers_prompt,
)

ALGORITHMS = ("attention", "random")
DEFAULTS = {"algorithm": "attention", "keep_ratio": None, "layer": 1, "seed": 0}
#: family -> (stock config class, stock causal-LM class)
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM")}


def check_settings(settings, num_layers: int | None = None) -> dict:
    """The ``token_pruning`` dict with defaults filled in; ValueError naming the bad key otherwise."""
    merged = settings_with_defaults(settings, DEFAULTS)
    if merged["algorithm"] not in ALGORITHMS:
        raise ValueError(f"token_pruning.algorithm: {merged['algorithm']!r} is not one of {', '.join(ALGORITHMS)} "
                         "(for causal LMs)")
    ratio = merged["keep_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"token_pruning.keep_ratio: must be in (0, 1], got {ratio!r}")
    layer = merged["layer"]
    if type(layer) is not int or layer < 0 or (num_layers is not None and layer >= num_layers):
        raise ValueError(f"token_pruning.layer: must be an integer in [0, {num_layers}), got {layer!r}")
    if type(merged["seed"]) is not int or merged["seed"] < 0:
        raise ValueError(f"token_pruning.seed: must be a non-negative integer, got {merged['seed']!r}")
    return merged


class _StopScoring(Exception):
    pass


def _mixin(stock_model):
    class PromptTokenPruning(NativeLayoutSaving, stock_model):
        @property
        def settings(self) -> dict:
            return check_settings(self.config.token_pruning or {}, self.config.num_hidden_layers)

        @torch.no_grad()
        def _attention_received(self, input_ids, mask) -> torch.Tensor:
            layer, captured = self.settings["layer"], {}

            def hook(module, args, output):
                captured["weights"] = output[1]
                raise _StopScoring

            handle = self.model.layers[layer].self_attn.register_forward_hook(hook)
            previous, self.config._attn_implementation = self.config._attn_implementation, "eager"
            try:
                self.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            except _StopScoring:
                pass
            finally:
                self.config._attn_implementation = previous
                handle.remove()
            weights = captured["weights"].float().mean(dim=1)  # [B, query, key]
            queries = mask.float()[:, :, None]
            return (weights * queries).sum(1) / queries.sum(1).clamp_min(1)

        def prune_prompt(self, input_ids, attention_mask=None, labels=None) -> dict:
            """Cut a left- or right-padded prompt batch; returns the cut ``input_ids``, ``attention_mask``,
            ``labels`` (left-padded) and ``keep`` ([B, L] bool over the input)."""
            settings = self.settings
            mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool()
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            first = positions.masked_fill(~mask, input_ids.shape[1]).amin(1, keepdim=True)
            last = positions.masked_fill(~mask, -1).amax(1, keepdim=True)
            anchors = mask & ((positions == first) | (positions == last))
            eligible = mask & ~anchors
            if settings["algorithm"] == "attention":
                scores = self._attention_received(input_ids, mask.long())
            else:
                scores = torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(settings["seed"]))
                scores = scores.to(input_ids.device)
            counts = torch.ceil(settings["keep_ratio"] * eligible.sum(1) - 1e-6).long()
            order = scores.masked_fill(~eligible, float("-inf")).argsort(dim=1, descending=True)
            ranks = torch.empty_like(order).scatter_(1, order, positions.clone())
            keep = anchors | (eligible & (ranks < counts[:, None]))
            pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
            return {"input_ids": cut_rows(input_ids, keep, pad), "attention_mask": cut_rows(mask.long(), keep, 0),
                    "labels": cut_rows(labels, keep, -100), "keep": keep}

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                    labels=None, **kwargs):
            fresh = cache is None or cache.get_seq_length() == 0
            if input_ids is not None and inputs_embeds is None and fresh and position_ids is None:
                cut = self.prune_prompt(input_ids, attention_mask, labels)
                input_ids, attention_mask, labels = cut["input_ids"], cut["attention_mask"], cut["labels"]
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, inputs_embeds=inputs_embeds, labels=labels, **kwargs)

        def generate(self, input_ids=None, attention_mask=None, **kwargs):
            if input_ids is None or kwargs.get("inputs_embeds") is not None:
                return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            cut = self.prune_prompt(input_ids, attention_mask)
            out = super().generate(input_ids=cut["input_ids"], attention_mask=cut["attention_mask"], **kwargs)
            return with_callers_prompt(out, input_ids, cut["input_ids"].shape[1])

    return PromptTokenPruning


def _build(family: str) -> tuple:
    config_name, model_name = FAMILIES[family]
    return build_classes(family, config_name, model_name, _mixin,
                         lambda settings, config: check_settings(settings, config.num_hidden_layers),
                         "ForCausalLM", __name__)


#: family -> (config class, model class)
CLASSES = build_and_register(FAMILIES, _build, globals(), "AutoModelForCausalLM")
