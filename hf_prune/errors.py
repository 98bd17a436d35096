"""Exceptions raised by hf-prune. Every message names what is wrong and what is allowed."""

from __future__ import annotations

import math
import reprlib
from typing import Any


class HfPruneError(Exception):
    """Base class for every error hf-prune raises on purpose."""


class RecipeError(HfPruneError, ValueError):
    """A recipe (or method config) is invalid; the message starts with the key path."""


class UnsupportedModelError(HfPruneError, ValueError):
    """The model's architecture is not in the adapter table, or a method cannot apply to it."""


class DataError(HfPruneError, ValueError):
    """A data file is empty, has no usable text field, or has an unsupported type."""


class CalibrationError(DataError):
    """Calibration data is too short to build a single sequence."""


class ConfigFieldError(ValueError):
    """Raised by a method config's ``__post_init__``; the recipe loader prefixes the key path."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelError(HfPruneError, ValueError):
    """A model folder is unusable: corrupt weight files, weights that do not match config.json, absurd sizes."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file (or datasets hub id) that cannot be found; also a ``FileNotFoundError`` for callers that
    catch that."""


class CalibrationWarning(UserWarning):
    """Calibration runs, but on less data than the recipe asked for."""


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict = 2, 6, 4
_SHORT_REPR.maxstring, _SHORT_REPR.maxother, _SHORT_REPR.maxlong = 60, 60, 40


def quoted(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for messages: never print a huge value whole."""
    try:
        text = _SHORT_REPR.repr(value)
    except ValueError:  # an int too long for Python to print
        digits = int(value.bit_length() * math.log10(2)) + 1 if isinstance(value, int) else None
        text = f"<an integer of about {digits} digits>" if digits else f"<{type(value).__name__}>"
    return clip(text, limit)


def clip(text: str, limit: int = 80) -> str:
    """``text``, cut to ``limit`` characters with "..." at the end when longer."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PublishError(HfPruneError):
    """A push to the Hub failed or was refused; the message says what happened and what to do. The local
    output folder is never changed by a push."""
