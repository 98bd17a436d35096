"""``heal``: recover quality after pruning with a short LoRA fine-tune (peft), merged back into the weights.

A stage after any pruning stage (or alone)::

    - method: heal
      train_data: train.txt        # plain text; packed into seq_len windows
      eval_data: heldout.txt       # perplexity before and after (default: the last windows of train_data)
      steps: 200
      rank: 8

LoRA adapters go on every attention and MLP projection of the decoder layers (the adapter table says
which; ``targets`` narrows them by name), and on the fused 3-D expert parameters of MoE layers through
peft's ``target_parameters``. After training they are merged (``merge_and_unload``), so the output is
again a plain checkpoint of the same class: stock, or the ``hf_prune_<family>`` class with its remote
code. A LoRA delta is dense, so merging it would fill a sparse weight's zeros: with ``keep_zeros`` (the
default) every targeted weight's zeros are put back after the merge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ...data import looks_like_local_path
from ...errors import ConfigFieldError, RecipeError
from ...registry import OneShotMethod, config_field, register_method
from .lora_training import (
    LoraSettings,
    heldout_perplexity,
    load_heal_windows,
    restore_zeros,
    train_and_merge_lora,
    zero_masks,
)


@dataclass
class HealConfig(OneShotMethod):
    """Heal a pruned causal LM with a short LoRA fine-tune (peft), merged back into its weights."""

    train_data: str = config_field(
        help="training text: a local file (.txt, .jsonl, .json, .parquet) or a datasets hub id"
    )
    eval_data: str | None = config_field(
        None,
        help="held-out text for the perplexity before and after healing (default: the last eval_fraction "
        "of train_data's windows, which are then not trained on)",
    )
    eval_fraction: float = config_field(
        0.1, help="share of train_data's windows held out when eval_data is not given"
    )
    max_eval_windows: int = config_field(64, help="held-out windows scored (at most)")
    text_field: str = config_field("text", help="column holding the text in jsonl/json/parquet/hub data")
    sample_by: Literal["line", "paragraph", "document"] = config_field(
        "paragraph", help="how a .txt file is cut into records"
    )
    seq_len: int = config_field(256, help="tokens per training window (texts are packed)")
    steps: int = config_field(100, help="optimizer steps")
    batch_size: int = config_field(8, help="windows per step")
    learning_rate: float = config_field(2e-4, help="AdamW learning rate (linear decay, no warm-up)")
    rank: int = config_field(8, help="LoRA rank r")
    alpha: float = config_field(16.0, help="LoRA alpha (the update is scaled by alpha / rank)")
    dropout: float = config_field(
        0.0, help="LoRA dropout on the adapter's input (must be 0 when fused MoE experts are adapted)"
    )
    targets: list[str] | None = config_field(
        None,
        help="names the adapted projections end with (e.g. [q_proj, v_proj, experts.gate_up_proj]); "
        "default: every attention and MLP projection and the fused experts",
    )
    keep_zeros: bool = config_field(
        True, help="put every targeted weight's zeros back after merging, so a sparse model stays sparse"
    )
    seed: int = config_field(0, help="seed for the adapter's initialisation and the data order")

    def __post_init__(self) -> None:
        if not self.train_data:
            raise ConfigFieldError("train_data", "must name a file or a dataset id")
        for name in ("max_eval_windows", "steps", "batch_size", "rank"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigFieldError(name, f"must be a positive integer, got {value}")
        if self.seq_len < 2:
            raise ConfigFieldError("seq_len", f"must be at least 2, got {self.seq_len}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigFieldError("eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
        for name in ("learning_rate", "alpha"):
            if getattr(self, name) <= 0:
                raise ConfigFieldError(name, f"must be positive, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ConfigFieldError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.targets is not None and (not self.targets or not all(t.strip() for t in self.targets)):
            raise ConfigFieldError("targets", "must be a non-empty list of names, or left out for all")

    @classmethod
    def unsupported_reason(cls, adapter: Any) -> str | None:
        if adapter.is_encoder:
            return f"heal fine-tunes causal language models on text; {adapter.model_type} is an encoder"
        if adapter.is_image_classifier:
            return (
                f"heal fine-tunes causal language models on text; {adapter.model_type} is an image classifier"
            )
        return None

    def check_model(self, model_config: Any, adapter: Any) -> None:
        super().check_model(model_config, adapter)
        if adapter.prunes_prompts(model_config):
            raise ConfigFieldError(
                "method",
                "heal cannot follow prompt token pruning: a pruned prefill has no logits at pruned "
                "positions to train on (heal before the token-pruning stage)",
            )
        positions = getattr(adapter.text_config(model_config), "max_position_embeddings", None)
        if positions and self.seq_len > positions:
            raise ConfigFieldError(
                "seq_len", f"must be at most the model's {positions} positions, got {self.seq_len}"
            )
        for name in ("train_data", "eval_data"):  # before any weights load, not after the pruning stages
            data = getattr(self, name)
            if data is not None and looks_like_local_path(data) and not Path(data).expanduser().exists():
                raise ConfigFieldError(name, f"file not found: {data}")

    def apply(self, model: Any, context: Any) -> dict[str, Any]:
        available = context.adapter.adapter_targets(model)
        linears, fused = self._chosen(available[0]), self._chosen(available[1])
        if not linears and not fused:
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in available[0] + available[1]})
            raise RecipeError(
                f"heal.targets: {self.targets} match no projection of this model (names end with: "
                f"{', '.join(suffixes)})"
            )
        if fused and self.dropout:
            raise RecipeError(
                f"heal.dropout: must be 0 when fused expert parameters are adapted ({fused[0]}, ...): "
                "peft's target_parameters has no dropout"
            )
        train, heldout, eval_source = load_heal_windows(self, context.tokenizer)
        masks = zero_masks(model, linears + fused) if self.keep_zeros else {}
        before = heldout_perplexity(model, heldout, self.batch_size)
        started = time.perf_counter()
        settings = LoraSettings(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            steps=self.steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            seed=self.seed,
        )
        training = train_and_merge_lora(model, train, linears, fused, settings, progress=context.progress)
        refilled = restore_zeros(model, masks)
        after = heldout_perplexity(model, heldout, self.batch_size)
        return {
            "adapted_modules": len(linears),
            "adapted_expert_parameters": len(fused),
            "lora_parameters": training["lora_parameters"],
            "train_windows": len(train),
            "train_loss_first": training["loss_first"],
            "train_loss_last": training["loss_last"],
            "training_seconds": round(time.perf_counter() - started, 3),
            "eval_data": eval_source,
            "eval_tokens": sum(len(w) for w in heldout),
            "perplexity_before": round(before, 4),
            "perplexity_after": round(after, 4),
            "zeros_restored": refilled,
            "sparse_weights_kept": len(masks),
        }

    def _chosen(self, names: list[str]) -> list[str]:
        """The adapter's names that end with one of ``targets`` (all when ``targets`` is None)."""
        if self.targets is None:
            return names
        return [n for n in names if any(n == t or n.endswith("." + t) for t in self.targets)]


register_method("heal", HealConfig)
