"""Hostile or careless recipes fail fast, small and early: duplicate keys, alias bombs, huge files, empty
output paths, non-finite numbers, unknown or absent devices, and stages that together remove too much."""

import time

import pytest
import torch
import transformers
from conftest import shared_asset

import hf_prune
from hf_prune import RecipeError, load_recipe
from hf_prune.adapters import get_adapter
from hf_prune.checkpoint import check_device
from hf_prune.errors import HfPruneError
from hf_prune.methods.depth.layer_drop import LayerDropConfig
from hf_prune.recipe_file import MAX_FILE_BYTES, MAX_YAML_NODES

STORIES = "models/stories260K"  # a 5-layer Llama
STAGE = {"method": "layer_drop", "layers": [1, 1]}  # needs no calibration data
BASE = {"model": "some/model", "output": "out/x", "stages": [STAGE]}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(source, *, model_in_memory=False) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(source, model_in_memory=model_in_memory)
    return str(info.value)


# ---- 1. duplicate keys ----------------------------------------------------------------------------


def test_duplicate_yaml_key_is_refused_with_its_line(tmp_path):
    path = write(
        tmp_path,
        "r.yaml",
        "model: m\noutput: o\nstages:\n  - method: layer_drop\n    num_layers: 1\n"
        "    distance_tokens: all\n    num_layers: 2\n",
    )
    message = refused(path)
    assert message.startswith("recipe: duplicate key 'num_layers' at line 7 (first at line 5)")
    top = write(tmp_path, "top.yaml", "model: m\noutput: o\noutput: other\nstages: [{method: layer_drop}]\n")
    assert "duplicate key 'output' at line 3" in refused(top)


def test_duplicate_yaml_key_on_one_line_is_refused(tmp_path):
    # A flow mapping puts both keys on one line: a check keyed on line numbers would miss it.
    path = write(
        tmp_path,
        "r.yaml",
        "model: m\noutput: o\nstages: [{method: layer_drop, layers: [1, 1], layers: [2, 2]}]\n",
    )
    assert "duplicate key 'layers' at line 3" in refused(path)


def test_duplicate_yaml_keys_compare_as_values(tmp_path):
    # 'output' quoted and plain, 1 and 0x1: the same key once read, though written differently.
    path = write(
        tmp_path,
        "r.yaml",
        "model: m\noutput: o\n'output': p\nstages: [{method: layer_drop, layers: [1, 1]}]\n",
    )
    assert "duplicate key 'output' at line 3" in refused(path)
    assert "duplicate key 1 at line 3 (first at line 2)" in refused(
        write(tmp_path, "int.yaml", "model: m\n1: a\n0x1: b\n")
    )


def test_merge_keys_may_be_overridden(tmp_path):
    # `<<: *anchor` then a key of the anchor's mapping is YAML's override, not a duplicate.
    path = write(
        tmp_path,
        "r.yaml",
        "model: m\noutput: o\nstages:\n  - &drop {method: layer_drop, layers: [1, 1]}\n"
        "  - {<<: *drop, layers: [3, 3]}\n",
    )
    recipe = load_recipe(path)
    assert [s.config.layers for s in recipe.stages] == [[1, 1], [3, 3]]


def test_duplicate_json_key_is_refused(tmp_path):
    path = write(
        tmp_path,
        "r.json",
        '{"model": "m", "output": "o", "stages": [{"method": "layer_drop", '
        '"layers": [1, 1], "layers": [2, 2]}]}',
    )
    message = refused(path)
    assert message.startswith(
        "recipe: duplicate key 'layers' in a JSON object (keys: method, layers, layers)"
    )


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_are_refused(tmp_path, constant):
    path = write(
        tmp_path,
        "r.json",
        '{"model": "m", "output": "o", "calibration": {"data": "c.txt"}, '
        f'"stages": [{{"method": "replaceme", "num_layers": 1, "lr": {constant}}}]}}',
    )
    assert refused(path) == f"recipe: {constant} is not allowed in a recipe (numbers must be finite)"


# ---- 2. alias bombs, huge files, bytes that are not text -------------------------------------------


def laughs(levels: int) -> str:
    """The "billion laughs" inside ``model:``: each anchor a list of 9 aliases of the one before, so the
    last holds 9**levels strings."""
    names = "abcdefghijklmnopqrstuvwxyz"[:levels]
    lines = ["model:", '  - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"  - &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip(names, names[1:], strict=False)]
    return "\n".join([*lines, "output: o", "stages: [{method: layer_drop}]", ""])


BILLION_LAUGHS = laughs(9)


def test_billion_laughs_fails_fast_with_a_short_message(tmp_path):
    path = write(tmp_path, "bomb.yaml", BILLION_LAUGHS)
    start = time.perf_counter()
    message = refused(path)
    assert time.perf_counter() - start < 0.5
    assert message.startswith(f"recipe: too many YAML nodes after expanding aliases (limit {MAX_YAML_NODES})")
    assert len(message) < 200


def test_alias_expansion_under_the_limit_is_reported_without_its_value(tmp_path):
    # 9**4 strings and their lists under `model`: within the node budget, so the error is the type of
    # `model`, quoted short.
    path = write(tmp_path, "r.yaml", laughs(4))
    message = refused(path)
    assert message.startswith("model: must be a non-empty model folder or hub id, got list [['lol', ")
    assert len(message) < 200


def test_recursive_alias_is_refused(tmp_path):
    path = write(tmp_path, "r.yaml", "model: &m [1, *m]\noutput: o\nstages: [{method: layer_drop}]\n")
    assert refused(path) == "recipe: a YAML alias refers to a node that contains it (a recursive structure)"


def test_a_recipe_with_a_few_aliases_loads(tmp_path):
    path = write(
        tmp_path,
        "r.yaml",
        "model: m\noutput: o\ncalibration: {data: &calib c.txt, num_samples: 4}\n"
        "evaluate: [{task: perplexity, data: *calib}]\n"
        "stages:\n  - &drop {method: layer_drop, layers: [1, 1]}\n  - *drop\n",
    )
    recipe = load_recipe(path)
    assert recipe.evaluate[0].data == recipe.calibration.data == "c.txt"
    assert [s.config.layers for s in recipe.stages] == [[1, 1], [1, 1]]


def test_file_larger_than_the_limit_is_refused_unread(tmp_path):
    path = write(tmp_path, "r.yaml", "model: m\n" + "#" * MAX_FILE_BYTES)
    message = refused(path)
    assert message == f"recipe: {path} is larger than 1,000,000 bytes; a recipe is a short text file"


def test_many_plain_nodes_are_refused_while_composing(tmp_path, monkeypatch):
    # It stops at the limit (here made small), long before composing the 200k nodes (which takes seconds).
    path = write(tmp_path, "r.yaml", "model: [" + "1," * 200_000 + "1]\n")
    monkeypatch.setattr("hf_prune.recipe_file.MAX_YAML_NODES", 1000)
    start = time.perf_counter()
    assert refused(path).startswith("recipe: too many YAML nodes (limit 1000)")
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize(
    "name, data", [("r.yaml", b"model: m\noutput: \xff\xfe\n"), ("r.json", b'{"model": "\xc3"}')]
)
def test_bytes_that_are_not_utf8_are_refused(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    offset = data.index(b"\xff" if b"\xff" in data else b"\xc3")
    assert refused(path) == f"recipe: {path} is not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset})"


@pytest.mark.parametrize("name, text", [("r.yaml", "model: " + "[" * 50_000), ("r.json", "[" * 50_000)])
def test_deep_nesting_is_refused(tmp_path, name, text):
    assert refused(write(tmp_path, name, text)).endswith("is nested too deeply to be a recipe")


def test_unreadable_scalars_name_their_line(tmp_path):
    path = write(tmp_path, "r.yaml", "model: m\noutput: o\nwhen: 2024-13-01\n")
    message = refused(path)
    assert (
        "is not valid YAML: cannot read '2024-13-01': month must be in 1..12" in message
        and "line 3" in message
    )
    digits = "9" * 5000
    assert "cannot read '99999" in refused(write(tmp_path, "big.yaml", f"model: m\nseed: {digits}\n"))
    assert "is not valid JSON" in refused(write(tmp_path, "big.json", f'{{"seed": {digits}}}'))


def test_an_empty_file_says_so(tmp_path):
    assert refused(write(tmp_path, "r.yaml", "# nothing\n")).startswith("recipe: the file is empty")


# ---- 3. messages never print a huge value -----------------------------------------------------------


@pytest.mark.parametrize(
    "changes, start",
    [
        ({"dtype": "x" * 100_000}, "dtype: must be one of auto, float32, bfloat16, float16, got 'xxx"),
        ({"device": "y" * 100_000}, "device: must be one of auto | cpu | cuda | cuda:N | mps"),
        ({"z" * 100_000: 1}, "zzzzz"),
        ({"stages": [{"method": "m" * 100_000}]}, "stages[0].method: unknown method 'mmm"),
        (
            {"stages": [{"method": "layer_drop", "num_layers": "n" * 100_000}]},
            "stages[0].num_layers: expected int or null",
        ),
        (
            {"stages": [{"method": "layer_drop", "distance_tokens": ["t" * 1000] * 1000}]},
            "stages[0].distance_tokens: must be one of 'last' | 'all', got ['ttt",
        ),
        (
            {"stages": [{"method": "layer_drop", "layers": list(range(100_000))}]},
            "stages[0].layers: must be [first, last]",
        ),
        (
            {"model": {"k": [list(range(1000))] * 1000}},
            "model: must be a non-empty model folder or hub id, got dict {",
        ),
        (
            {"stages": [{"method": "layer_drop", "num_layers": 10**5000}]},
            "stages[0].num_layers: must be an integer of at most 4300 digits, got <an integer of about 5001 digits>",
        ),
    ],
)
def test_messages_quote_values_short(changes, start):
    message = refused({**BASE, **changes})
    assert message.startswith(start)
    assert len(message) < 500


# ---- 4. model and output must name something ----------------------------------------------------


@pytest.mark.parametrize(
    "value, shown", [(None, "null"), ("", "str ''"), ("  \t", "str '  \\t'"), (3, "int 3")]
)
def test_output_and_model_must_be_non_empty(value, shown):
    assert refused({**BASE, "output": value}) == f"output: must be a non-empty folder path, got {shown}"
    assert (
        refused({**BASE, "model": value}) == f"model: must be a non-empty model folder or hub id, got {shown}"
    )


def test_output_null_in_a_yaml_file_is_refused(tmp_path):
    path = write(tmp_path, "r.yaml", "model: m\noutput:\nstages: [{method: layer_drop, layers: [1, 1]}]\n")
    assert refused(path) == "output: must be a non-empty folder path, got null"


def test_in_memory_model_output_is_optional_but_never_empty():
    stages = {"stages": [STAGE]}
    assert load_recipe(stages, model_in_memory=True).output is None
    assert load_recipe({**stages, "output": None}, model_in_memory=True).output is None
    for empty in ("", " "):
        assert refused({**stages, "output": empty}, model_in_memory=True).startswith(
            "output: must be a non-empty folder path"
        )
        assert refused({**stages, "model": empty}, model_in_memory=True).startswith(
            "model: must be a non-empty"
        )


# ---- 5. numbers must be finite ---------------------------------------------------------------------

REPLACEME = {"method": "replaceme", "num_layers": 1}
EXPERTS = {"method": "expert_pruning", "keep_experts": 2}


@pytest.mark.parametrize(
    "stage, key, value, shown",
    [
        (REPLACEME, "lr", float("inf"), "inf"),
        (REPLACEME, "ridge", float("nan"), "nan"),
        (REPLACEME, "lr", 10**400, "1000"),  # an int past float's range
        ({"method": "expert_pruning"}, "keep_ratio", float("nan"), "nan"),  # float | None
        (EXPERTS, "beta_init", float("inf"), "inf"),  # 'official' | float
        (EXPERTS, "lambda_recon", float("-inf"), "-inf"),
        ({"method": "text_token_pruning"}, "candidate_ratios", [0.5, float("nan")], "nan"),
        ({"method": "visual_token_pruning"}, "keep_ratio", float("inf"), "inf"),
    ],
)
def test_non_finite_numbers_are_refused(stage, key, value, shown):
    recipe = {**BASE, "calibration": {"data": "c.txt"}, "stages": [{**stage, key: value}]}
    message = refused(recipe)
    index = "[1]" if isinstance(value, list) else ""
    assert message.startswith(f"stages[0].{key}{index}: must be a finite number, got {shown}")


@pytest.mark.parametrize("literal", [".inf", "-.inf", ".nan", ".NaN", "1.0e+999"])
def test_yaml_infinity_and_nan_are_refused(tmp_path, literal):
    path = write(
        tmp_path,
        "r.yaml",
        f"model: m\noutput: o\ncalibration: {{data: c.txt}}\n"
        f"stages: [{{method: replaceme, num_layers: 1, lr: {literal}}}]\n",
    )
    assert "stages[0].lr: must be a finite number, got " in refused(path)


def test_huge_ints_are_left_to_the_methods_bounds():
    # No limit is invented: a seed of 10**30 loads; a num_layers of 10**30 fails the model's layer count.
    recipe = load_recipe({**BASE, "calibration": {"data": "c.txt", "seed": 10**30}})
    assert recipe.calibration.seed == 10**30


# ---- 6. devices ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps", "balanced", "balanced_low_0", "sequential"]
)
def test_device_names_that_load(device):
    assert load_recipe({**BASE, "device": device}).device == device


@pytest.mark.parametrize("device", ["tpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "cuda:0 ", "gpu", ""])
def test_unknown_devices_are_refused_at_load(device):
    message = refused({**BASE, "device": device})
    assert message == (
        "device: must be one of auto | cpu | cuda | cuda:N | mps | balanced | balanced_low_0 | "
        f"sequential, got {device!r}"
    )


def test_check_device_names_the_key_for_the_cli(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HfPruneError, match=r"^--device: 'cuda:0' needs a CUDA GPU.*; use auto or cpu$"):
        check_device("cuda:0", key="--device")
    with pytest.raises(HfPruneError, match=r"^--device: must be one of auto \| cpu .*, got 'tpu'$"):
        check_device("tpu", key="--device")
    check_device("cpu")
    check_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(
        HfPruneError,
        match=r"^device: 'cuda:2' does not exist; this machine has 2 CUDA devices "
        r"\(cuda:0 to cuda:1\)$",
    ):
        check_device("cuda:2")


# ---- pipeline: refused before any weights load, nothing written -------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the pipeline gets as far as loading weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the recipe was validated")

    monkeypatch.setattr("hf_prune.pipeline.load_model", refuse)


def stories_recipe(tmp_path, stages, **changes):
    calib = write(tmp_path, "calib.txt", "Once upon a time there was a cat.\n\nThe cat liked to play.\n")
    recipe = {
        "model": str(shared_asset(STORIES)),
        "output": str(tmp_path / "out"),
        "calibration": {"data": str(calib), "num_samples": 4, "seq_len": 32},
        "stages": stages,
    }
    return {**recipe, **changes}


def assert_nothing_written(tmp_path):
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


@pytest.mark.parametrize("output", [None, "", "   "])
def test_prune_without_an_output_loads_and_writes_nothing(tmp_path, no_model_loading, output):
    with pytest.raises(RecipeError, match="^output: must be a non-empty folder path"):
        hf_prune.prune(stories_recipe(tmp_path, [STAGE], output=output))
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("cuda_devices", [0, 1])
def test_absent_cuda_device_is_refused_before_loading(tmp_path, no_model_loading, monkeypatch, cuda_devices):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    device = "cuda:1" if cuda_devices else "cuda"
    expected = (
        r"device: 'cuda:1' does not exist; this machine has 1 CUDA device \(cuda:0 to cuda:0\)"
        if cuda_devices
        else r"device: 'cuda' needs a CUDA GPU"
    )
    with pytest.raises(RecipeError, match=f"^{expected}"):
        hf_prune.prune(stories_recipe(tmp_path, [STAGE], device=device))
    assert_nothing_written(tmp_path)


def test_huge_num_layers_fails_the_models_layer_count(tmp_path, no_model_loading):
    recipe = stories_recipe(tmp_path, [{"method": "layer_drop", "num_layers": 10**30}])
    with pytest.raises(
        RecipeError, match=r"^stages\[0\].num_layers: must be less than the model's 5 decoder layers"
    ):
        hf_prune.prune(recipe)
    assert_nothing_written(tmp_path)


# ---- 7. stages checked against the model the earlier stages leave ------------------------------------


@pytest.mark.parametrize(
    "stages, message",
    [
        (
            [{"method": "replaceme", "num_layers": 3}, {"method": "layer_drop", "num_layers": 2}],
            r"stages[1].num_layers: must be less than the model's 2 decoder layers, got 2 "
            r"(the model as stages[0] (replaceme) will leave it)",
        ),
        (
            [
                {"method": "layer_drop", "layers": [1, 2]},
                {"method": "layer_drop", "layers": [1, 1]},
                {"method": "layer_drop", "layers": [2, 2]},
            ],
            r"stages[2].layers: last layer must be below 2 (the model's decoder layers), got [2, 2] "
            r"(the model as stages[0] (layer_drop), stages[1] (layer_drop) will leave it)",
        ),
        (
            [
                {"method": "layer_drop", "num_layers": 2},
                {"method": "text_token_pruning", "algorithm": "random", "keep_ratio": 0.5, "layer": 3},
            ],
            r"stages[1].layer: must be below the model's 3 layers, got 3 "
            r"(the model as stages[0] (layer_drop) will leave it)",
        ),
    ],
)
def test_stages_together_removing_too_much_fail_before_loading(tmp_path, no_model_loading, stages, message):
    with pytest.raises(RecipeError) as info:
        hf_prune.prune(stories_recipe(tmp_path, stages))
    assert str(info.value) == message
    assert_nothing_written(tmp_path)


def test_stages_that_fit_together_pass_the_checks(tmp_path, no_model_loading):
    stages = [{"method": "replaceme", "num_layers": 2}, {"method": "layer_drop", "num_layers": 2}]
    with pytest.raises(AssertionError, match="the model was loaded"):  # every check passed
        hf_prune.prune(stories_recipe(tmp_path, stages))


def mixtral_folder(tmp_path):
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    config.save_pretrained(tmp_path / "mixtral")
    return tmp_path / "mixtral"


def test_expert_stages_carry_the_expert_count(tmp_path, no_model_loading):
    stages = [
        {"method": "expert_pruning", "algorithm": "frequency", "keep_ratio": 0.75},
        {"method": "expert_pruning", "algorithm": "frequency", "keep_experts": 4},
    ]
    recipe = stories_recipe(tmp_path, stages, model=str(mixtral_folder(tmp_path)))
    with pytest.raises(RecipeError) as info:
        hf_prune.prune(recipe)
    assert str(info.value) == (
        "stages[1].keep_experts: must be in [2, 3] for this model (at least its 2 experts per "
        "token, at most its 3 experts per layer), got 4 "
        "(the model as stages[0] (expert_pruning) will leave it)"
    )
    assert not (tmp_path / "out").exists()


def test_predicted_config_matches_the_removal_and_leaves_the_original_alone():
    config = transformers.Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=16,
        num_hidden_layers=5,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
        mlp_only_layers=[4],
        layer_types=["full_attention", "sliding_attention"] * 2 + ["full_attention"],
    )
    adapter = get_adapter(config)
    before = config.to_dict()
    stage = LayerDropConfig(layers=[1, 2])
    predicted = stage.predict_config(config, adapter)
    assert config.to_dict() == before and predicted is not config
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(config)
    adapter.remove_layers(model, [1, 2])
    for key in ("num_hidden_layers", "layer_types", "mlp_only_layers", "decoder_sparse_step"):
        assert getattr(predicted, key) == getattr(model.config, key), key
    assert adapter.experts_per_layer_from_config(predicted) == [0, 4, 0]
