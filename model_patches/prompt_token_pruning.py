"""Llama-family causal LMs (Llama, Qwen2, Mistral) that drop prompt tokens inside the prefill, at a chosen layer.

The config of an ``hf_prune_<family>`` checkpoint holds ``token_pruning`` = {algorithm, keep_ratio, layer,
seed, candidate_ratios, retainer_size, temperature}. When a prompt arrives (a forward on an empty or no
cache: ``generate``'s prefill, or a plain forward), decoder layers 0..layer-1 run on every prompt token;
the model then keeps, per row, its first and its last real token and ⌈keep_ratio·n⌉ of the other n real
tokens, and layers layer.. run on those only (``layer: 0`` drops them before the first layer). Which ones:

- ``attention``: the tokens that receive the most attention at layer ``layer - 1`` (mean over heads and
  real queries), in the same pass: that one layer runs with eager attention so its weights exist (as
  FastV); needs ``layer >= 1``;
- ``random``: seeded;
- ``adtp``: the learned retainer (``prompt_retainer.py``, weights in the checkpoint) scores the tokens
  entering layer ``layer`` (the embeddings for layer 0) and its ratio head picks, per prompt, a ratio
  among ``candidate_ratios`` (the argmax) in place of ``keep_ratio``. Trained by
  ``hf_prune.methods.tokens.prompt_retainer_training`` (soft keep masks, see there);
- ``fixed``: the retainer's saliency with ``keep_ratio`` for every prompt.

Kept tokens keep their original rotary positions (the given ``position_ids``, else 0..L-1 as the stock
model numbers them). After the prefill every layer's KV cache holds exactly the kept tokens: the entries
of layers before ``layer`` are cropped to them, rows left-padded to the longest. The cache remembers the
pruned prompt (``PrunedPrompt``), so later steps line up with it: an attention mask over the caller's
whole sequence is cut to the cache, and new tokens continue the original positions per row, as
``generate`` numbers them or, without ``position_ids``, from the last real prompt position + 1. So
decoding attends to the kept tokens in every layer, and ``generate`` returns the caller's prompt followed
by the new tokens. Sliding windows count the entries a layer holds (kept tokens after the cut).

A prefill ``forward`` returns the logits of the kept tokens (``labels`` cut alike, so the loss predicts
the next kept token) and their mask over the input as ``kept_tokens``.

The classes, written out at the end of this file (``auto_map`` names them here): ``HfPruneLlamaConfig`` /
``HfPruneLlamaForCausalLM`` (``hf_prune_llama``), ``HfPruneQwen2*`` and ``HfPruneMistral*``: the stock
classes with ``PromptTokenPruningConfigMixin`` / ``PromptTokenPruningMixin`` in front. The mixin's
``forward`` has the stock causal-LM parameters, so ``generate`` sees the stock signature.

Imports only torch and transformers: ``save_pretrained`` copies this file and the sibling files it imports
(``prompt_prefill.py``, ``prompt_retainer.py``, ``patch_classes.py``) next to the weights as remote code.
"""

from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from .patch_classes import NativeLayoutSaving, register_auto_classes, settings_with_defaults
from .prompt_prefill import (
    PrunedPrompt,
    attention_received,
    gather_tokens,
    kept_tokens,
    layer_masks,
    left_packed_order,
    seeded_scores,
)
from .prompt_retainer import PromptRetainer, chosen_ratios

ALGORITHMS = ("attention", "random", "adtp", "fixed")
LEARNED = ("adtp", "fixed")  # the algorithms with a retainer
DEFAULTS = {
    "algorithm": "attention",
    "keep_ratio": None,
    "layer": 1,
    "seed": 0,
    "candidate_ratios": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
    "retainer_size": 64,
    "temperature": 0.05,
}
#: family -> (stock config class, stock causal-LM class)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def check_settings(settings, num_layers: int | None = None) -> dict:
    """The ``token_pruning`` dict with defaults filled in; ValueError naming the bad key otherwise."""
    merged = settings_with_defaults(settings, DEFAULTS)
    if merged["algorithm"] not in ALGORITHMS:
        raise ValueError(
            f"token_pruning.algorithm: {merged['algorithm']!r} is not one of {', '.join(ALGORITHMS)} "
            "(for causal LMs)"
        )
    ratio = merged["keep_ratio"]
    if not (ratio is None and merged["algorithm"] == "adtp") and (
        isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1
    ):
        raise ValueError(f"token_pruning.keep_ratio: must be in (0, 1], got {ratio!r}")
    candidates = merged["candidate_ratios"]
    if (
        not isinstance(candidates, (list, tuple))
        or not candidates
        or any(isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1 for c in candidates)
    ):
        raise ValueError(
            f"token_pruning.candidate_ratios: must be a non-empty list of ratios in (0, 1], "
            f"got {candidates!r}"
        )
    merged["candidate_ratios"] = sorted({float(c) for c in candidates})
    if type(merged["retainer_size"]) is not int or merged["retainer_size"] < 1:
        raise ValueError(
            f"token_pruning.retainer_size: must be a positive integer, got {merged['retainer_size']!r}"
        )
    temperature = merged["temperature"]
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"token_pruning.temperature: must be > 0, got {temperature!r}")
    layer = merged["layer"]
    if type(layer) is not int or layer < 0 or (num_layers is not None and layer >= num_layers):
        top = f" and below the {num_layers} layers" if num_layers is not None else ""
        raise ValueError(f"token_pruning.layer: must be an integer >= 0{top}, got {layer!r}")
    if merged["algorithm"] == "attention" and layer < 1:
        raise ValueError(
            "token_pruning.layer: attention scores come from the layer before the pruning layer; "
            "use layer >= 1 (or algorithm random)"
        )
    if type(merged["seed"]) is not int or merged["seed"] < 0:
        raise ValueError(f"token_pruning.seed: must be a non-negative integer, got {merged['seed']!r}")
    return merged


def refused_full_forward(class_name: str, settings: dict) -> str:
    """Why a forward on a whole sequence without a cache is refused: clients that score a text that way
    (lm-eval's ``--model hf``, a loss over ``labels``) read logits at every input position, and the
    pruned positions have none."""
    return (
        f"{class_name} prunes its prompt at prefill (token_pruning: {settings['algorithm']} at layer "
        f"{settings['layer']}), so a whole-sequence forward without a cache has no logits at the pruned "
        "positions and is refused. Score it as generate runs it, context pruned at prefill and continuation "
        "through the cache: `hf-prune eval MODEL --task ...`, or `lm_eval --model hf-prune "
        "--model_args pretrained=MODEL`. For a prefill, pass use_cache=True or a cache."
    )


@dataclass
class PrunedCausalLMOutput(CausalLMOutputWithPast):
    """The stock output of a pruned prefill (logits, loss and cache over the kept tokens) plus
    ``kept_tokens`` [B, L] bool: which input tokens the layers from ``layer`` on saw."""

    kept_tokens: torch.Tensor | None = None


class PromptTokenPruningConfigMixin:
    """Mixed in before a stock causal-LM config class: its ``token_pruning`` dict (a field the config class
    declares) is checked against the layer count, defaults filled in, when the config is built."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.token_pruning is not None:
            self.token_pruning = check_settings(self.token_pruning, self.num_hidden_layers)


class PromptTokenPruningMixin(NativeLayoutSaving):
    """Mixed in before a stock causal LM: a prefill that drops prompt tokens at ``layer``, decoding that
    lines up with the pruned cache, and (``adtp`` / ``fixed``) a ``retainer``."""

    def __init__(self, config):
        super().__init__(config)
        settings = check_settings(config.token_pruning or {}, config.num_hidden_layers)
        if settings["algorithm"] in LEARNED:
            self.retainer = new_retainer(config, settings)
            self.post_init()

    @property
    def settings(self) -> dict:
        return check_settings(self.config.token_pruning or {}, self.config.num_hidden_layers)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        cached = cache.get_seq_length() if cache is not None else 0
        if input_ids is not None and inputs_embeds is None and cached == 0:
            if cache is None and use_cache is not True:
                raise ValueError(refused_full_forward(type(self).__name__, self.settings))
            return self._pruned_prefill(
                input_ids,
                attention_mask,
                position_ids,
                cache,
                labels,
                use_cache,
                logits_to_keep,
                **kwargs,
            )
        state = getattr(cache, "pruned_prompt", None)
        if state is not None and cached > 0:
            new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            attention_mask, position_ids = state.decode_inputs(cached, new, attention_mask, position_ids)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def generate(self, *args, **kwargs):
        # The pruned prompt lives in the cache: without one, every step would prune its whole input anew.
        kwargs["use_cache"] = True
        return super().generate(*args, **kwargs)

    def _layers_before_the_cut(self, hidden, mask, positions, cache, use_cache) -> tuple:
        """Layers 0..layer-1 on every prompt token, caching them in ``cache``; (hidden states, the attention
        each token receives at layer - 1 if the algorithm is ``attention``, else None)."""
        split, decoder, scores, captured = self.settings["layer"], self.model, None, {}
        scoring = split - 1 if self.settings["algorithm"] == "attention" else None
        masks = layer_masks(self.config, hidden, mask, positions, range(split), eager_layer=scoring)
        inputs = {
            "position_embeddings": decoder.rotary_emb(hidden, positions),
            "position_ids": positions,
            "cache": cache,
            "use_cache": use_cache,
        }
        for index in range(split):
            layer = decoder.layers[index]
            if index != scoring:
                hidden = layer(hidden, attention_mask=masks[index], **inputs)
                continue
            # That layer alone runs eager attention, the one that returns its weights.
            hook = layer.self_attn.register_forward_hook(
                lambda module, args, output: captured.update(w=output[1])
            )
            previous, self.config._attn_implementation = self.config._attn_implementation, "eager"
            try:
                hidden = layer(hidden, attention_mask=masks[index], **inputs)
            finally:
                self.config._attn_implementation = previous
                hook.remove()
            scores = attention_received(captured["w"], mask)
        return hidden, scores

    def _pruned_prefill(
        self,
        input_ids,
        attention_mask,
        position_ids,
        cache,
        labels,
        use_cache,
        logits_to_keep,
        return_dict=True,
        **kwargs,
    ):
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise ValueError(
                "a prompt-pruning prefill returns no attentions or hidden states (the layers "
                "see different tokens)"
            )
        kwargs = {k: v for k, v in kwargs.items() if k not in ("output_attentions", "output_hidden_states")}
        settings, config, decoder = self.settings, self.config, self.model
        split, layers = settings["layer"], decoder.layers[: config.num_hidden_layers]
        batch, length = input_ids.shape
        mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool()
        if position_ids is None:  # the stock numbering of a prompt on an empty cache
            position_ids = torch.arange(length, device=input_ids.device)
        positions = position_ids.expand(batch, length)
        use_cache = config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        # The layers before the cut cache every prompt token here first; the kept ones move on to `cache`.
        full_cache = DynamicCache() if cache is not None and split > 0 else None
        hidden, scores = self._layers_before_the_cut(
            decoder.embed_tokens(input_ids), mask, positions, full_cache, use_cache
        )
        ratio = settings["keep_ratio"]
        if settings["algorithm"] in LEARNED:
            scores, ratio_logits = self.retainer(hidden, mask)
            ratio = chosen_ratios(settings, ratio_logits)
        elif scores is None:
            scores = seeded_scores(mask, settings["seed"])
        keep = kept_tokens(scores.detach(), mask, ratio)
        order = left_packed_order(keep)
        kept_mask, kept_positions = keep.gather(1, order), positions.gather(1, order)
        hidden = gather_tokens(hidden, order)
        if full_cache is not None:
            for index in range(split):
                entries = full_cache.layers[index]
                cache.update(
                    gather_tokens(entries.keys, order, 2), gather_tokens(entries.values, order, 2), index
                )
        masks = layer_masks(config, hidden, kept_mask, kept_positions, range(split, len(layers)))
        inputs = {
            "position_embeddings": decoder.rotary_emb(hidden, kept_positions),
            "position_ids": kept_positions,
            "cache": cache,
            "use_cache": use_cache,
        }
        for index in range(split, len(layers)):
            hidden = layers[index](hidden, attention_mask=masks[index], **inputs)
        hidden = decoder.norm(hidden)
        logits = self.lm_head(slice_logits_to_keep(hidden, logits_to_keep))
        loss = None
        if labels is not None:
            kept_labels = labels.gather(1, order).masked_fill(~kept_mask, -100)
            loss = self.loss_function(
                logits=logits, labels=kept_labels, vocab_size=config.vocab_size, **kwargs
            )
        if cache is not None:
            next_position = positions.masked_fill(~mask, -1).amax(1) + 1
            cache.pruned_prompt = PrunedPrompt(kept_mask.long(), length, next_position)
        out = PrunedCausalLMOutput(loss=loss, logits=logits, cache=cache, kept_tokens=keep)
        return out if return_dict is not False else out.to_tuple()


def new_retainer(config, settings: dict) -> PromptRetainer:
    """A freshly initialised retainer for a model of ``config`` with these (checked) settings."""
    return PromptRetainer(config.hidden_size, len(settings["candidate_ratios"]), settings["retainer_size"])


class HfPruneLlamaConfig(PromptTokenPruningConfigMixin, LlamaConfig):
    model_type = "hf_prune_llama"
    token_pruning: dict | None = None


class HfPruneLlamaForCausalLM(PromptTokenPruningMixin, LlamaForCausalLM):
    config_class = HfPruneLlamaConfig


class HfPruneQwen2Config(PromptTokenPruningConfigMixin, Qwen2Config):
    model_type = "hf_prune_qwen2"
    token_pruning: dict | None = None


class HfPruneQwen2ForCausalLM(PromptTokenPruningMixin, Qwen2ForCausalLM):
    config_class = HfPruneQwen2Config


class HfPruneMistralConfig(PromptTokenPruningConfigMixin, MistralConfig):
    model_type = "hf_prune_mistral"
    token_pruning: dict | None = None


class HfPruneMistralForCausalLM(PromptTokenPruningMixin, MistralForCausalLM):
    config_class = HfPruneMistralConfig


#: family -> (config class, model class)
CLASSES = {
    "llama": (HfPruneLlamaConfig, HfPruneLlamaForCausalLM),
    "qwen2": (HfPruneQwen2Config, HfPruneQwen2ForCausalLM),
    "mistral": (HfPruneMistralConfig, HfPruneMistralForCausalLM),
}
for _config_class, _model_class in CLASSES.values():
    register_auto_classes(_config_class, _model_class, "AutoModelForCausalLM")
