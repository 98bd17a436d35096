"""Property-based fuzzing of the recipe loader: whatever it is given, it returns a ``Recipe`` or raises one of
hf-prune's own errors (``HfPruneError``) with a short message; never a TypeError, an OverflowError, a
RecursionError or a parser's exception.

The inputs are recipe-shaped (real top-level, section and stage keys, real method names, values of every
kind: null, bools, ints up to 10**4400 (past what Python prints), floats with NaN and ±inf, strings,
lists, mappings), as dicts and as YAML / JSON files; and raw file contents (recipe lines, YAML syntax,
random characters, bytes that are not UTF-8).

Each test runs 200 examples; set HF_PRUNE_FUZZ_EXAMPLES=5000 (say) for a longer hunt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hf_prune import Recipe, load_recipe, registered_methods
from hf_prune.errors import HfPruneError
from hf_prune.recipe import DEVICES, DTYPES, EVAL_TASKS, CalibrationConfig, EvaluationTask

FUZZ = settings(
    max_examples=int(os.environ.get("HF_PRUNE_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
#: Longer than any message the loader writes (the longest lists the allowed keys of a method).
MAX_MESSAGE = 1500

METHODS = registered_methods()
TOP_LEVEL_KEYS = [
    "model",
    "output",
    "dtype",
    "device",
    "trust_remote_code",
    "allow_pickle",
    "overwrite",
    "calibration",
    "stages",
    "evaluate",
]


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


ALL_FIELD_NAMES = sorted(
    {name for spec in METHODS.values() for name in field_names(spec.config_cls)}
    | set(field_names(CalibrationConfig))
    | set(field_names(EvaluationTask))
)
#: Strings the loader gives meaning to, so that examples get past the type checks into the configs.
MEANINGFUL_STRINGS = sorted(
    {
        *DTYPES,
        *DEVICES,
        *EVAL_TASKS,
        *METHODS,
        "cuda:7",
        "tpu",
        "official",
        "lstsq",
        "cosine",
        "residual",
        "full",
        "last",
        "all",
        "diep",
        "frequency",
        "router_weight",
        "replace",
        "router",
        "adtp",
        "fixed",
        "attention",
        "random",
        "cdpruner",
        "fastv",
        "pooling",
        "diversity",
        "positive",
        "negative",
        "line",
        "paragraph",
        "document",
        "",
        " ",
        "\t",
        "x" * 300,
        "c.txt",
        "out/x",
        "some/model",
        "\x00",
        "é",
        "null",
    }
)
HUGE_INTS = [2**31, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**30), 10**308, 10**400]
#: Ints of more than 4300 digits (Python will not print them: built by a map, so no repr is needed).
unprintable_ints = st.integers(4301, 4400).map(lambda digits: 10**digits)

keys = st.sampled_from(TOP_LEVEL_KEYS + ALL_FIELD_NAMES + ["method"]) | st.text(max_size=8)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 12)
    | st.integers()
    | st.sampled_from(HUGE_INTS)
    | unprintable_ints
    | st.floats()
    | st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.5, 1e-300, 1e300, math.inf, -math.inf, math.nan])
    | st.sampled_from(MEANINGFUL_STRINGS)
    | st.text(max_size=10)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


def either(*branches: st.SearchStrategy) -> st.SearchStrategy:
    """One of ``branches``, each about equally likely. (``a | b`` flattens nested one_ofs, so a branch
    that is itself a union of ten strategies would be drawn ten times as often.)"""
    return st.one_of(*(branch.map(lambda value: value) for branch in branches))


def typed_values(tp: Any) -> st.SearchStrategy:
    """Values of the declared type of a field (the edges included), so examples reach its config's checks."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        return st.one_of([typed_values(a) for a in args])
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is list or tp is list:
        return st.lists(typed_values(args[0] if args else Any), max_size=4)
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-3, 12) | st.integers() | st.sampled_from(HUGE_INTS) | unprintable_ints
    if tp is float:
        return (
            st.sampled_from([0.0, 1e-5, 0.05, 0.3, 0.5, 1.0, 1.5, -0.5, 1e300, math.inf, -math.inf, math.nan])
            | st.floats()
            | st.integers(-3, 3)
            | st.sampled_from(HUGE_INTS)
        )
    if tp is str:
        return st.sampled_from(MEANINGFUL_STRINGS) | st.text(max_size=10)
    return values


def section(cls: type) -> st.SearchStrategy[dict]:
    """A mapping for dataclass ``cls``: some of its fields, with values of their type or of any type, and
    sometimes a key it does not have."""
    hints = typing.get_type_hints(cls)
    fields = {
        name: either(typed_values(hints[name]), typed_values(hints[name]), values)
        for name in field_names(cls)
    }

    @st.composite
    def build(draw: st.DrawFn) -> dict:
        chosen = draw(st.lists(st.sampled_from(sorted(fields)), max_size=6, unique=True))
        entry = {name: draw(fields[name]) for name in chosen}
        entry.update(draw(st.dictionaries(keys, values, max_size=1)))
        return entry

    return build()


SECTIONS = {name: section(spec.config_cls) for name, spec in METHODS.items()}
#: Fields that make a stage of each built-in method valid on their own (each needs one of two budgets),
#: under the fuzzed ones half of the time, so the fuzzed fields meet the checks after the budget's.
STAGE_BASES = {
    "layer_drop": {"num_layers": 1},
    "replaceme": {"num_layers": 1},
    "expert_pruning": {"keep_experts": 2},
    "visual_token_pruning": {"budget": 4},
    "text_token_pruning": {"algorithm": "random", "keep_ratio": 0.5},
}


@st.composite
def stages(draw: st.DrawFn) -> dict:
    """A stage of a registered method (its fields fuzzed), or now and then of an unknown or missing one."""
    registered = st.sampled_from(sorted(METHODS))
    method = draw(either(*[registered] * 8, st.text(max_size=8), values))
    known = isinstance(method, str) and method in METHODS
    entry = draw(SECTIONS[method] if known else st.dictionaries(keys, values, max_size=4))
    if known and draw(st.booleans()):
        entry = {**STAGE_BASES.get(method, {}), **entry}
    if draw(st.sampled_from([True] * 9 + [False])):  # usually names its method
        entry["method"] = method
    return entry


TOP_LEVEL_VALUES = {
    "model": either(st.sampled_from(["some/model", "", "  "]), values),
    "output": either(st.sampled_from(["out/x", "", " "]), values),
    "dtype": either(st.sampled_from(DTYPES), values),
    "device": either(st.sampled_from([*DEVICES, "cuda:7", "tpu", "cuda:", "CUDA"]), values),
    "calibration": either(section(CalibrationConfig), values),
    "stages": either(st.lists(stages(), max_size=3), values),
    "evaluate": either(st.lists(section(EvaluationTask), max_size=2), values),
}
#: The parts of a recipe the focused tests leave valid while they fuzz one section.
VALID = {
    "model": "some/model",
    "output": "out/x",
    "calibration": {"data": "c.txt"},
    "stages": [{"method": "layer_drop", "layers": [1, 1]}],
}


@st.composite
def recipes(draw: st.DrawFn) -> dict:
    """Any top level: each key present or not, with a value of its kind or of any kind, plus strangers."""
    recipe = {
        key: draw(TOP_LEVEL_VALUES.get(key, either(st.booleans(), values)))
        for key in draw(st.lists(st.sampled_from(TOP_LEVEL_KEYS), unique=True))
    }
    recipe.update(draw(st.dictionaries(keys, values, max_size=1)))
    return recipe


@st.composite
def recipes_with_fuzzed_stages(draw: st.DrawFn) -> dict:
    return {**VALID, "stages": draw(st.lists(stages(), min_size=1, max_size=3))}


@st.composite
def recipes_with_fuzzed_sections(draw: st.DrawFn) -> dict:
    calibration = {"data": "c.txt", **draw(section(CalibrationConfig))}
    evaluate = [
        {"task": "perplexity", "data": "e.txt", **e}
        for e in draw(st.lists(section(EvaluationTask), max_size=2))
    ]
    return {**VALID, "calibration": calibration, "evaluate": evaluate}


#: Recipes fuzzed at the top level, in the stages, or in the calibration and evaluation sections.
any_recipe = either(
    recipes(), recipes_with_fuzzed_stages(), recipes_with_fuzzed_stages(), recipes_with_fuzzed_sections()
)


def load_checked(source, *, model_in_memory: bool = False) -> Recipe | HfPruneError:
    """Load ``source``; a project error is returned (its message checked short), anything else propagates."""
    try:
        recipe = load_recipe(source, model_in_memory=model_in_memory)
    except HfPruneError as error:
        assert len(str(error)) < MAX_MESSAGE, str(error)[:MAX_MESSAGE]
        return error
    assert isinstance(recipe, Recipe)
    # What loads is finite and serialisable: it goes into hf_prune.json.
    json.dumps(recipe.to_dict(), allow_nan=False, default=str)
    return recipe


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def dumped(dump, data) -> str:
    try:
        return dump(data)
    except (ValueError, yaml.representer.RepresenterError):  # ints too long to print: not expressible
        assume(False)


@FUZZ
@given(recipe=any_recipe, model_in_memory=st.booleans())
def test_recipe_dicts_load_or_raise_project_errors(recipe, model_in_memory):
    load_checked(recipe, model_in_memory=model_in_memory)


@FUZZ
@given(recipe=any_recipe)
def test_recipe_files_load_like_the_dicts_they_hold(folder, recipe):
    from_dict = load_checked(recipe)
    path = folder / "recipe.yaml"
    path.write_text(dumped(lambda d: yaml.safe_dump(d, sort_keys=False), recipe), encoding="utf-8")
    from_yaml = load_checked(path)
    # YAML holds every value the dict holds, so the file loads, or fails, the same way.
    if isinstance(from_dict, Recipe):
        assert isinstance(from_yaml, Recipe) and from_yaml.to_dict() == from_dict.to_dict()
    else:
        assert isinstance(from_yaml, HfPruneError) and str(from_yaml) == str(from_dict)
    path = folder / "recipe.json"
    path.write_text(
        dumped(lambda d: json.dumps(d, default=str), recipe), encoding="utf-8"
    )  # NaN, Infinity too
    load_checked(path)


RECIPE_LINES = [
    "model: some/model",
    "output: out/x",
    "stages:",
    "  - method: layer_drop",
    "    layers: [1, 1]",
    "    num_layers: 2",
    "  - method: replaceme",
    "calibration: {data: c.txt, num_samples: 4}",
    "device: cuda:1",
    "dtype: float16",
    "evaluate: [{task: perplexity, data: c.txt}]",
    "  lr: .inf",
    "base: &a [1, 2]",
    "copy: *a",
    "<<: *a",
    "  <<: {layers: [2, 2]}",
    "? [a, b]\n: c",
    "---",
    "...",
    "%YAML 1.1",
    "!!python/object:os.system",
    "x: !!binary aGVsbG8=",
    "x: !!binary ???",
    "x: !!timestamp 2024-99-99",
    "x: 2024-02-30",
    "x: !!int 0x",
    "x: !!float nan",
    "x: 1:2:3:4:5",
    "x: !!set {a, b}",
    "x: !!omap [a: 1]",
    "x: &r [*r]",
    "x: [[[[",
    "x: {{{",
    "'",
    '"',
    "\t",
    "\x00",
    "\ufeff",
    "x: 9" + "9" * 4400,
    '{"model": NaN}',
    "[1, 2, 3]",
]
raw_text = st.lists(st.sampled_from(RECIPE_LINES) | st.text(max_size=20), max_size=12).map("\n".join)
raw_bytes = raw_text.map(lambda text: text.encode("utf-8", "surrogatepass")) | st.binary(max_size=60)


@FUZZ
@given(data=raw_bytes, suffix=st.sampled_from([".yaml", ".json", ".yml", ""]))
def test_raw_file_contents_load_or_raise_project_errors(folder, data, suffix):
    path = folder / f"raw{suffix}"
    path.write_bytes(data)
    load_checked(path)


def test_bytes_that_are_not_text_get_a_clear_message(folder):
    path = folder / "binary.yaml"
    path.write_bytes(b"model: m\n\x80\x81\xfe\xff\n")
    error = load_checked(path)
    assert str(error) == f"recipe: {path} is not UTF-8 text (byte 0x80 at offset 9)"
