"""Text token pruning (AD-TP and baselines): the setting is saved into the checkpoint.

Classifiers: BERT, RoBERTa and DistilBERT (``*ForSequenceClassification``).

Two kinds of model: BERT-family classifiers (below), and Llama-family causal LMs, whose prompts lose
tokens inside the prefill at decoder layer ``layer`` (``model_patches/prompt_token_pruning.py``: all four
algorithms; layers before it see every prompt token, the KV cache then holds the kept ones in every
layer). For causal LMs ``adtp`` / ``fixed`` train their retainer on a plain text file (``train_data``) cut
into windows of a prompt and ``continuation_length`` tokens after it, the loss being the continuation's
NLL after the softly pruned prompt (``prompt_retainer_training.py`` in this package).

The stage turns the classifier into an ``hf_prune_bert`` (``_roberta``, ``_distilbert``) model
(``model_patches/text_token_pruning.py``) with a retainer (saliency and ratio heads) and the
``token_pruning`` settings in its config, so the saved checkpoint drops tokens by itself. ``adtp`` and
``fixed`` need a trained retainer: give ``train_data`` and the stage's ``finalize`` trains it with
``transformers.Trainer`` (``encoder_retainer_training.py`` in this package) right after ``apply``: task loss +
distillation of the teacher's Integrated Gradients into the saliency head + the student's own IG, the
teacher's weight annealed from 1 to 0; for ``adtp`` the ratio head regresses the measured cost of each
candidate ratio per sentence, and its price per unit of ratio is set so the mean chosen ratio is
``target_ratio``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ...adapters import ModelAdapter, model_device
from ...context import PruneContext
from ...engine.plan import SequentialPlan
from ...errors import ConfigFieldError
from ...model_patches import patch_classes, prompt_token_pruning
from ...model_patches import text_token_pruning as patch
from ...registry import register_method
from ..base import OneShotMethod, config_field
from ..class_swap import swap_config_and_class

#: Settings that go into the checkpoint's config (the rest of the stage describes training).
SETTINGS = tuple(k for k in patch.DEFAULTS if k != "special_token_ids")


@dataclass
class TextTokenPruningConfig(OneShotMethod):
    """Text token pruning (AD-TP: attribution-driven, adaptive per sequence; fixed, attention, random) for
    BERT-family classifiers (BERT, RoBERTa, DistilBERT) and Llama-family prompts."""

    algorithm: Literal["adtp", "fixed", "attention", "random"] = config_field(
        "adtp",
        help="adtp (learned saliency, ratio chosen per sequence), fixed (learned saliency, one ratio), "
        "attention (attention received at layer-1), random",
    )
    layer: int = config_field(
        0,
        help="layer at which tokens are dropped: layers before it see them all (0: at the "
        "embeddings, as the paper; causal LMs: the prefill's decoder layer)",
    )
    keep_ratio: float | None = config_field(
        None, help="fixed / attention / random: share of real tokens kept, in (0, 1]"
    )
    candidate_ratios: list[float] = config_field(
        default_factory=lambda: list(patch.DEFAULTS["candidate_ratios"]),
        help="adtp: the retention ratios the ratio head chooses from",
    )
    retainer_size: int = config_field(64, help="hidden width of the saliency and ratio heads")
    temperature: float = config_field(0.05, help="adtp training: sharpness of the soft keep mask")
    seed: int = config_field(
        0, help="random: seed; training: seed of the retainer's initialisation and batches"
    )
    # ---- training the retainer (adtp, fixed) ----
    train_data: str | None = config_field(
        None,
        help="labelled data (jsonl/json/parquet/csv or hub id) to train the retainer; "
        "causal LMs: a plain text file",
    )
    text_field: str = config_field("text", help="training data: column with the text")
    label_field: str = config_field(
        "label", help="training data: column with the label (int or a name in id2label)"
    )
    train_steps: int = config_field(300, help="optimizer steps")
    batch_size: int = config_field(16, help="training batch size")
    learning_rate: float = config_field(
        1e-3, help="AdamW learning rate of the saliency head (causal LMs: of the whole retainer)"
    )
    ratio_learning_rate: float = config_field(
        1e-2, help="adtp, classifiers: AdamW learning rate of the ratio head"
    )
    max_length: int = config_field(
        64,
        help="tokens per training example (longer ones are truncated; causal LMs: "
        "window = BOS + prompt + continuation)",
    )
    continuation_length: int = config_field(
        16, help="causal LMs: tokens after the prompt whose NLL trains the retainer"
    )
    target_ratio: float = config_field(
        0.3,
        help="adtp: mean retention ratio (classifiers: the budget the ratio "
        "head's price is set to; causal LMs: what the FLOPs term steers to)",
    )
    ratio_weight: float = config_field(
        1.0,
        help="adtp, classifiers: weight of the ratio head's squared error on the "
        "cost of each candidate ratio (1 - the pruned model's probability of "
        "the teacher's class)",
    )
    flops_weight: float = config_field(4.0, help="adtp, causal LMs: weight of (mean ratio - target_ratio)^2")
    distill_weight: float = config_field(1.0, help="weight of the IG distillation terms (teacher + self)")
    ig_steps: int = config_field(1, help="Integrated-Gradients steps m (zero baseline)")

    def __post_init__(self) -> None:
        self.candidate_ratios = list(self.candidate_ratios)
        try:  # attention scores come from layer - 1, for classifiers and causal LMs alike
            patch.check_settings(self.settings())
        except ValueError as error:
            key, _, message = str(error).partition(": ")
            key = key.removeprefix("token_pruning.")
            raise ConfigFieldError(
                key if key in patch.DEFAULTS else "algorithm", message or str(error)
            ) from None
        for name in ("train_steps", "batch_size", "max_length", "ig_steps", "continuation_length"):
            if getattr(self, name) < 1:
                raise ConfigFieldError(name, f"must be a positive integer, got {getattr(self, name)}")
        if not 0 < self.target_ratio <= 1:
            raise ConfigFieldError("target_ratio", f"must be in (0, 1], got {self.target_ratio}")
        for name in (
            "learning_rate",
            "ratio_learning_rate",
            "ratio_weight",
            "flops_weight",
            "distill_weight",
        ):
            positive = name.endswith("learning_rate")
            if getattr(self, name) < 0 or (positive and getattr(self, name) == 0):
                raise ConfigFieldError(
                    name, f"must be {'> 0' if positive else '>= 0'}, got {getattr(self, name)}"
                )

    def settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in SETTINGS}

    @property
    def needs_training(self) -> bool:
        """adtp and fixed learn their retainer: ``finalize`` trains it on ``train_data``."""
        return self.algorithm in ("adtp", "fixed")

    def supports_data_parallel_on(self, adapter: ModelAdapter) -> bool:
        # attention / random calibrate nothing; a causal LM's retainer trains on every process's rows of
        # each batch, gradients all-reduced; a classifier's trains with Trainer, in one process
        return not (self.needs_training and adapter.is_encoder)

    @classmethod
    def unsupported_reason(cls, adapter: ModelAdapter) -> str | None:
        if not adapter.is_encoder and _causal_family(adapter.model_type) is None:
            return (
                f"text token pruning supports BERT-family classifiers ({', '.join(patch.FAMILIES)}) and the prompts "
                f"of causal LMs ({', '.join(prompt_token_pruning.FAMILIES)}); {adapter.model_type} is neither"
            )
        return None

    def check_model(self, model_config: Any, adapter: ModelAdapter) -> None:
        super().check_model(model_config, adapter)
        if not adapter.is_encoder:
            layers = adapter.num_layers(model_config)
            if self.layer >= layers:
                raise ConfigFieldError(
                    "layer", f"must be below the model's {layers} layers, got {self.layer}"
                )
            if self.needs_training:
                _check_prompt_training(self)
            return
        layers = adapter.num_layers(model_config)
        if self.layer >= layers:
            raise ConfigFieldError("layer", f"must be below the model's {layers} layers, got {self.layer}")
        if self.algorithm == "attention" and self.layer < 1:
            raise ConfigFieldError(
                "layer", "attention scores come from the layer before the pruning layer; use layer >= 1"
            )
        if self.needs_training and not self.train_data:
            raise ConfigFieldError(
                "train_data",
                f"{self.algorithm} learns its saliency (and ratio) heads: give labelled training data",
            )

    def predict_config(self, model_config: Any, adapter: ModelAdapter) -> Any:
        """A causal LM leaves with ``token_pruning`` in its config (a prompt-pruned model, which evaluation
        scores differently: ``adapter.prunes_prompts``); a classifier's config changes nothing a check reads."""
        if adapter.is_encoder:
            return model_config
        predicted = copy.deepcopy(model_config)
        predicted.token_pruning = prompt_token_pruning.check_settings(
            {key: getattr(self, key) for key in prompt_token_pruning.DEFAULTS},
            adapter.num_layers(model_config),
        )
        return predicted

    def apply(self, model: Any, context: PruneContext) -> dict[str, Any]:
        return apply_text_token_pruning(model, self, context)

    def supports_sequential(self, adapter: ModelAdapter) -> bool:
        return not adapter.is_encoder  # a classifier gains a retainer's weights; encoders are small

    def apply_sequential(self, runner: Any, store: Any, context: PruneContext) -> SequentialPlan:
        """A causal LM's prompt pruning: the writer copies the weights as they are, under the token-pruning
        class. ``adtp`` / ``fixed`` first train the retainer through a copy of the model whose weights
        accelerate reads from disk module by module (``dispatched``), its decoder layers under activation
        checkpointing, so the backward too holds one layer's weights at a time; the trained retainer is
        written beside the copied weights."""
        plan, trained = SequentialPlan(report={}), {}
        if self.needs_training:
            from .prompt_retainer_training import train_prompt_retainer

            with runner.source.dispatched() as model:
                apply_prompt_token_pruning(model, self)
                trained["training"] = train_prompt_retainer(
                    model, context.tokenizer, self, progress=context.progress, checkpointed=True
                )
                plan.new_tensors = {
                    f"retainer.{name}": tensor.detach().to("cpu", copy=True)
                    for name, tensor in model.retainer.state_dict().items()
                }

        def structural_edit(model: Any) -> None:
            plan.report.update({**apply_prompt_token_pruning(model, self), **trained})

        plan.structural_edit = structural_edit
        return plan

    def finalize(self, model: Any, context: PruneContext) -> dict[str, Any] | None:
        """adtp / fixed: train the retainer ``apply`` attached with ``transformers.Trainer``, on
        ``train_data`` (classifiers: ``encoder_retainer_training``; causal LMs' prompts:
        ``prompt_retainer_training``); its report replaces the pending ``training`` entry."""
        if not self.needs_training:
            return None
        if context.adapter.is_encoder:
            from .encoder_retainer_training import train_token_retainer as train
        else:  # a causal LM's prompt retainer, on plain text
            from .prompt_retainer_training import train_prompt_retainer as train
        return {"training": train(model, context.tokenizer, self, progress=context.progress)}


def _check_prompt_training(config: TextTokenPruningConfig) -> None:
    """A causal LM's retainer learns from a plain text file: it must be given and exist."""
    if not config.train_data:
        raise ConfigFieldError(
            "train_data",
            f"{config.algorithm} learns its saliency (and ratio) heads: give a plain "
            "text file to train them on",
        )
    if not Path(config.train_data).expanduser().is_file():
        raise ConfigFieldError("train_data", f"file not found: {config.train_data}")
    if config.continuation_length + 3 > config.max_length:
        raise ConfigFieldError(
            "max_length",
            f"a window holds BOS, a prompt of >= 2 tokens and continuation_length "
            f"({config.continuation_length}) tokens: at least "
            f"{config.continuation_length + 3}, got {config.max_length}",
        )


def _causal_family(model_type: str) -> str | None:
    family = model_type.removeprefix(patch_classes.PREFIX)
    return family if family in prompt_token_pruning.FAMILIES else None


def apply_prompt_token_pruning(model: Any, config: TextTokenPruningConfig) -> dict[str, Any]:
    settings = prompt_token_pruning.check_settings(
        {key: getattr(config, key) for key in prompt_token_pruning.DEFAULTS}, model.config.num_hidden_layers
    )
    config_class, model_class = prompt_token_pruning.CLASSES[_causal_family(model.config.model_type)]
    if isinstance(model, model_class):
        model.config.token_pruning = settings
    else:
        swap_config_and_class(model, config_class, model_class, {"token_pruning": settings})
    details = {"token_pruning": settings, "kind": "causal LM prompt"}
    if config.needs_training:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)  # the retainer starts the same for the same seed
        model.retainer = prompt_token_pruning.new_retainer(model.config, settings).to(
            model_device(model), model.dtype
        )
        torch.random.set_rng_state(generator_state)
        details["retainer_parameters"] = sum(p.numel() for p in model.retainer.parameters())
        details["training"] = "pending: finalize trains the retainer next (train_data)"
    elif hasattr(model, "retainer"):
        del model.retainer
    return details


def apply_text_token_pruning(
    model: Any, config: TextTokenPruningConfig, context: PruneContext
) -> dict[str, Any]:
    if not context.adapter.is_encoder:
        return apply_prompt_token_pruning(model, config)
    tokenizer = context.tokenizer
    # Sequence markers are always kept ([UNK] and [MASK] are ordinary tokens here).
    specials = sorted(
        {
            int(getattr(tokenizer, f"{name}_token_id"))
            for name in ("cls", "sep", "bos", "eos")
            if getattr(tokenizer, f"{name}_token_id", None) is not None
        }
    )
    settings = patch.check_settings(
        {**config.settings(), "special_token_ids": specials}, model.config.num_hidden_layers
    )
    family = model.config.model_type.removeprefix(patch_classes.PREFIX)
    config_class, model_class = patch.CLASSES[family]
    if not isinstance(model, model_class):
        swap_config_and_class(model, config_class, model_class, {"token_pruning": settings})
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)  # the retainer starts the same for the same seed
        model.retainer = patch.TokenRetainer(
            model.config.hidden_size, len(settings["candidate_ratios"]), settings["retainer_size"]
        ).to(model.device, model.dtype)
        torch.random.set_rng_state(generator_state)
    else:
        model.config.token_pruning = settings
    details = {
        "token_pruning": settings,
        "retainer_parameters": sum(p.numel() for p in model.retainer.parameters()),
    }
    if config.needs_training:
        details["training"] = "pending: finalize trains the retainer next (train_data)"
    return details


register_method("text_token_pruning", TextTokenPruningConfig)
