"""BERT-family classifiers (BERT, RoBERTa, DistilBERT) that drop tokens by themselves at a chosen layer
(AD-TP and baselines).

The config of an ``hf_prune_bert`` (``_roberta``, ``_distilbert``) checkpoint holds a ``token_pruning``
dict. Up to layer ``layer`` the encoder sees every token; there the model keeps, per sequence, the special
tokens ([CLS], [SEP]) and the top ⌈ρ·n⌉ of the other n real tokens by a score, and runs the remaining
layers on that shorter sequence (order kept, right padding). ``layer: 0`` prunes the embeddings, as the
AD-TP paper does. Algorithms:

- ``adtp``: the scores come from the retainer's saliency head and ρ from its ratio head, which picks one of
  ``candidate_ratios`` per sequence from the pooled hidden state at the pruning layer ([CLS] and the mean
  of the real tokens): the ratio adapts to each sequence. Trained with ``hf_prune.integrations``;
- ``fixed``: the retainer's saliency with one ratio, ``keep_ratio``, for every sequence;
- ``attention``: the attention each token receives at layer ``layer - 1`` (mean over heads and real
  queries; that layer runs with eager attention), ``keep_ratio`` for every sequence;
- ``random``: seeded, ``keep_ratio`` for every sequence.

The ratio head predicts, per sequence and candidate ratio, the cost of pruning there (1 − the pruned
model's probability of the unpruned model's answer); the sequence takes the candidate with
the lowest predicted cost + ``price``·ratio, where ``price`` (a buffer of the retainer) is set by training
so that the mean chosen ratio meets the target. In training mode ``adtp`` keeps every token and turns the
choice into a soft mask instead (see ``soft_keep``), so the task loss reaches the saliency head;
``forward(keep_ratios=...)`` prunes hard at given ratios in any mode (training scores each candidate that
way). Outputs carry ``kept_fraction`` (kept real tokens / real tokens, per sequence), ``chosen_ratio``,
``saliency``, ``predicted_costs`` and ``ratio_logits`` for training and measurement.

The classes, written out at the end of this file (``auto_map`` names them here): ``HfPruneBertConfig`` /
``HfPruneBertForSequenceClassification`` (``hf_prune_bert``), and the same for RoBERTa
(``HfPruneRoberta*``) and DistilBERT (``HfPruneDistilBert*``): the stock classes with
``TextTokenPruningConfigMixin`` / ``TextTokenPruningMixin`` in front. Each model class names the
attribute holding its encoder (``encoder_attr``) and its stock class (``stock_class``: the same model
without token pruning, the AD-TP teacher).

Imports only torch and transformers (and ``patch_classes.py``): ``save_pretrained`` copies this file and
``patch_classes.py`` next to the weights, so
``AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)`` works without hf_prune.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from .patch_classes import NativeLayoutSaving, register_auto_classes, settings_with_defaults

ALGORITHMS = ("adtp", "fixed", "attention", "random")
DEFAULTS = {
    "algorithm": "adtp",
    "layer": 0,
    "keep_ratio": None,
    "candidate_ratios": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
    "retainer_size": 64,
    "temperature": 0.05,
    "seed": 0,
    "special_token_ids": [],
}
#: family -> (stock config class, stock classifier class, attribute holding the encoder model)
FAMILIES = {
    "bert": ("BertConfig", "BertForSequenceClassification", "bert"),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", "roberta"),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", "distilbert"),
}


def check_settings(
    settings, num_layers: int | None = None, *, attention_from_previous_layer: bool = True
) -> dict:
    """The ``token_pruning`` dict with defaults filled in; ValueError naming the bad key otherwise.
    (``attention_from_previous_layer=False`` skips the check that ``attention`` prunes at layer >= 1.)"""
    merged = settings_with_defaults(settings, DEFAULTS)
    algorithm, ratio, layer = merged["algorithm"], merged["keep_ratio"], merged["layer"]
    if algorithm not in ALGORITHMS:
        raise ValueError(f"token_pruning.algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if algorithm != "adtp" and ratio is None:
        raise ValueError(f"token_pruning.keep_ratio: {algorithm} needs a retention ratio in (0, 1]")
    if ratio is not None and (
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
            f"token_pruning.candidate_ratios: must be a non-empty list of ratios in (0, 1], got {candidates!r}"
        )
    merged["candidate_ratios"] = sorted({float(c) for c in candidates})
    if type(layer) is not int or layer < 0 or (num_layers is not None and layer >= num_layers):
        top = f" and below the {num_layers} layers" if num_layers is not None else ""
        raise ValueError(f"token_pruning.layer: must be an integer >= 0{top}, got {layer!r}")
    if algorithm == "attention" and layer < 1 and attention_from_previous_layer:
        raise ValueError("token_pruning.layer: attention scores come from the layer before; use layer >= 1")
    for key in ("retainer_size", "seed"):
        if type(merged[key]) is not int or merged[key] < (1 if key == "retainer_size" else 0):
            raise ValueError(
                f"token_pruning.{key}: must be a {'positive' if key == 'retainer_size' else 'non-negative'} "
                f"integer, got {merged[key]!r}"
            )
    specials = merged["special_token_ids"]
    if not isinstance(specials, (list, tuple)) or any(type(i) is not int for i in specials):
        raise ValueError(f"token_pruning.special_token_ids: must be a list of token ids, got {specials!r}")
    merged["special_token_ids"] = sorted(set(specials))
    if not isinstance(merged["temperature"], (int, float)) or merged["temperature"] <= 0:
        raise ValueError(f"token_pruning.temperature: must be > 0, got {merged['temperature']!r}")
    return merged


class TokenRetainer(nn.Module):
    """AD-TP's retainer: a per-token saliency head, and a per-sequence ratio head that predicts, for each
    candidate ratio, the cost of pruning there (1 − the pruned model's probability of the unpruned model's
    answer); the sequence takes the candidate with the lowest predicted cost + ``price``·ratio (training
    sets ``price`` so that the mean chosen ratio meets its target; NaN until then)."""

    def __init__(self, hidden_size: int, num_ratios: int, size: int):
        super().__init__()
        self.saliency = nn.Sequential(nn.Linear(hidden_size, size), nn.GELU(), nn.Linear(size, 1))
        self.ratio = nn.Sequential(nn.Linear(2 * hidden_size, size), nn.GELU(), nn.Linear(size, num_ratios))
        self.register_buffer(
            "price", torch.zeros(())
        )  # set by training (a budget constraint), not learned by gradient

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(saliency [B, L], predicted costs [B, R]) from hidden states [B, L, H] and the real-token mask [B, L]."""
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
        return self.saliency(hidden).squeeze(-1), self.ratio(torch.cat([hidden[:, 0], mean], dim=-1))


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, L] additive attention bias: 0 where ``keep`` (bool, or a probability), very negative elsewhere."""
    if keep.dtype == torch.bool:
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
            ~keep, torch.finfo(dtype).min
        )[:, None, None]
    return torch.log(keep.to(dtype).clamp_min(torch.finfo(dtype).tiny))[:, None, None]


def top_fraction(scores: torch.Tensor, eligible: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: in each row, the ⌈ratio·n⌉ highest-scoring eligible positions (n eligible ones)."""
    counts = torch.ceil(ratios * eligible.sum(1) - 1e-6).long()
    order = scores.masked_fill(~eligible, float("-inf")).argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return eligible & (ranks < counts[:, None])


def soft_keep(
    saliency: torch.Tensor, eligible: torch.Tensor, ratio: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Training: p_i = σ((s_i − q)/T), q the score at rank ρ·n among the eligible tokens (interpolated
    between neighbouring ranks), so the task loss reaches the saliency head through s."""
    sorted_scores = saliency.masked_fill(~eligible, float("-inf")).sort(dim=1, descending=True).values
    n = eligible.sum(1).clamp_min(1)
    position = (ratio * n - 1).clamp(min=0)
    low = position.floor().long().clamp(max=sorted_scores.shape[1] - 1)
    high = (low + 1).clamp(max=(n - 1))
    frac = position - low
    threshold = (1 - frac) * sorted_scores.gather(1, low[:, None])[:, 0] + frac * sorted_scores.gather(
        1, high[:, None]
    )[:, 0]
    threshold = torch.where(ratio >= 1, torch.full_like(threshold, float("-inf")), threshold)
    return torch.sigmoid((saliency - threshold[:, None]) / temperature)


@dataclass
class PrunedClassifierOutput(SequenceClassifierOutput):
    """The stock classifier output plus the pruning measurements: ``kept_fraction`` [B] (kept real tokens
    over real tokens), ``chosen_ratio`` [B] (the ratio each sequence was pruned at; 1 when nothing was
    pruned), ``saliency`` [B, L], ``predicted_costs`` [B, R] (the ratio head's cost estimate per candidate
    ratio) and ``ratio_logits`` [B, R] (−(predicted cost + price·ratio): the argmax is adtp's choice)."""

    kept_fraction: torch.Tensor | None = None
    chosen_ratio: torch.Tensor | None = None
    saliency: torch.Tensor | None = None
    predicted_costs: torch.Tensor | None = None
    ratio_logits: torch.Tensor | None = None


# ---- what differs between the families: where the layers sit, how they embed, attend and classify ----


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """BERT / RoBERTa: ``encoder.layer``; DistilBERT: ``transformer.layer``."""
    return encoder.transformer.layer if hasattr(encoder, "transformer") else encoder.encoder.layer


def self_attention(layer: nn.Module) -> nn.Module:
    """The module returning (output, attention weights): ``attention.self`` (BERT) or ``attention`` (DistilBERT)."""
    return getattr(layer.attention, "self", layer.attention)


def embed(encoder: nn.Module, input_ids, token_type_ids, position_ids, inputs_embeds) -> torch.Tensor:
    """The embeddings' output; DistilBERT has no token types (ignored there, as its stock forward does)."""
    input_ids = None if inputs_embeds is not None else input_ids
    if hasattr(encoder, "transformer"):
        return encoder.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids)
    return encoder.embeddings(
        input_ids=input_ids,
        token_type_ids=token_type_ids,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
    )


def classify(model: nn.Module, encoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the last hidden states, as each stock classifier computes them from the first token."""
    if getattr(model, "pre_classifier", None) is not None:  # DistilBERT: linear, ReLU, dropout, linear
        return model.classifier(model.dropout(F.relu(model.pre_classifier(hidden[:, 0]))))
    if getattr(encoder, "pooler", None) is not None:  # BERT: pooler on [CLS], dropout, linear
        return model.classifier(model.dropout(encoder.pooler(hidden)))
    return model.classifier(hidden)  # RoBERTa: its classification head reads the first token itself


class TextTokenPruningConfigMixin:
    """Mixed in before a stock encoder config class: its ``token_pruning`` dict (a field the config class
    declares) is checked against the layer count, defaults filled in, when the config is built."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.token_pruning is not None:
            self.token_pruning = check_settings(self.token_pruning, self.num_hidden_layers)


class TextTokenPruningMixin(NativeLayoutSaving):
    """Mixed in before a stock sequence classifier: a ``retainer`` and a forward that drops tokens at
    ``layer``. A model class sets ``encoder_attr`` (the attribute holding the encoder: ``bert``...) and
    ``stock_class`` (the stock classifier it extends)."""

    encoder_attr: str
    stock_class: type

    def __init__(self, config):
        super().__init__(config)
        settings = check_settings(config.token_pruning or {}, config.num_hidden_layers)
        self.retainer = TokenRetainer(
            config.hidden_size, len(settings["candidate_ratios"]), settings["retainer_size"]
        )
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, TokenRetainer):  # "not set": a checkpoint saved without a price has none
            with torch.no_grad():
                module.price.fill_(float("nan"))

    @property
    def settings(self) -> dict:
        return check_settings(self.config.token_pruning or {}, self.config.num_hidden_layers)

    def _special(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: the tokens always kept, the first one (the [CLS] the classifier reads) and every
        ``special_token_ids`` ([SEP]...)."""
        ids = torch.tensor(self.settings["special_token_ids"], dtype=input_ids.dtype, device=input_ids.device)
        special = torch.isin(input_ids, ids)
        special[:, 0] = True
        return special

    def _run_layer(self, layer: nn.Module, hidden, bias, capture_attention: bool = False):
        if not capture_attention:
            return layer(hidden, bias), None
        captured = {}

        def hook(module, args, output):
            captured["w"] = output[1]

        handle = self_attention(layer).register_forward_hook(hook)
        previous, self.config._attn_implementation = self.config._attn_implementation, "eager"
        try:
            return layer(hidden, bias), captured["w"]
        finally:
            self.config._attn_implementation = previous
            handle.remove()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        keep_ratios=None,
        **kwargs,
    ):
        """The stock forward with tokens dropped at ``layer``; ``keep_ratios`` ([B], optional) prunes
        each sequence hard at that ratio with the retainer's saliency, in any mode (training scores
        each candidate ratio this way)."""
        settings = self.settings
        algorithm = settings["algorithm"]
        encoder = getattr(self, self.encoder_attr)
        if keep_ratios is not None and algorithm in ("attention", "random"):
            raise ValueError(f"keep_ratios: {algorithm} has no retainer saliency to rank tokens by")
        if input_ids is None:
            raise ValueError("token pruning needs input_ids (to find the special tokens it always keeps)")
        mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool()
        hidden = embed(encoder, input_ids, token_type_ids, position_ids, inputs_embeds)
        bias = additive_mask(mask, hidden.dtype)
        special = self._special(input_ids) & mask
        eligible = mask & ~special
        kept_fraction = torch.ones(input_ids.shape[0], device=hidden.device)
        saliency = predicted_costs = ratio_logits = attention = None
        rho = torch.ones(input_ids.shape[0], device=hidden.device)
        ratios = torch.tensor(settings["candidate_ratios"], device=hidden.device)
        for index, layer in enumerate(encoder_layers(encoder)):
            if index == settings["layer"]:
                saliency, predicted_costs = self.retainer(hidden, mask)
                if algorithm == "adtp" and keep_ratios is None and torch.isnan(self.retainer.price):
                    raise ValueError(
                        "adtp: the retainer has no price (retainer.price): its ratio head was saved "
                        "before ratio heads predicted costs, or never trained; train it again"
                    )
                ratio_logits = -(
                    predicted_costs + self.retainer.price * ratios
                )  # argmax: the cheapest choice
                if algorithm == "adtp" and self.training and keep_ratios is None:
                    # At the ratio inference would pick; the ratio head learns from per-candidate costs
                    # (see hf_prune.integrations), not through this mask.
                    rho = ratios[ratio_logits.argmax(-1)]
                    keep_p = soft_keep(saliency, eligible, rho, settings["temperature"])
                    keep_p = torch.where(eligible, keep_p, mask.to(saliency.dtype))
                    bias = additive_mask(keep_p, hidden.dtype) + additive_mask(mask, hidden.dtype)
                    kept_fraction = (keep_p * mask).sum(1) / mask.sum(1)
                else:
                    if keep_ratios is not None:
                        rho = torch.as_tensor(keep_ratios, dtype=rho.dtype, device=hidden.device).expand_as(
                            rho
                        )
                    elif algorithm == "adtp":
                        rho = ratios[ratio_logits.argmax(-1)]
                    else:
                        rho = torch.full_like(rho, settings["keep_ratio"])
                    scores = {
                        "adtp": saliency,
                        "fixed": saliency,
                        "attention": attention,
                        "random": torch.rand(
                            mask.shape, generator=torch.Generator().manual_seed(settings["seed"])
                        ).to(hidden.device),
                    }[algorithm]
                    keep = special | top_fraction(scores.detach(), eligible, rho)
                    kept_fraction = keep.sum(1) / mask.sum(1)
                    width = int(keep.sum(1).max())
                    order = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]
                    hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
                    mask = keep.gather(1, order)
                    bias = additive_mask(mask, hidden.dtype)
            capture = algorithm == "attention" and index == settings["layer"] - 1
            hidden, weights = self._run_layer(layer, hidden, bias, capture)
            if weights is not None:  # [B, heads, query, key] -> attention each key receives
                queries = mask.to(weights.dtype)[:, None, :, None]
                attention = (weights * queries).sum(dim=(1, 2)) / (
                    queries.sum(dim=(1, 2)) * weights.shape[1]
                ).clamp_min(1)
        logits = classify(self, encoder, hidden)
        loss = None
        if labels is not None:
            loss = (
                F.mse_loss(logits.squeeze(-1), labels.float())
                if self.num_labels == 1
                else F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            )
        return PrunedClassifierOutput(
            loss=loss,
            logits=logits,
            kept_fraction=kept_fraction,
            chosen_ratio=rho,
            saliency=saliency,
            predicted_costs=predicted_costs,
            ratio_logits=ratio_logits,
        )


class HfPruneBertConfig(TextTokenPruningConfigMixin, BertConfig):
    model_type = "hf_prune_bert"
    token_pruning: dict | None = None


class HfPruneBertForSequenceClassification(TextTokenPruningMixin, BertForSequenceClassification):
    config_class = HfPruneBertConfig
    encoder_attr = "bert"
    stock_class = BertForSequenceClassification


class HfPruneRobertaConfig(TextTokenPruningConfigMixin, RobertaConfig):
    model_type = "hf_prune_roberta"
    token_pruning: dict | None = None


class HfPruneRobertaForSequenceClassification(TextTokenPruningMixin, RobertaForSequenceClassification):
    config_class = HfPruneRobertaConfig
    encoder_attr = "roberta"
    stock_class = RobertaForSequenceClassification


class HfPruneDistilBertConfig(TextTokenPruningConfigMixin, DistilBertConfig):
    model_type = "hf_prune_distilbert"
    token_pruning: dict | None = None


class HfPruneDistilBertForSequenceClassification(TextTokenPruningMixin, DistilBertForSequenceClassification):
    config_class = HfPruneDistilBertConfig
    encoder_attr = "distilbert"
    stock_class = DistilBertForSequenceClassification


#: family -> (config class, model class)
CLASSES = {
    "bert": (HfPruneBertConfig, HfPruneBertForSequenceClassification),
    "roberta": (HfPruneRobertaConfig, HfPruneRobertaForSequenceClassification),
    "distilbert": (HfPruneDistilBertConfig, HfPruneDistilBertForSequenceClassification),
}
for _config_class, _model_class in CLASSES.values():
    register_auto_classes(_config_class, _model_class, "AutoModelForSequenceClassification")
