"""What a method may use besides the model: the adapter, the tokenizer, calibration batches, progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .adapters import ModelAdapter
from .calibration import CalibrationBatch, build_calibration
from .errors import CalibrationError
from .recipe import CalibrationConfig


@dataclass
class PruneContext:
    adapter: ModelAdapter
    tokenizer: Any = None
    calibration_config: CalibrationConfig | None = None
    progress: bool = True
    _batches: list[CalibrationBatch] | None = field(default=None, repr=False)

    def calibration_batches(self) -> list[CalibrationBatch]:
        """Tokenised calibration batches, built on first use and shared by every stage."""
        if self._batches is None:
            if self.calibration_config is None:
                raise CalibrationError("this stage needs calibration data: add a 'calibration:' section")
            if self.tokenizer is None:
                raise CalibrationError("calibration needs a tokenizer, and none was found with the model")
            self._batches = build_calibration(self.calibration_config, self.tokenizer)
        return self._batches
