"""What a method may use besides the model: the adapter, the tokenizer, calibration batches, progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .adapters import ModelAdapter
from .calibration import CalibrationBatch, build_calibration
from .engine.distributed import rank_and_world, shard
from .errors import CalibrationError
from .recipe import CalibrationConfig


@dataclass
class PruneContext:
    adapter: ModelAdapter
    tokenizer: Any = None
    calibration_config: CalibrationConfig | None = None
    progress: bool = True
    #: Fewest real calibration tokens the stages need (the largest ``MethodConfig.min_calibration_tokens``
    #: of the recipe, set by the pipeline) and which stage needs them, for the error message.
    min_calibration_tokens: int = 0
    min_calibration_tokens_by: str = "this stage"
    _all: list[CalibrationBatch] | None = field(default=None, repr=False)
    _batches: list[CalibrationBatch] | None = field(default=None, repr=False)
    _sequence_shares: list[CalibrationBatch] | None = field(default=None, repr=False)

    def all_calibration_batches(self) -> list[CalibrationBatch]:
        """Every tokenised calibration batch (built on first use and shared by every stage); fewer real tokens
        than ``min_calibration_tokens`` is a CalibrationError (fewer than requested only a warning)."""
        if self._all is None and self._batches is not None:  # batches given directly, in one process
            return self._batches
        if self._all is None:
            config = self.calibration_config
            if config is None:
                raise CalibrationError("this stage needs calibration data: add a 'calibration:' section")
            if self.tokenizer is None:
                raise CalibrationError("calibration needs a tokenizer, and none was found with the model")
            batches = build_calibration(config, self.tokenizer)
            tokens = sum(batch.num_tokens for batch in batches)
            if tokens < self.min_calibration_tokens:
                raise CalibrationError(
                    f"calibration data {config.data} gives {tokens:,} tokens, fewer than the "
                    f"{self.min_calibration_tokens:,} that {self.min_calibration_tokens_by} needs on this model "
                    f"(requested: num_samples {config.num_samples} × seq_len {config.seq_len} = "
                    f"{config.num_samples * config.seq_len:,}); add calibration text, or set packing: true"
                )
            self._all = batches
        return self._all

    def calibration_batches(
        self, split: Literal["batches", "sequences"] = "batches"
    ) -> list[CalibrationBatch]:
        """This process's share of the calibration batches (all of them in one process).

        Data-parallel (torchrun / accelerate launch), ``split`` says how they are shared: ``batches`` (every
        world-th batch: for statistics that are sums over batches) or ``sequences`` (every batch, with every
        world-th sequence of it: for a method that takes one optimiser step per whole batch, DiEP)."""
        processes = rank_and_world()[1]
        if self._batches is not None and (split == "batches" or processes == 1):
            return self._batches
        batches = self.all_calibration_batches()
        config = self.calibration_config
        if split == "sequences":
            if self._sequence_shares is None:
                short = [i for i, b in enumerate(batches) if b.input_ids.shape[0] < processes]
                if short:
                    raise CalibrationError(
                        f"calibration data {config.data}: batch {short[0]} has "
                        f"{batches[short[0]].input_ids.shape[0]} sequence(s) for {processes} processes, and "
                        "each process takes a share of every batch's sequences; raise calibration.batch_size "
                        "or launch fewer processes"
                    )
                self._sequence_shares = [share_sequences(b) for b in batches]
            return self._sequence_shares
        if self._batches is None:
            if len(batches) < processes:
                raise CalibrationError(
                    f"calibration data {config.data} gives {len(batches)} batch(es) for {processes} processes: "
                    "each process needs one; lower calibration.batch_size, add data, or launch fewer processes"
                )
            self._batches = shard(batches)
        return self._batches


def share_sequences(batch: CalibrationBatch) -> CalibrationBatch:
    """This process's sequences of ``batch``: rows rank, rank + world, … (all of them in one process)."""
    return CalibrationBatch(shard(batch.input_ids), shard(batch.attention_mask))
