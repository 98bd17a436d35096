"""Fast checks of the MoE testbed recipe: tiny builds (3 steps, small held-out splits) into tmp_path."""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import pytest
import torch
from conftest import shared_asset
from hf_prune.evals.testbeds import moe_routing, moe_testbed
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow  # builds a testbed or runs fresh processes

TINY_STEPS = 3
# Smaller held-out splits and fewer sampled stories keep a tiny build to a few seconds.
TINY_SIZES = {"STORY_SAMPLES": 64, "EVAL_CHARS": 3_000, "CALIBRATION_CHARS": 2_000}


def _assets():
    for relpath in moe_testbed.SOURCES.values():
        shared_asset(relpath)  # skips (or fails) without the shared assets, fails on a missing file
    return shared_asset(".")


def _tiny_build(out_dir, seed=0):
    with pytest.MonkeyPatch.context() as patch:
        for name, value in TINY_SIZES.items():
            patch.setattr(moe_testbed, name, value)
        return moe_testbed.build_moe_testbed(
            out_dir, assets=_assets(), seed=seed, progress=False, _steps=TINY_STEPS
        )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _tiny_build(tmp_path_factory.mktemp("moe") / "testbed")


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


def _split_texts(folder, split):
    return {
        domain: (folder / "data" / f"{split}_{domain}.txt").read_text(encoding="utf-8")
        for domain in moe_testbed.DOMAINS
    }


def test_tiny_build_loads_as_a_stock_mixtral(tiny_dir, tiny_model):
    model, tokenizer = tiny_model
    config = model.config
    assert type(model).__name__ == "MixtralForCausalLM" and config.model_type == "mixtral"
    assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)
    assert (
        config.num_hidden_layers == moe_testbed.NUM_LAYERS and config.hidden_size == moe_testbed.HIDDEN_SIZE
    )
    assert config.output_router_logits is False  # a plain forward's loss is the LM loss
    assert len(tokenizer) == moe_testbed.VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    text = "ROMEO:\nA <unk> of the 1985 plot , @-@ once upon a time."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids  # "<unk>" stays text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Experts are independent draws, not copies.
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.allclose(experts[0], experts[1])

    inputs = tokenizer(["Once upon a time", "KING"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]

    record = json.loads((tiny_dir / "testbed.json").read_text())
    assert record["version"] == moe_testbed.MOE_TESTBED_VERSION and record["steps"] == TINY_STEPS
    assert record["seconds"] > 0 and set(record["seconds_by_stage"]) == {
        "data",
        "tokenizer",
        "training",
        "evaluation",
    }
    assert set(record["eval_perplexity"]) == set(moe_testbed.DOMAINS)
    assert all(ppl > 1 for ppl in record["eval_perplexity"].values())
    losses = record["final_losses"]
    assert set(losses["train_ce_by_domain"]) == set(moe_testbed.DOMAINS) and losses["train_ce"] > 0
    assert (
        0.5 < losses["load_balancing_loss"] < 8 and losses["router_z_loss"] > 0
    )  # Switch loss: 1 when balanced
    assert len(record["routing"]["layers"]) == moe_testbed.NUM_LAYERS
    assert set(record["ablation"]["most_vs_least"]) == set(moe_testbed.DOMAINS)
    assert {"load_spread", "ablation", "passed"} <= set(record["checks"])


def test_same_seed_gives_identical_weights(tiny_dir, tmp_path):
    first = load_file(tiny_dir / "model.safetensors")
    again = load_file(_tiny_build(tmp_path / "again", seed=0) / "model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert (tiny_dir / "tokenizer.json").read_text() == (tmp_path / "again" / "tokenizer.json").read_text()
    other = load_file(_tiny_build(tmp_path / "other", seed=1) / "model.safetensors")
    assert not all(torch.equal(first[name], other[name]) for name in first)
    # The data do not depend on the training seed.
    assert _split_texts(tiny_dir, "eval") == _split_texts(tmp_path / "other", "eval")
    assert {p.name for p in tmp_path.iterdir()} == {"again", "other"}  # no temporary folders left


def test_splits_are_disjoint_slices_of_the_sources(tiny_dir):
    record = json.loads((tiny_dir / "testbed.json").read_text())
    splits = {name: _split_texts(tiny_dir, name) for name in ("train", "calibration", "eval")}
    for domain in moe_testbed.DOMAINS:
        ranges = record["data"][domain]["char_ranges"]
        (a, b), (c, d), (e, f) = ranges["train"], ranges["calibration"], ranges["eval"]
        assert a == 0 and b == c and d == e and a < b < d < f  # contiguous, non-overlapping, in order
        assert len(splits["eval"][domain]) >= TINY_SIZES["EVAL_CHARS"]
        assert len(splits["calibration"][domain]) >= TINY_SIZES["CALIBRATION_CHARS"]
        if domain != "stories":  # real files: each split is exactly its slice of the source
            source = shared_asset(moe_testbed.SOURCES[domain]).read_text(encoding="utf-8")
            assert f == len(source)
            for name, (start, end) in ranges.items():
                assert splits[name][domain] == source[start:end].strip("\n") + "\n"
    # Sampled stories: one per paragraph, and no story is in two splits.
    stories = {name: set(texts["stories"].strip("\n").split("\n\n")) for name, texts in splits.items()}
    assert not stories["train"] & stories["eval"] and not stories["train"] & stories["calibration"]
    assert not stories["calibration"] & stories["eval"]
    assert len(stories["eval"]) >= 2

    # The mixed calibration file: blank-line-separated records, every line from a calibration split.
    mixed = (tiny_dir / "data" / "calibration.txt").read_text(encoding="utf-8")
    records = [r for r in mixed.split("\n\n") if r.strip()]
    assert len(records) >= len(moe_testbed.DOMAINS)
    calibration_lines = {line for text in splits["calibration"].values() for line in text.split("\n")}
    assert all(line in calibration_lines for record_text in records for line in record_text.split("\n"))
    first_records = records[: len(moe_testbed.DOMAINS)]  # one record of each domain, in turn
    assert [
        record_text.split("\n")[0] in splits["calibration"][d]
        for record_text, d in zip(first_records, moe_testbed.DOMAINS, strict=True)
    ] == [True] * len(moe_testbed.DOMAINS)


def test_routing_report_fields(tiny_dir, tiny_model):
    model, tokenizer = tiny_model
    texts = _split_texts(tiny_dir, "eval")
    report = moe_testbed.routing_report(model, tokenizer, texts, max_tokens=300)
    assert (report["num_experts"], report["top_k"]) == (8, 2)
    assert report["tokens"] == dict.fromkeys(moe_testbed.DOMAINS, 300)
    assert [layer["layer"] for layer in report["layers"]] == list(range(moe_testbed.NUM_LAYERS))
    for layer in report["layers"]:
        assert len(layer["load"]) == 8 and math.isclose(sum(layer["load"]), 1, abs_tol=1e-3)
        assert layer["max_load"] == max(layer["load"]) and layer["min_load"] == min(layer["load"])
        assert 0 < layer["load_entropy"] <= math.log(8) + 1e-6
        assert math.isclose(
            layer["normalised_load_entropy"], layer["load_entropy"] / math.log(8), abs_tol=1e-3
        )
        assert 0 < layer["router_entropy"] <= math.log(8) + 1e-6
        assert set(layer["per_domain_load"]) == set(moe_testbed.DOMAINS)
        for domain, load in layer["per_domain_load"].items():
            assert math.isclose(sum(load), 1, abs_tol=1e-3)
            assert len(layer["per_domain_top_experts"][domain]) == 2
            assert 0 <= layer["domain_load_distance"][domain] <= 1
    json.dumps(report)  # plain JSON types only


def test_ablation_check_fields(tiny_dir, tiny_model):
    model, tokenizer = tiny_model
    texts = _split_texts(tiny_dir, "eval")
    result = moe_testbed.ablation_check(model, tokenizer, texts, max_tokens=256)
    assert result["num_removed"] == 2
    for layer in range(moe_testbed.NUM_LAYERS):
        most, least = result["removed"]["most_used"][layer], result["removed"]["least_used"][layer]
        assert len(most) == len(least) == 2 and not set(most) & set(least)
    perplexity = result["perplexity"]
    assert set(perplexity) == {"baseline", "most_used_removed", "least_used_removed"}
    for values in perplexity.values():
        assert set(values) == set(moe_testbed.DOMAINS) and all(v > 1 for v in values.values())
    assert perplexity["most_used_removed"] != perplexity["baseline"]  # masking experts changes the model
    for domain in moe_testbed.DOMAINS:
        ratio = perplexity["most_used_removed"][domain] / perplexity["least_used_removed"][domain]
        assert math.isclose(result["most_vs_least"][domain], ratio, rel_tol=1e-3)
        assert math.isclose(
            result["ratio_to_baseline"]["most_used_removed"][domain],
            perplexity["most_used_removed"][domain] / perplexity["baseline"][domain],
            rel_tol=1e-3,
        )
        own = result["per_domain"][domain]
        assert {"most_used", "least_used", "most_used_removed", "least_used_removed", "most_vs_least"} <= set(
            own
        )
    json.dumps(result)
    # Hooks are removed afterwards: the model is unchanged.
    tokens = moe_routing.token_stream(tokenizer, texts["stories"], 256)
    before = moe_routing._perplexity_without(model, tokens, {})
    assert math.isclose(before, perplexity["baseline"]["stories"], rel_tol=1e-3)


def test_masked_experts_get_no_tokens(tiny_dir, tiny_model):
    model, tokenizer = tiny_model
    tokens = moe_routing.token_stream(tokenizer, _split_texts(tiny_dir, "eval")["wikitext"], 200)
    seen = []
    hook = model.model.layers[1].mlp.experts.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    try:
        moe_routing._perplexity_without(model, tokens, {1: [0, 1, 2, 3, 4, 5]})
    finally:
        hook.remove()
    assert seen and set(torch.cat([s.reshape(-1) for s in seen]).tolist()) == {6, 7}


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(moe_testbed.MixtralForCausalLM, "save_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        _tiny_build(tmp_path / "testbed")
    assert list(tmp_path.iterdir()) == []


def test_moe_testbed_dir_reuses_cache_and_honours_env(tmp_path, monkeypatch):
    cached = tmp_path / moe_testbed.MOE_TESTBED_VERSION
    cached.mkdir()
    monkeypatch.setattr(moe_testbed, "build_moe_testbed", lambda *a, **k: pytest.fail("rebuilt"))
    assert moe_testbed.moe_testbed_dir(tmp_path) == cached
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path))
    assert moe_testbed.moe_testbed_dir() == cached


def test_moe_testbed_dir_builds_into_the_versioned_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(moe_testbed, "build_moe_testbed", lambda out, **k: calls.append((out, k)) or out)
    assert moe_testbed.moe_testbed_dir(tmp_path, assets="/somewhere") == tmp_path / "moe-testbed-v1"
    assert calls == [(tmp_path / "moe-testbed-v1", {"assets": "/somewhere"})]
