"""What a method may use besides the model: the adapter, the tokenizer, calibration batches, progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    _batches: list[CalibrationBatch] | None = field(default=None, repr=False)

    def calibration_batches(self) -> list[CalibrationBatch]:
        """Tokenised calibration batches, built on first use and shared by every stage; fewer real tokens
        than ``min_calibration_tokens`` is a CalibrationError (fewer than requested only a warning)."""
        if self._batches is None:
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
            # Data-parallel calibration (torchrun / accelerate launch): this process's share of the batches.
            processes = rank_and_world()[1]
            if len(batches) < processes:
                raise CalibrationError(
                    f"calibration data {config.data} gives {len(batches)} batch(es) for {processes} processes: "
                    "each process needs one; lower calibration.batch_size, add data, or launch fewer processes"
                )
            self._batches = shard(batches)
        return self._batches
