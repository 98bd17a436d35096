"""The method registry: a method is a config dataclass plus an ``apply`` function, registered in one line.

The recipe loader, ``hf-prune methods`` and the docs all read this registry, so a method exists in
exactly one place.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import RecipeError, quoted

if TYPE_CHECKING:
    from .adapters import ModelAdapter


def config_field(default: Any = dataclasses.MISSING, *, help: str, **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with a one-line help string (shown by ``hf-prune methods``)."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class MethodConfig:
    """Base class of every method config. Subclasses hold parameters only (validated in ``__post_init__``)."""

    #: Whether the method reads calibration data (the pipeline then requires a ``calibration:`` section).
    needs_calibration = False

    def check_model(self, model_config: Any, adapter: ModelAdapter) -> None:
        """Raise ``ConfigFieldError`` if this config cannot apply to a model with ``model_config``.

        Called by the pipeline on the model's config before any weights are loaded: for a later stage, on
        the config as the stages before it will leave it (``predict_config``)."""

    def predict_config(self, model_config: Any, adapter: ModelAdapter) -> Any:
        """The model's config as this stage will leave it, so the next stage's ``check_model`` sees what it
        will get (two stages that remove 3 and 2 of 5 layers fail before any weights load).

        Called after ``check_model`` passed. Return ``model_config`` itself when the stage changes nothing a
        later check reads (the default), else a changed ``copy.deepcopy`` of it: never modify
        ``model_config``, which may be the caller's in-memory model's config."""
        return model_config

    def min_calibration_tokens(self, model_config: Any) -> int:
        """Fewest real (non-pad) calibration tokens for this method to be well-posed on ``model_config``;
        0: no floor. The pipeline refuses calibration data below the largest floor of a recipe's stages."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StageReport:
    """What one stage did: removed structure, measurements and timings (goes into hf_prune.json)."""

    method: str
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.details, "seconds": round(self.seconds, 3)}


ApplyFn = Callable[[Any, MethodConfig, Any], StageReport]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    apply: ApplyFn
    summary: str

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
        check = getattr(self.config_cls, "unsupported_reason", None)
        return check(adapter) if check else None


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type[MethodConfig], apply: ApplyFn) -> None:
    """Register ``apply(model, config, context) -> StageReport`` under ``name`` for recipes and the CLI."""
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    summary = (config_cls.__doc__ or "").strip().splitlines()[0] if config_cls.__doc__ else ""
    _METHODS[name] = MethodSpec(name, config_cls, apply, summary)


def registered_methods() -> dict[str, MethodSpec]:
    _load_builtin_methods()
    return dict(sorted(_METHODS.items()))


def get_method(name: str, *, key_path: str = "method") -> MethodSpec:
    methods = registered_methods()
    if name not in methods:
        raise RecipeError(f"{key_path}: unknown method {quoted(name)} (registered: {', '.join(methods)})")
    return methods[name]


def run_stage(spec: MethodSpec, model: Any, config: MethodConfig, context: Any) -> StageReport:
    """Apply one method and time it."""
    start = time.perf_counter()
    report = spec.apply(model, config, context)
    report.seconds = time.perf_counter() - start
    return report


def _load_builtin_methods() -> None:
    # Importing the methods package runs each module's register_method line.
    from . import methods  # noqa: F401
