"""Fast checks of the embedded demo model recipe; builds use a handful of training steps."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pydoc_data.topics import topics

import pytest
import torch
from hf_prune.evals import demo_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

TINY_STEPS = 3


def _tiny_build(out_dir, seed=0):
    return demo_model.build_demo_model(out_dir, seed=seed, progress=False, _steps=TINY_STEPS)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return _tiny_build(tmp_path_factory.mktemp("demo") / "model")


def test_splits_are_disjoint_by_document_and_large_enough():
    splits = demo_model.demo_text_splits()
    assert set(splits) == {"train", "calibration", "eval"}
    assert len(splits["calibration"]) >= 15_000 and len(splits["eval"]) >= 15_000
    assert len(splits["train"]) > 0.8 * sum(len(text) for text in topics.values())
    for key, text in topics.items():
        holders = [name for name, split in splits.items() if text in split]
        assert len(holders) == 1, f"topic {key!r} found in {holders}"
    assert demo_model.demo_text_splits() == splits  # deterministic


def test_tokenizer_round_trips_and_prepends_bos(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    special_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>")]
    roles = ("unk_token_id", "bos_token_id", "eos_token_id", "pad_token_id")
    assert special_ids == [getattr(tokenizer, role) for role in roles]
    assert special_ids == [0, 1, 2, 3]
    assert len(tokenizer) == demo_model.VOCAB_SIZE
    text = "The  `with` statement wraps a block:\n\n    x = {'a': 1}  # café ünïcode 😀"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_tiny_build_loads_and_generates(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 6
    assert model.config.tie_word_embeddings
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 3)
    assert (tiny_model_dir / "generation_config.json").is_file()
    assert any(tiny_model_dir.glob("*.safetensors"))

    inputs = tokenizer(["The for statement", "A class"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and 0 < out.shape[1] - inputs["input_ids"].shape[1] <= 5

    record = json.loads((tiny_model_dir / "training.json").read_text())
    assert record["steps"] == TINY_STEPS and record["version"] == demo_model.DEMO_MODEL_VERSION
    assert record["eval_perplexity"] > 1 and record["final_train_loss"] > 0


@pytest.mark.slow
def test_same_seed_gives_identical_weights(tiny_model_dir, tmp_path):
    first = load_file(next(tiny_model_dir.glob("*.safetensors")))
    again = load_file(next(_tiny_build(tmp_path / "again", seed=0).glob("*.safetensors")))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    other = load_file(next(_tiny_build(tmp_path / "other", seed=1).glob("*.safetensors")))
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_build_leaves_no_temporary_folders(tiny_model_dir):
    assert [path.name for path in tiny_model_dir.parent.iterdir()] == [tiny_model_dir.name]


def test_build_keeps_a_folder_finished_first(tmp_path):
    # Simulates a concurrent build that won the race: its result stays, ours is dropped.
    out_dir = tmp_path / "model"
    out_dir.mkdir()
    (out_dir / "winner.txt").write_text("first")
    assert _tiny_build(out_dir) == out_dir
    assert [path.name for path in out_dir.iterdir()] == ["winner.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_model.LlamaForCausalLM, "save_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        _tiny_build(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_demo_model_dir_reuses_cache_and_honours_env(tmp_path, monkeypatch):
    cached = tmp_path / demo_model.DEMO_MODEL_VERSION
    cached.mkdir()
    monkeypatch.setattr(demo_model, "build_demo_model", lambda *a, **k: pytest.fail("rebuilt"))
    assert demo_model.demo_model_dir(tmp_path) == cached
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path))
    assert demo_model.demo_model_dir() == cached
