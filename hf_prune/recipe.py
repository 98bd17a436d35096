"""Recipe loading and validation (YAML or JSON).

Every error names its key path (``stages[1].keep_ratio: must be in (0, 1], got 1.5``) and is raised
before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigFieldError, RecipeError, clip, quoted
from .recipe_file import read_recipe_file

# The optional sections live in recipe_sections; importers keep finding them here (explicit re-exports).
from .recipe_sections import CORRUPTION_SEVERITIES as CORRUPTION_SEVERITIES
from .recipe_sections import ENGINE_HELP, check_corruption_fields, check_positive, engine_settings
from .recipe_sections import EVAL_CORRUPTIONS as EVAL_CORRUPTIONS
from .recipe_sections import TRAINING_TASKS as TRAINING_TASKS
from .recipe_sections import PublishConfig as PublishConfig
from .recipe_sections import TrainingConfig as TrainingConfig
from .recipe_sections import repo_id_problem as repo_id_problem
from .registry import MethodConfig, config_field, get_method

DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Where the weights go: auto (cuda when present, else cpu), a torch device, or an accelerate device_map
#: (``checkpoint.load_model`` places them; ``checkpoint.check_device`` checks this machine has the device).
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps", "balanced", "balanced_low_0", "sequential")
_CUDA_INDEX = re.compile(r"cuda:[0-9]{1,9}")
#: Evaluation tasks a recipe may name (the harness in hf_prune.evals implements them).
EVAL_TASKS = ("perplexity", "multiple_choice", "classification", "vqa", "corruption_robustness")


@dataclass
class CalibrationConfig:
    """Calibration data: a local text/jsonl/json/parquet file or a datasets hub id."""

    data: str = config_field(help="local file (.txt, .jsonl, .json, .parquet) or a datasets hub id")
    num_samples: int = config_field(128, help="number of calibration sequences")
    seq_len: int = config_field(512, help="tokens per sequence (longer records are truncated)")
    batch_size: int = config_field(8, help="sequences per forward pass")
    text_field: str = config_field("text", help="column holding the text in jsonl/json/parquet/hub data")
    split: str = config_field("train", help="dataset split (hub datasets)")
    sample_by: Literal["line", "paragraph", "document"] = config_field(
        "paragraph", help="how a .txt file is cut into records"
    )
    packing: bool = config_field(
        False,
        help="concatenate all records and cut exact seq_len windows (no padding) instead of one record per sequence",
    )
    seed: int = config_field(0, help="seed for shuffling records")
    shuffle: bool = config_field(False, help="shuffle records before taking num_samples")

    def __post_init__(self) -> None:
        for name in ("num_samples", "seq_len", "batch_size"):
            check_positive(name, getattr(self, name))
        if self.seq_len < 2:
            raise ConfigFieldError("seq_len", f"must be at least 2, got {self.seq_len}")
        if not self.data:
            raise ConfigFieldError("data", "must name a file or a dataset id")


@dataclass
class EvaluationTask:
    """One evaluation run after pruning (also run on the original model for the retained ratio)."""

    task: str = config_field(help=f"task name: {' | '.join(EVAL_TASKS)}")
    data: str = config_field(
        help="local file or datasets hub id (corruption_robustness: an image folder of class sub-folders, "
        "or an IDX folder)"
    )
    seq_len: int | None = config_field(
        None, help="perplexity: window length (default: model maximum, at most 1024)"
    )
    batch_size: int = config_field(8, help="examples (perplexity: windows) per forward pass")
    limit: int | None = config_field(None, help="evaluate at most this many examples (perplexity: windows)")
    text_field: str = config_field("text", help="perplexity / classification: text column")
    text_pair_field: str | None = config_field(
        None, help="classification: second text column of sentence pairs"
    )
    label_field: str = config_field("label", help="classification: label column")
    max_new_tokens: int = config_field(8, help="vqa: answer length limit")
    context_len: int | None = config_field(
        None,
        help="perplexity: each window's first context_len tokens are context, only the tokens after them "
        "are scored (a prompt-pruned model prunes the context at prefill; default for one: seq_len // 2)",
    )
    corruptions: list[str] | None = config_field(
        None, help=f"corruption_robustness: corruptions to apply (default all: {', '.join(EVAL_CORRUPTIONS)})"
    )
    severities: list[int] | None = config_field(
        None, help="corruption_robustness: severities to apply, each 1..5 (default all five)"
    )
    seed: int = config_field(0, help="corruption_robustness: seed of the random corruptions (the noises)")

    def __post_init__(self) -> None:
        if self.task not in EVAL_TASKS:
            raise ConfigFieldError("task", f"unknown task {self.task!r} (allowed: {', '.join(EVAL_TASKS)})")
        for name in ("seq_len", "batch_size", "limit", "max_new_tokens", "context_len"):
            check_positive(name, getattr(self, name))
        if self.context_len is not None and self.task != "perplexity":
            raise ConfigFieldError("context_len", f"is a perplexity setting; task {self.task!r} has none")
        if self.context_len is not None and self.seq_len is not None and self.context_len >= self.seq_len:
            raise ConfigFieldError(
                "context_len",
                f"must be below seq_len ({self.seq_len}) to leave tokens to score, got {self.context_len}",
            )
        check_corruption_fields(self.task, corruptions=self.corruptions, severities=self.severities)


@dataclass
class Stage:
    method: str
    config: MethodConfig

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.config.to_dict()}


@dataclass
class Recipe:
    model: str | None
    output: str | None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    overwrite: bool = False
    calibration: CalibrationConfig | None = None
    stages: list[Stage] = field(default_factory=list)
    evaluate: list[EvaluationTask] = field(default_factory=list)
    #: The ``train:`` section (``hf-prune train``); None for a prune recipe.
    train: TrainingConfig | None = None
    #: The ``publish:`` section: push the output to the Hub after the save; None when absent.
    publish: PublishConfig | None = None
    #: How calibration runs (``recipe_sections.ENGINES``) and where the sequential engine keeps activations.
    engine: str = "auto"
    activation_cache: str | None = None
    activation_memory_gb: float | None = None
    #: The file the recipe was read from (None for a dict); its folder is never replaced by a save.
    source_file: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "output": self.output,
            "dtype": self.dtype,
            "device": self.device,
            "trust_remote_code": self.trust_remote_code,
            "allow_pickle": self.allow_pickle,
            "overwrite": self.overwrite,
            "engine": self.engine,
            "activation_cache": self.activation_cache,
            "activation_memory_gb": self.activation_memory_gb,
            "calibration": dataclasses.asdict(self.calibration) if self.calibration else None,
            "stages": [s.to_dict() for s in self.stages],
            "evaluate": [dataclasses.asdict(e) for e in self.evaluate],
            **({"train": dataclasses.asdict(self.train)} if self.train else {}),
            **({"publish": dataclasses.asdict(self.publish)} if self.publish else {}),
        }


_TOP_LEVEL_HELP = {
    "model": "model folder or hub id (required)",
    "output": "output folder (required; never the source folder)",
    "dtype": f"weights dtype: {' | '.join(DTYPES)}",
    "device": "auto (cuda if present, else cpu) | cpu | cuda | cuda:N | mps | a device_map name for accelerate "
    "(balanced, balanced_low_0, sequential)",
    "trust_remote_code": "allow the model's own modeling code (off by default)",
    "allow_pickle": "allow loading non-safetensors weights (off by default: pickle can run code)",
    "overwrite": "replace an existing output folder that is not an earlier hf-prune output (off by default)",
    "calibration": "calibration data section",
    "stages": "list of pruning stages, each {method: NAME, ...its config}",
    "evaluate": "list of evaluation tasks run on the original and the pruned model",
    "train": "hf-prune train: training data, task and TrainingArguments fields (training-time methods)",
    **ENGINE_HELP,
    "publish": "push the saved output to the Hub: repo_id (required), private, revision, commit_message, "
    "base_model, endpoint",
}


def load_recipe(source: str | Path | dict[str, Any] | Recipe, *, model_in_memory: bool = False) -> Recipe:
    """Load and validate a recipe from a YAML/JSON file, a dict, or pass a ``Recipe`` through.

    With ``model_in_memory=True`` (``prune(model, recipe)``), ``model`` and ``output`` become optional.
    """
    if isinstance(source, Recipe):
        return source
    source_file = None
    if isinstance(source, (str, Path)):
        source_file = Path(source).expanduser().resolve()
        data = read_recipe_file(Path(source))
    elif isinstance(source, dict):
        data = source
    else:
        raise RecipeError(f"recipe: expected a file path or a dict, got {type(source).__name__}")
    if data is None:
        raise RecipeError("recipe: the file is empty; a recipe is a mapping with model, output and stages")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: the top level must be a mapping, got {_type_name(type(data))}")
    return dataclasses.replace(_build_recipe(data, model_in_memory=model_in_memory), source_file=source_file)


def _unknown_key_error(path: str, key: Any, allowed: typing.Iterable[str]) -> RecipeError:
    allowed = list(allowed)
    name = key if isinstance(key, str) else quoted(key)
    hint = difflib.get_close_matches(name, allowed, n=1) if len(name) <= 80 else []
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    return RecipeError(f"{path}{clip(name)}: unknown key (allowed: {', '.join(allowed)}){suggestion}")


def _build_recipe(data: dict[str, Any], *, model_in_memory: bool) -> Recipe:
    for key in data:
        if key not in _TOP_LEVEL_HELP:
            raise _unknown_key_error("", key, _TOP_LEVEL_HELP)
    model = _location(data, "model", "model folder or hub id", required=not model_in_memory)
    output = _location(data, "output", "folder path", required=not model_in_memory)
    dtype = _check_type("dtype", data.get("dtype", "auto"), str)
    if dtype not in DTYPES:
        raise RecipeError(f"dtype: must be one of {', '.join(DTYPES)}, got {quoted(dtype)}")
    device = _check_type("device", data.get("device", "auto"), str)
    problem = device_name_problem(device)
    if problem:
        raise RecipeError(f"device: {problem}")
    calibration = None
    if data.get("calibration") is not None:
        calibration = build_dataclass(CalibrationConfig, data["calibration"], "calibration")
    stages_data = _check_type("stages", data.get("stages"), list)
    if not stages_data:
        raise RecipeError("stages: must be a non-empty list of {method: NAME, ...} entries")
    stages = [_build_stage(entry, f"stages[{i}]") for i, entry in enumerate(stages_data)]
    needing = [f"stages[{i}] ({s.method})" for i, s in enumerate(stages) if s.config.needs_calibration]
    if needing and calibration is None and data.get("train") is None:  # hf-prune train names the stage
        raise RecipeError(f"calibration: missing, but {', '.join(needing)} needs calibration data")
    evaluate = [
        build_dataclass(EvaluationTask, entry, f"evaluate[{i}]")
        for i, entry in enumerate(_check_type("evaluate", _or_default(data, "evaluate", []), list))
    ]
    train = None
    if data.get("train") is not None:
        train = build_dataclass(TrainingConfig, data["train"], "train")
    publish = None
    if data.get("publish") is not None:
        publish = build_dataclass(PublishConfig, data["publish"], "publish")
        if output is None:
            raise RecipeError("publish: needs output: a push sends the saved output folder")
    try:
        engine = engine_settings(data)
    except ConfigFieldError as exc:
        raise RecipeError(f"{exc.field}: {exc.message}") from None
    return Recipe(
        **engine,
        model=model,
        output=output,
        dtype=dtype,
        device=device,
        trust_remote_code=_check_type("trust_remote_code", data.get("trust_remote_code", False), bool),
        allow_pickle=_check_type("allow_pickle", data.get("allow_pickle", False), bool),
        overwrite=_check_type("overwrite", data.get("overwrite", False), bool),
        calibration=calibration,
        stages=stages,
        evaluate=evaluate,
        train=train,
        publish=publish,
    )


def _location(data: dict[str, Any], key: str, what: str, *, required: bool) -> str | None:
    """``model`` / ``output``: a non-empty string. Required unless the model is in memory (``prune(model,
    recipe)``), where a missing or null one means "none" (no output: nothing is saved)."""
    if key not in data or (data[key] is None and not required):
        if required:
            raise RecipeError(f"{key}: missing required key ({_TOP_LEVEL_HELP[key]})")
        return None
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{key}: must be a non-empty {what}, got {_described(value)}")
    return value


def _or_default(data: dict[str, Any], key: str, default: Any) -> Any:
    """``data[key]``, or ``default`` when it is missing or null (``evaluate:`` with nothing after it)."""
    value = data.get(key)
    return default if value is None else value


def device_name_problem(device: str) -> str | None:
    """Why ``device`` is not a device name hf-prune can place weights on, or None if it is one."""
    if device in DEVICES or _CUDA_INDEX.fullmatch(device):
        return None
    return f"must be one of {' | '.join(DEVICES)}, got {quoted(device)}"


def _build_stage(entry: Any, path: str) -> Stage:
    if not isinstance(entry, dict):
        raise RecipeError(f"{path}: expected a mapping with a 'method' key, got {_type_name(type(entry))}")
    if "method" not in entry:
        raise RecipeError(f"{path}.method: missing required key")
    name = _check_type(f"{path}.method", entry["method"], str)
    spec = get_method(name, key_path=f"{path}.method")
    fields = {k: v for k, v in entry.items() if k != "method"}
    return Stage(method=name, config=build_dataclass(spec.config_cls, fields, path))


def build_dataclass(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking unknown keys, required keys and types."""
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping, got {_type_name(type(data))}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise _unknown_key_error(f"{path}.", key, fields)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_type(f"{path}.{name}", data[name], hints[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            help_text = f.metadata.get("help", "")
            raise RecipeError(f"{path}.{name}: missing required key ({help_text})")
    try:
        return cls(**kwargs)
    except ConfigFieldError as exc:  # a config's own message may quote a whole (long) list: keep it short
        raise RecipeError(f"{path}.{exc.field}: {clip(exc.message, 400)}") from None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Return ``value`` (ints widened to float where a float is expected) or raise naming the key."""
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        for option in typing.get_args(tp):
            try:
                return _check_type(path, value, option)
            except RecipeError as exc:
                if getattr(exc, "value_refused", False):
                    raise
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise RecipeError(f"{path}: must be one of {_type_name(tp)}, got {quoted(value)}")
    elif origin is list or tp is list:
        if isinstance(value, list):
            (inner,) = typing.get_args(tp) or (Any,)
            return [_check_type(f"{path}[{i}]", v, inner) for i, v in enumerate(value)]
    elif tp is Any:
        return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite_float(path, value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return _printable_int(path, value)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise RecipeError(f"{path}: expected {_type_name(tp)}, got {_described(value)}")


def _value_refused(message: str) -> RecipeError:
    """An error for a value of the right type that is refused (NaN, an endless int): a union such as
    ``float | None`` must report it rather than go on to say "expected float or null"."""
    error = RecipeError(message)
    error.value_refused = True
    return error


def _finite_float(path: str, value: int | float) -> float:
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        number = math.inf
    if not math.isfinite(number):
        raise _value_refused(f"{path}: must be a finite number, got {quoted(value)}")
    return number


def _printable_int(path: str, value: int) -> int:
    # Python refuses to turn an int of more than 4300 digits into text: no message could even show it.
    try:
        str(value)
    except ValueError:
        limit = sys.get_int_max_str_digits()
        raise _value_refused(
            f"{path}: must be an integer of at most {limit} digits, got {quoted(value)}"
        ) from None
    return value


def _described(value: Any) -> str:
    """``null``, or the value's type and short repr (``str 'four'``)."""
    return "null" if value is None else f"{_type_name(type(value))} {quoted(value)}"
