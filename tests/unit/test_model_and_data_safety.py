"""Broken checkpoints and bad data are refused with one clear line, and nothing is written.

Models: weights that do not match config.json (more layers, a renamed key, a wrong shape), corrupt or
truncated safetensors files, absurd config sizes; the stock models still load. Data: empty, binary,
UTF-16 and bad-JSONL files for calibration and evaluation, too few calibration tokens, and an evaluation
window longer than the model's positions.
"""

import json
import shutil
import time

import pytest
import torch
from conftest import shared_asset
from hf_prune.evals.perplexity import evaluate_perplexity, load_text
from safetensors.torch import load_file, save_file
from tiny_models import build_tokenizer, save_tiny_model, write_calibration_file
from transformers import LlamaConfig, LlamaForCausalLM

import hf_prune
from hf_prune.calibration import build_calibration
from hf_prune.checkpoint import load_config, load_model, load_preprocessor
from hf_prune.checkpoint_checks import check_config_sizes, group_keys
from hf_prune.cli import main
from hf_prune.data import load_text_records, read_records
from hf_prune.errors import CalibrationError, CalibrationWarning, DataError, ModelError, RecipeError
from hf_prune.recipe import CalibrationConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HIDDEN = 32
LAYERS = 3
POSITIONS = 64


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A tiny Llama with lm_head tied to the embeddings (like stories260K), saved with its tokenizer."""
    folder = tmp_path_factory.mktemp("models") / "tied-llama"
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def model_copy(tied_llama, tmp_path):
    return shutil.copytree(tied_llama, tmp_path / "model")


@pytest.fixture(scope="module")
def calibration_text(tmp_path_factory):
    return write_calibration_file(tmp_path_factory.mktemp("data") / "pydoc.txt", num_chars=6000)


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder, edit):
    path = folder / "model.safetensors"
    weights = edit(load_file(path))
    save_file(weights, path, metadata={"format": "pt"})


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ---- weights that do not match config.json ------------------------------------------------------------


def test_config_with_more_layers_than_the_weights_is_refused_naming_the_layers(model_copy):
    edit_config(model_copy, num_hidden_layers=LAYERS + 2)  # layers 3 and 4 would be random
    with pytest.raises(
        ModelError,
        match=r"weights do not match config.json: missing model\.layers\.3\.\*, "
        r"model\.layers\.4\.\* \(18 keys\)$",
    ):
        load_model(str(model_copy))


def test_renamed_key_is_refused_as_missing_and_unexpected(model_copy):
    def rename(weights):
        weights["model.layers.1.mlp.down.weight"] = weights.pop("model.layers.1.mlp.down_proj.weight")
        return weights

    edit_weights(model_copy, rename)
    with pytest.raises(
        ModelError,
        match=r"missing model\.layers\.1\.mlp\.down_proj\.weight \(1 key\); "
        r"unexpected model\.layers\.1\.mlp\.down\.weight \(1 key\)",
    ):
        load_model(str(model_copy))


def test_wrong_shape_is_refused_naming_both_shapes(model_copy):
    def shrink(weights):
        weights["model.layers.2.mlp.up_proj.weight"] = torch.zeros(60, HIDDEN)
        return weights

    edit_weights(model_copy, shrink)
    with pytest.raises(
        ModelError,
        match=r"wrong shape model\.layers\.2\.mlp\.up_proj\.weight "
        r"\(checkpoint \[60, 32\], config \[64, 32\]\)",
    ):
        load_model(str(model_copy))


def test_mismatched_weights_refused_by_eval_and_prune_commands(
    model_copy, calibration_text, tmp_path, capsys
):
    edit_config(model_copy, num_hidden_layers=LAYERS + 2)
    results = tmp_path / "results.json"
    assert (
        main(
            [
                "eval",
                str(model_copy),
                "--task",
                "perplexity",
                "--data",
                str(calibration_text),
                "--output",
                str(results),
                "--quiet",
            ]
        )
        == 2
    )
    assert "missing model.layers.3.*, model.layers.4.* (18 keys)" in one_error_line(capsys)
    assert not results.exists()

    out = tmp_path / "pruned"
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps(
            {
                "model": str(model_copy),
                "output": str(out),
                "stages": [{"method": "layer_drop", "layers": [1, 1]}],
            }
        )
    )
    assert main(["prune", str(recipe), "--quiet"]) == 2
    assert "weights do not match config.json: missing model.layers.3.*" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "recipe.json"]  # no output, no temp folder


def test_key_groups_stay_one_short_line():
    keys = [f"model.layers.{layer}.{name}.weight" for layer in range(10) for name in ("q", "k", "v")]
    assert group_keys(keys + ["lm_head.weight"]) == (
        "lm_head.weight, model.layers.0.*, model.layers.1.*, model.layers.2.*, model.layers.3.*, "
        "model.layers.4.*, … and 5 more (31 keys)"
    )


# ---- corrupt weight files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("truncated", r"\([\d,]+ bytes, its tensors need [\d,]+\)"),
        ("garbage", r"\(its header claims [\d,]+ bytes, the file has [\d,]+\)"),
    ],
    ids=["truncated", "garbage"],
)
def test_corrupt_safetensors_refused_before_loading(
    model_copy, damage, reason, monkeypatch, capsys, calibration_text
):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes([0x5A]) * len(data))
    expected = rf"model/model\.safetensors: corrupt or truncated safetensors file {reason}"
    with pytest.raises(ModelError, match=expected):
        load_model(str(model_copy))
    assert (
        main(["eval", str(model_copy), "--task", "perplexity", "--data", str(calibration_text), "--quiet"])
        == 2
    )
    assert "corrupt or truncated safetensors file" in one_error_line(capsys)


def test_safetensors_errors_inside_from_pretrained_are_wrapped(model_copy, monkeypatch):
    # Without the header check, transformers' own SafetensorError must still come out as a ModelError.
    monkeypatch.setattr("hf_prune.checkpoint.read_safetensors_headers", lambda *args, **kwargs: {})
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(
        ModelError, match=r"model: corrupt or truncated safetensors file \(Error while deserializing"
    ):
        load_model(str(model_copy))


# ---- absurd configs ---------------------------------------------------------------------------------------


def test_billion_layer_config_refused_by_inspect_before_anything_is_built(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "huge"
    folder.mkdir()
    # Qwen2's config builds a per-layer list in __init__: 10⁹ entries would hang before any model exists.
    (folder / "config.json").write_text(
        json.dumps(
            {"model_type": "qwen2", "num_hidden_layers": 10**9, "hidden_size": 64, "num_attention_heads": 4}
        )
    )

    def refuse(*args, **kwargs):
        raise AssertionError("a config object was built before the sizes were checked")

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", refuse)
    started = time.perf_counter()
    assert main(["inspect", str(folder)]) == 2
    assert time.perf_counter() - started < 5
    err = one_error_line(capsys)
    assert "config.json: num_hidden_layers = 1,000,000,000 is outside the sane range 1..4,096" in err


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"text_config": {"hidden_size": -8}},
            r"text_config\.hidden_size = -8 is outside the sane range 1\.\.131,072",
        ),
        ({"vision_config": {"num_hidden_layers": 0}}, r"vision_config\.num_hidden_layers = 0 is outside"),
        ({"vocab_size": 2**30}, r"vocab_size = 1,073,741,824 is outside the sane range 1\.\.16,777,216"),
        (
            {"num_local_experts": 10**6},
            r"num_local_experts = 1,000,000 is outside the sane range 0\.\.65,536",
        ),
    ],
)
def test_config_sizes_checked_at_every_level(config, message):
    with pytest.raises(ModelError, match=message):
        check_config_sizes({"model_type": "llava", **config})
    check_config_sizes(
        {"model_type": "mixtral", "num_local_experts": 0, "text_config": {"hidden_size": 4096}}
    )


def test_config_far_larger_than_its_weights_is_refused(model_copy):
    edit_config(model_copy, num_hidden_layers=4000)  # within the bounds, ~1000× the weights
    with pytest.raises(
        ModelError,
        match=r"config.json describes at least ~\d.*parameters, but the weight files "
        r"hold [\d,]+ values",
    ):
        load_config(str(model_copy))


@pytest.mark.parametrize("kind", ["stories260K", "tied_llama", "mixtral", "qwen2_moe", "llava"])
def test_stock_models_load_without_false_alarms(kind, tied_llama, tmp_path):
    if kind == "stories260K":
        folder = shared_asset("models/stories260K")
    elif kind == "tied_llama":
        folder = tied_llama
    else:
        folder = save_tiny_model(kind, tmp_path / kind)
    load_config(str(folder))
    model = load_model(str(folder))
    if kind in ("stories260K", "tied_llama"):
        assert model.lm_head.weight is model.model.embed_tokens.weight


# ---- bad data files ---------------------------------------------------------------------------------------

BAD_FILES = {
    "empty": (b"", r"the file is empty"),
    "binary": (b"PK\x03\x04\x14\x00\x00\x00\x08\x00", r"not text \(NUL byte at offset 5\): a binary file"),
    "utf16": (
        "Once upon a time\n".encode("utf-16"),
        r"not UTF-8 text \(byte 0xff at offset 0: a UTF-16 byte-order mark\); convert it to UTF-8",
    ),
    "latin1": ("Il était une fois\n".encode("latin-1"), r"not UTF-8 text \(byte 0xe9 at offset 3\)"),
}
READERS = {
    "calibration": lambda path: load_text_records(str(path)),
    "perplexity": lambda path: load_text(str(path)),
    "records": lambda path: read_records(str(path)),  # classification, multiple choice, vqa
}


@pytest.mark.parametrize(
    "reader, suffix",
    [
        (reader, suffix)
        for reader in READERS
        for suffix in (".txt", ".jsonl")
        if (reader, suffix) != ("records", ".txt")
    ],
)  # records: jsonl/json/parquet
@pytest.mark.parametrize("kind", BAD_FILES)
def test_unreadable_data_files_are_named(kind, suffix, reader, tmp_path):
    content, message = BAD_FILES[kind]
    path = tmp_path / f"{kind}{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{kind}{suffix}: {message}"):
        READERS[reader](path)


@pytest.mark.parametrize("reader", READERS)
def test_bad_jsonl_row_is_named_by_line(reader, tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": three}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"calib\.jsonl:3: not valid JSON"):
        READERS[reader](path)


def test_unreadable_parquet_and_missing_files_are_data_errors(tmp_path):
    broken = tmp_path / "table.parquet"
    broken.write_bytes(b"not a parquet file")
    for reader in (load_text_records, read_records):
        with pytest.raises(DataError, match=r"table\.parquet: cannot be read as"):
            reader(str(broken))
        with pytest.raises(DataError, match="data file not found"):
            reader(str(tmp_path / "missing.jsonl"))


def test_bad_calibration_row_through_the_prune_command(tied_llama, tmp_path, capsys):
    data = tmp_path / "calib.jsonl"
    data.write_text('{"text": "one"}\n\n{"text": 2}\n', encoding="utf-8")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps(
            {
                "model": str(tied_llama),
                "output": str(tmp_path / "out"),
                "calibration": {"data": str(data)},
                "stages": [{"method": "replaceme", "num_layers": 1}],
            }
        )
    )
    assert main(["prune", str(recipe), "--quiet"]) == 2
    assert "calib.jsonl:3: field 'text' holds int values, not text" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


# ---- calibration token count ------------------------------------------------------------------------------


def prune_recipe(model, data, output, **calibration):
    return {
        "model": str(model),
        "output": str(output),
        "calibration": {"data": str(data), **calibration},
        "stages": [{"method": "replaceme", "num_layers": 1}],
    }


@pytest.mark.filterwarnings(
    "ignore::hf_prune.errors.CalibrationWarning"
)  # 11 tokens of 256 requested: it warns too
def test_too_few_tokens_for_lstsq_is_refused_with_the_numbers(tied_llama, tmp_path):
    sentence = tmp_path / "one.txt"
    sentence.write_text("The cat sat.\n", encoding="utf-8")  # a handful of tokens for a 32×32 map
    with pytest.raises(
        CalibrationError,
        match=rf"gives \d+ tokens, fewer than the {HIDDEN} that stages\[0\] "
        r"\(replaceme\) needs on this model \(requested: num_samples 4 × "
        r"seq_len 64 = 256\)",
    ) as caught:
        hf_prune.prune(
            prune_recipe(tied_llama, sentence, tmp_path / "out", num_samples=4, seq_len=64), progress=False
        )
    assert 2 <= int(str(caught.value).split(" gives ")[1].split(" tokens")[0]) < HIDDEN
    assert not (tmp_path / "out").exists()


def test_a_request_below_the_floor_is_refused_before_loading(
    tied_llama, calibration_text, tmp_path, monkeypatch
):
    monkeypatch.setattr("hf_prune.pipeline.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(
        RecipeError,
        match=rf"calibration.num_samples: 2 × seq_len 8 = 16 tokens at most, fewer than "
        rf"the {HIDDEN} that stages\[0\] \(replaceme\) needs",
    ):
        hf_prune.prune(prune_recipe(tied_llama, calibration_text, tmp_path / "out", num_samples=2, seq_len=8))


def test_fewer_tokens_than_requested_warns_and_still_runs(tied_llama, calibration_text, tmp_path):
    recipe = prune_recipe(tied_llama, calibration_text, tmp_path / "out", num_samples=64, seq_len=64)
    with pytest.warns(
        CalibrationWarning,
        match=r"gives ([\d,]+) tokens, fewer than the 4,096 requested "
        r"\(num_samples 64 × seq_len 64\)",
    ) as caught:
        result = hf_prune.prune(recipe, progress=False)
    assert result.output.is_dir() and result.report["stages"][0]["removed_layers"]
    message = next(str(w.message) for w in caught if issubclass(w.category, CalibrationWarning))
    used = int(message.split(" gives ")[1].split(" tokens")[0].replace(",", ""))
    assert HIDDEN <= used < 4096
    assert result.report["stages"][0]["cuts"][0]["calibration_tokens"] == used


def test_enough_calibration_tokens_give_no_warning(tied_llama, calibration_text, recwarn):
    config = CalibrationConfig(data=str(calibration_text), num_samples=4, seq_len=32, packing=True)
    batches = build_calibration(config, load_preprocessor(str(tied_llama)))
    assert sum(batch.num_tokens for batch in batches) == 4 * 32
    assert not [w for w in recwarn if issubclass(w.category, CalibrationWarning)]


# ---- evaluation window beyond the model's positions -------------------------------------------------------


def test_eval_seq_len_beyond_positions_is_clamped_and_reported(
    tied_llama, calibration_text, tmp_path, capsys
):
    results = tmp_path / "results.json"
    with pytest.warns(UserWarning, match=rf"seq_len 100000 is longer than the model's {POSITIONS} positions"):
        code = main(
            [
                "eval",
                str(tied_llama),
                "--task",
                "perplexity",
                "--data",
                str(calibration_text),
                "--seq-len",
                "100000",
                "--device",
                "cpu",
                "--output",
                str(results),
                "--quiet",
            ]
        )
    assert code == 0
    clamped = json.loads(results.read_text())
    assert clamped["seq_len"] == POSITIONS and clamped["seq_len_clamped_from"] == 100000

    model, tokenizer = load_model(str(tied_llama), device="cpu"), load_preprocessor(str(tied_llama))
    at_limit = evaluate_perplexity(model, tokenizer, calibration_text, seq_len=POSITIONS, progress=False)
    assert "seq_len_clamped_from" not in at_limit
    assert clamped["perplexity"] == pytest.approx(at_limit["perplexity"], rel=1e-6)
    assert clamped["num_windows"] == at_limit["num_windows"] > 1
