"""Recipe validation: every error names its key path and what is allowed, before any model is loaded."""

import json

import pytest
import yaml

import hf_prune
from hf_prune import RecipeError, load_recipe

BASE = {
    "model": "some/model",
    "output": "out/x",
    "calibration": {"data": "calib.txt", "num_samples": 8, "seq_len": 32},
    "stages": [{"method": "replaceme", "num_layers": 1}],
}


def with_changes(**changes):
    recipe = json.loads(json.dumps(BASE))
    recipe.update(changes)
    return recipe


def test_valid_recipe_from_yaml_and_json_files(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "r.json").write_text(json.dumps(BASE))
    from_yaml, from_json = load_recipe(tmp_path / "r.yaml"), load_recipe(str(tmp_path / "r.json"))
    assert from_yaml.to_dict() == from_json.to_dict()
    stage = from_yaml.stages[0]
    assert stage.method == "replaceme" and stage.config.num_layers == 1 and stage.config.estimator == "lstsq"
    assert from_yaml.calibration.seq_len == 32 and from_yaml.dtype == "auto"


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({k: v for k, v in BASE.items() if k != "model"}, "model: missing required key"),
        ({k: v for k, v in BASE.items() if k != "output"}, "output: missing required key"),
        (with_changes(modle="x"), "modle: unknown key (allowed: model, output"),
        (with_changes(dtype="int8"), "dtype: must be one of auto, float32, bfloat16, float16, got 'int8'"),
        (with_changes(stages=[]), "stages: must be a non-empty list"),
        (with_changes(stages=[{"num_layers": 1}]), "stages[0].method: missing required key"),
        (
            with_changes(stages=[{"method": "prune_everything"}]),
            "stages[0].method: unknown method 'prune_everything' (registered: cards, expert_pruning, gmp, granet, "
            "heal, layer_drop, lottery, replaceme",
        ),
        (
            with_changes(stages=[{"method": "replaceme", "num_layer": 1}]),
            "stages[0].num_layer: unknown key (allowed: num_layers, num_cuts, layers",
        ),
        (
            with_changes(stages=[{"method": "replaceme", "num_layers": "four"}]),
            "stages[0].num_layers: expected int or null, got str 'four'",
        ),
        (
            with_changes(stages=[{"method": "replaceme", "num_layers": True}]),
            "stages[0].num_layers: expected int or null, got bool True",
        ),
        (
            with_changes(stages=[{"method": "replaceme", "num_layers": 1, "estimator": "svd"}]),
            "stages[0].estimator: must be one of 'lstsq' | 'cosine', got 'svd'",
        ),
        (
            with_changes(stages=[{"method": "replaceme", "num_layers": 0}]),
            "stages[0].num_layers: must be a positive integer, got 0",
        ),
        (
            with_changes(stages=[{"method": "replaceme", "num_layers": 3, "num_cuts": 2}]),
            "stages[0].num_cuts: must divide num_layers (3), got 2",
        ),
        (
            with_changes(stages=[{"method": "replaceme", "num_layers": 1, "layers": [2, 3]}]),
            "stages[0].num_layers: give exactly one of num_layers or layers",
        ),
        (
            with_changes(stages=[{"method": "replaceme", "layers": [0, 1]}]),
            "stages[0].layers: must be [first, last] with 1 <= first <= last",
        ),
        (
            with_changes(stages=[{"method": "replaceme", "num_layers": 1, "ridge": -1}]),
            "stages[0].ridge: must be >= 0, got -1.0",
        ),
        (
            with_changes(calibration=None),
            "calibration: missing, but stages[0] (replaceme) needs calibration data",
        ),
        (
            with_changes(calibration={"data": "c.txt", "num_samples": -3}),
            "calibration.num_samples: must be a positive integer, got -3",
        ),
        (with_changes(calibration={"num_samples": 3}), "calibration.data: missing required key"),
        (
            with_changes(evaluate=[{"task": "bleu", "data": "x.txt"}]),
            "evaluate[0].task: unknown task 'bleu' (allowed: perplexity, multiple_choice, classification, vqa, "
            "corruption_robustness)",
        ),
        (with_changes(evaluate={"task": "perplexity"}), "evaluate: expected list, got dict"),
    ],
)
def test_bad_recipes_name_the_key(recipe, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert message in str(info.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(RecipeError, match="did you mean 'num_layers'"):
        load_recipe(with_changes(stages=[{"method": "layer_drop", "num_layer": 2}]))


def test_layer_drop_with_explicit_layers_needs_no_calibration():
    recipe = load_recipe(with_changes(calibration=None, stages=[{"method": "layer_drop", "layers": [2, 3]}]))
    assert recipe.calibration is None


def test_bad_files(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(listing)


def test_in_memory_recipe_may_omit_model_and_output():
    recipe = load_recipe({"stages": [{"method": "layer_drop", "layers": [1, 1]}]}, model_in_memory=True)
    assert recipe.model is None and recipe.output is None


def test_registry_lists_both_depth_methods_with_help():
    methods = hf_prune.registered_methods()
    assert {"replaceme", "layer_drop"} <= set(methods)
    fields = {name: help_text for name, _, _, help_text in methods["replaceme"].fields()}
    assert fields["estimator"] and fields["num_layers"] and "cosine" in fields["cosine_loss"]
