"""Bad input fails early with a clear message, and nothing is written."""

import json

import pytest
import torch
from tiny_models import save_tiny_model, tiny_llama_folder
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hf_prune
from hf_prune import RecipeError, UnsupportedModelError
from hf_prune.checkpoint import atomic_write_dir, load_model
from hf_prune.errors import DataError, HfPruneError


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """The 4-layer tiny Llama with its tokenizer: these checks need a model, not a trained one."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("bad-input") / "llama")


def tiny_recipe(tmp_path, model, **changes):
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time there was a cat.\n\nThe cat liked to play in the sun.\n")
    recipe = {
        "model": str(model),
        "output": str(tmp_path / "out"),
        "calibration": {"data": str(calib), "num_samples": 4, "seq_len": 32},
        "stages": [{"method": "replaceme", "num_layers": 1}],
    }
    recipe.update(changes)
    return recipe


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the pipeline gets as far as loading weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the recipe was validated")

    monkeypatch.setattr("hf_prune.pipeline.load_model", refuse)


def test_num_layers_not_below_layer_count(tmp_path, tiny_llama, no_model_loading):
    recipe = tiny_recipe(tmp_path, tiny_llama, stages=[{"method": "replaceme", "num_layers": 4}])
    with pytest.raises(
        RecipeError, match=r"stages\[0\].num_layers: must be less than the model's 4 decoder layers"
    ):
        hf_prune.prune(recipe)
    recipe = tiny_recipe(tmp_path, tiny_llama, stages=[{"method": "layer_drop", "layers": [3, 4]}])
    with pytest.raises(RecipeError, match=r"stages\[0\].layers: last layer must be below 4"):
        hf_prune.prune(recipe)
    assert not (tmp_path / "out").exists()


def test_missing_files_fail_before_loading(tmp_path, tiny_llama, no_model_loading):
    recipe = tiny_recipe(tmp_path, tiny_llama)
    recipe["calibration"]["data"] = str(tmp_path / "nope.txt")
    with pytest.raises(RecipeError, match="calibration.data: file not found"):
        hf_prune.prune(recipe)
    recipe = tiny_recipe(tmp_path, tiny_llama, evaluate=[{"task": "perplexity", "data": "missing/eval.txt"}])
    with pytest.raises(RecipeError, match=r"evaluate\[0\].data: file not found: missing/eval.txt"):
        hf_prune.prune(recipe)
    with pytest.raises(RecipeError, match="model: cannot load a config"):
        hf_prune.prune(tiny_recipe(tmp_path, tmp_path / "no-model"))
    assert not (tmp_path / "out").exists()


def test_empty_calibration_data_writes_nothing(tmp_path, tiny_llama):
    recipe = tiny_recipe(tmp_path, tiny_llama)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    recipe["calibration"]["data"] = str(empty)
    with pytest.raises(DataError, match="empty"):
        hf_prune.prune(recipe, progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_calibration_field_missing(tmp_path, tiny_llama):
    recipe = tiny_recipe(tmp_path, tiny_llama)
    data = tmp_path / "calib.jsonl"
    data.write_text(json.dumps({"body": "a story"}) + "\n")
    recipe["calibration"].update(data=str(data))
    with pytest.raises(DataError, match="no text field 'text'.*fields: body"):
        hf_prune.prune(recipe, progress=False)


def test_output_inside_or_equal_to_source_is_refused(tmp_path, no_model_loading):
    source = tiny_llama_folder(tmp_path / "src")
    before = sorted(p.name for p in source.iterdir())
    base = {"model": str(source), "stages": [{"method": "layer_drop", "layers": [1, 1]}]}
    for output in (source, source / "pruned", tmp_path):
        with pytest.raises(RecipeError, match="output: .*(inside|contains) the source model"):
            hf_prune.prune({**base, "output": str(output)})
    assert sorted(p.name for p in source.iterdir()) == before


def test_unsupported_architecture_lists_supported(tmp_path, no_model_loading):
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(folder)
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported \\(supported: .*llama.*mixtral"):
        hf_prune.prune(
            {
                "model": str(folder),
                "output": str(tmp_path / "out"),
                "stages": [{"method": "layer_drop", "layers": [1, 1]}],
            }
        )
    assert not (tmp_path / "out").exists()


def test_pickle_weights_refused_unless_allowed(tmp_path):
    folder = tmp_path / "pickled"
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(HfPruneError, match="allow_pickle"):
        load_model(str(folder))
    assert load_model(str(folder), allow_pickle=True).config.num_hidden_layers == 2


def test_interrupted_save_keeps_previous_output(tmp_path):
    target = tmp_path / "out"
    atomic_write_dir(target, lambda folder: (folder / "weights").write_text("v1"))

    def crash(folder):
        (folder / "weights").write_text("half-written")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_dir(target, crash)
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    atomic_write_dir(target, lambda folder: (folder / "weights").write_text("v2"))
    assert (target / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
