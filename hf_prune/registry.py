"""The method registry: a method is a config class (``methods/base.py``'s contract) registered in one line.

``register_method("replaceme", ReplaceMeConfig)`` in the method's own module is the only place its name is
written: the recipe loader, ``hf-prune methods``, ``hf-prune inspect``, the docs and every stage report
take it from here. ``hf_prune/methods/__init__.py`` imports every module below ``hf_prune.methods``, so
adding a method is adding one file.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import RecipeError, quoted
from .methods.base import (
    MethodConfig,
    OneShotMethod,
    StageReport,
    TrainingMethod,
    config_field,
)

if TYPE_CHECKING:
    from .adapters import ModelAdapter

__all__ = [
    "MethodConfig",
    "MethodSpec",
    "OneShotMethod",
    "StageReport",
    "TrainingMethod",
    "config_field",
    "get_method",
    "register_method",
    "registered_methods",
    "run_stage",
]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    summary: str

    @property
    def one_shot(self) -> bool:
        """True for a ``OneShotMethod`` (``hf-prune prune``), False for a ``TrainingMethod``."""
        return issubclass(self.config_cls, OneShotMethod)

    def fields(self) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, help) for each config field, in declaration order."""
        rows = []
        for f in dataclasses.fields(self.config_cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "(required)"
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            rows.append((f.name, type_name, default, f.metadata.get("help", "")))
        return rows

    def applicability(self, adapter: ModelAdapter) -> str | None:
        """None if the method applies to models with this adapter, else the reason it does not."""
        return self.config_cls.unsupported_reason(adapter)


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type[MethodConfig]) -> None:
    """Register the method ``config_cls`` (a ``OneShotMethod`` or ``TrainingMethod`` dataclass) under
    ``name`` for recipes, the CLI and stage reports."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, (OneShotMethod, TrainingMethod))):
        raise TypeError(f"method {name!r}: {config_cls!r} must subclass OneShotMethod or TrainingMethod")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"method {name!r}: {config_cls.__name__} must be a dataclass")
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    summary = (config_cls.__doc__ or "").strip().splitlines()[0] if config_cls.__doc__ else ""
    _METHODS[name] = MethodSpec(name, config_cls, summary)


def registered_methods() -> dict[str, MethodSpec]:
    _load_builtin_methods()
    return dict(sorted(_METHODS.items()))


def get_method(name: str, *, key_path: str = "method") -> MethodSpec:
    methods = registered_methods()
    if name not in methods:
        raise RecipeError(f"{key_path}: unknown method {quoted(name)} (registered: {', '.join(methods)})")
    return methods[name]


def run_stage(spec: MethodSpec, model: Any, config: OneShotMethod, context: Any) -> StageReport:
    """Run one one-shot stage: ``config.apply`` (timed: the report's ``seconds``), then ``config.finalize``,
    whose keys are merged into the report. The caller ran ``check_model`` before (the pipeline's
    preflight)."""
    if not isinstance(config, OneShotMethod):
        raise TypeError(
            f"{spec.name} is a training-time method: it runs inside transformers.Trainer "
            "(integrations.training_callback), not as a one-shot stage"
        )
    start = time.perf_counter()
    details = config.apply(model, context)
    seconds = time.perf_counter() - start
    follow_up = config.finalize(model, context)
    if follow_up:
        details.update(follow_up)
    return StageReport(spec.name, details, seconds)


_LOADED = False


def _load_builtin_methods() -> None:
    # Importing every module of hf_prune.methods runs each method's register_method line.
    global _LOADED
    if not _LOADED:
        from .methods import import_method_modules

        import_method_modules()
        _LOADED = True
