"""The pieces of ``heal``: its data windows, held-out perplexity, the zeros of sparse weights, and the
LoRA fine-tune itself (peft adapters trained by ``transformers.Trainer``, then merged)."""

from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...adapters import use_cache_restored
from ...data import load_text_records, looks_like_local_path, packed_token_windows
from ...errors import DataError


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    steps: int
    batch_size: int
    learning_rate: float
    seed: int


def load_heal_windows(config: Any, tokenizer: Any) -> tuple[list[list[int]], list[list[int]], str]:
    """(training windows, held-out windows, what the held-out text is) from a ``HealConfig``. Without
    ``eval_data`` the last ``eval_fraction`` of the training windows are held out (never trained on)."""
    if tokenizer is None:
        raise DataError("heal needs a tokenizer, and none was found with the model")

    def windows_of(data: str) -> list[list[int]]:
        texts = load_text_records(data, text_field=config.text_field, sample_by=config.sample_by)
        return packed_token_windows(texts, tokenizer, config.seq_len)

    train = windows_of(config.train_data)
    if config.eval_data is not None:
        heldout, source = windows_of(config.eval_data), _public_name(config.eval_data)
    else:
        count = max(1, round(len(train) * config.eval_fraction))
        train, heldout = train[:-count], train[-count:]
        source = f"{_public_name(config.train_data)} (last {count} windows, held out)"
    if not train:
        raise DataError(
            f"{config.train_data}: too little text for one training window of seq_len={config.seq_len} "
            "tokens beside the held-out ones"
        )
    if not heldout:
        raise DataError(f"{config.eval_data}: fewer tokens than one window of seq_len={config.seq_len}")
    return train, heldout[: config.max_eval_windows], source


def _public_name(data: str) -> str:
    """A local file by its name only (reports and model cards carry no local paths); a hub id as is."""
    return Path(data).name if looks_like_local_path(data) or Path(data).expanduser().exists() else data


@torch.no_grad()
def heldout_perplexity(model: nn.Module, windows: list[list[int]], batch_size: int) -> float:
    """exp(mean next-token cross-entropy) over every predicted token of the (equal-length) windows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[start : start + batch_size], device=device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)


def _named_weight(model: nn.Module, name: str) -> torch.Tensor:
    """A Linear module's weight, or a parameter (fused experts) of ``model``, by full name."""
    try:
        return model.get_submodule(name).weight
    except AttributeError:  # the name of a parameter, not of a module
        return model.get_parameter(name)


def zero_masks(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """For each named weight holding zeros: where it is non-zero (True). Dense weights are left out."""
    masks = {}
    for name in names:
        weight = _named_weight(model, name)
        if bool((weight == 0).any()):
            masks[name] = weight.detach() != 0
    return masks


@torch.no_grad()
def restore_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Zero again what merging filled in; returns how many entries that was."""
    refilled = 0
    for name, keep in masks.items():
        weight = _named_weight(model, name)
        refilled += int(((weight != 0) & ~keep).sum())
        weight.mul_(keep.to(weight.dtype))
    return refilled


def train_and_merge_lora(
    model: nn.Module,
    windows: list[list[int]],
    linears: list[str],
    fused: list[str],
    settings: LoraSettings,
    *,
    progress: bool,
) -> dict[str, Any]:
    """Put LoRA adapters on ``linears`` (modules) and ``fused`` (3-D parameters), train them on the
    windows (next-token loss) with ``Trainer``, and merge them into ``model`` in place."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    torch.manual_seed(settings.seed)  # the adapters' initialisation
    lora = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=linears or None,
        target_parameters=fused or None,
        bias="none",
    )
    was_training = model.training
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # peft asks a deprecated transformers flag
        peft_model = get_peft_model(model, lora)
    lora_parameters = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    dataset = [{"input_ids": torch.tensor(w), "labels": torch.tensor(w)} for w in windows]
    with tempfile.TemporaryDirectory(prefix="hf-prune-heal-") as tmp, use_cache_restored(model):
        arguments = TrainingArguments(
            output_dir=tmp,
            max_steps=settings.steps,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="linear",
            weight_decay=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=settings.seed,
            data_seed=settings.seed,
            disable_tqdm=not progress,
            use_cpu=next(model.parameters()).device.type == "cpu",
            dataloader_num_workers=0,
            # The dataset holds only input_ids and labels; an hf_prune_* class's forward takes **kwargs,
            # from which Trainer would infer that no column is used and drop them all.
            remove_unused_columns=False,
        )
        trainer = Trainer(model=peft_model, args=arguments, train_dataset=dataset)
        trainer.remove_callback(PrinterCallback)  # one log line per step otherwise
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    merged = peft_model.merge_and_unload()
    if merged is not model:  # peft merges in place; anything else would leave the pipeline's model stale
        raise RuntimeError("peft's merge_and_unload returned a new model instead of merging in place")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable[name])  # get_peft_model froze the base weights
    model.train(was_training)
    return {
        "lora_parameters": lora_parameters,
        "loss_first": round(float(losses[0]), 6) if losses else None,
        "loss_last": round(float(losses[-1]), 6) if losses else None,
    }
