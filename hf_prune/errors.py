"""Exceptions raised by hf-prune. Every message names what is wrong and what is allowed."""


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
