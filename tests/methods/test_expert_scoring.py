"""Expert scoring (router statistics, DiEP), selection, and the ``expert_pruning`` method end to end."""

import copy
import json

import pytest
import torch
import transformers
from tiny_models import (
    MOE_TYPES,
    NUM_EXPERTS,
    TOP_K,
    build_tiny_model,
    build_tokenizer,
    randomize_,
    save_tiny_model,
    tiny_config,
    write_calibration_file,
)

import hf_prune
from hf_prune import RecipeError, UnsupportedModelError
from hf_prune.adapters import get_adapter
from hf_prune.calibration import CalibrationBatch
from hf_prune.context import PruneContext
from hf_prune.errors import CalibrationError
from hf_prune.methods.experts.diep import alpha_weighted_routing, diep_scores
from hf_prune.methods.experts.expert_pruning import ExpertPruningConfig
from hf_prune.methods.experts.scoring import router_statistics, select_experts
from hf_prune.recipe import CalibrationConfig

# Tiny models: one intra-op thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    return write_calibration_file(tmp_path_factory.mktemp("calibration") / "pydoc.txt", num_chars=6000)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny models saved on first use, one folder per type."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(model_type):
        if model_type not in cache:
            cache[model_type] = save_tiny_model(model_type, root / model_type)
        return cache[model_type]

    return get


def make_context(model, tokenizer, calibration_file, **calibration):
    settings = {"num_samples": 8, "seq_len": 48, "batch_size": 4, **calibration}
    return PruneContext(
        get_adapter(model.config),
        tokenizer,
        CalibrationConfig(data=str(calibration_file), **settings),
        progress=False,
    )


def top1_mixtral(tokenizer):
    config = tiny_config("mixtral", tokenizer)
    config.num_experts_per_tok = 1
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return randomize_(model).eval()


# ---- router statistics ------------------------------------------------------------------------------


def count_by_hand(model, batches):
    """Frequency / router weight / tokens per MoE layer from ``output_router_logits=True``."""
    adapter = get_adapter(model.config)
    moe = adapter.moe_layer_indices(model)
    top_k = adapter.top_k(model.config)
    totals = {
        i: {
            "frequency": torch.zeros(NUM_EXPERTS, dtype=torch.int64),
            "router_weight": torch.zeros(NUM_EXPERTS, dtype=torch.float64),
            "tokens": 0,
        }
        for i in moe
    }
    with torch.no_grad():
        for batch in batches:
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                use_cache=False,
                output_router_logits=True,
            )
            assert len(out.router_logits) == len(moe)
            keep = batch.attention_mask.reshape(-1).bool()
            for index, logits in zip(moe, out.router_logits, strict=True):
                probs = torch.softmax(logits.float(), dim=-1)[keep]
                chosen = torch.topk(probs, top_k, dim=-1).indices
                for row in chosen.tolist():
                    for expert in row:
                        totals[index]["frequency"][expert] += 1
                totals[index]["router_weight"] += probs.double().sum(dim=0)
                totals[index]["tokens"] += int(keep.sum())
    return totals


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_router_statistics_match_router_logits(model_type, tokenizer, calibration_file):
    model = build_tiny_model(model_type, tokenizer)
    context = make_context(model, tokenizer, calibration_file, packing=False)
    batches = context.calibration_batches()
    assert any(int(b.attention_mask.sum()) < b.attention_mask.numel() for b in batches), "want some padding"
    stats = router_statistics(model, context)
    expected = count_by_hand(model, batches)
    assert sorted(stats) == sorted(expected) == get_adapter(model.config).moe_layer_indices(model)
    for index, entry in stats.items():
        assert torch.equal(entry["frequency"], expected[index]["frequency"])
        torch.testing.assert_close(
            entry["router_weight"], expected[index]["router_weight"], rtol=1e-6, atol=1e-6
        )
        assert int(entry["tokens"]) == expected[index]["tokens"] == sum(b.num_tokens for b in batches)
        assert int(entry["frequency"].sum()) == TOP_K * int(entry["tokens"])
        torch.testing.assert_close(
            float(entry["router_weight"].sum()), float(entry["tokens"]), rtol=1e-6, atol=1e-6
        )


def test_router_statistics_ignore_pad_tokens(tokenizer, calibration_file):
    model = build_tiny_model("mixtral", tokenizer)
    context = make_context(model, tokenizer, calibration_file)
    torch.manual_seed(0)
    long, short = torch.randint(4, 300, (12,)), torch.randint(4, 300, (5,))
    padded = []
    for pad_id in (3, 77):  # whatever sits in pad positions must not count
        ids = torch.full((2, 12), pad_id)
        ids[0], ids[1, :5] = long, short
        mask = torch.zeros(2, 12, dtype=torch.long)
        mask[0], mask[1, :5] = 1, 1
        context._batches = [CalibrationBatch(ids, mask)]
        padded.append(router_statistics(model, context))
    context._batches = [
        CalibrationBatch(long[None], torch.ones(1, 12, dtype=torch.long)),
        CalibrationBatch(short[None], torch.ones(1, 5, dtype=torch.long)),
    ]
    separate = router_statistics(model, context)
    for index in separate:
        assert int(separate[index]["tokens"]) == 17
        for stats in padded:
            assert int(stats[index]["tokens"]) == 17
            assert torch.equal(stats[index]["frequency"], separate[index]["frequency"])
            torch.testing.assert_close(
                stats[index]["router_weight"], separate[index]["router_weight"], rtol=1e-5, atol=1e-5
            )


# ---- selection --------------------------------------------------------------------------------------


def test_select_uniform():
    scores = {0: torch.tensor([0.1, 0.9, 0.5, 0.3]), 2: torch.tensor([4.0, 1.0, 2.0, 3.0])}
    assert select_experts(scores, top_k=2, keep_experts=2, uniform=True) == {0: [1, 2], 2: [0, 3]}
    assert select_experts(scores, top_k=2, keep_ratio=0.75, uniform=True) == {0: [1, 2, 3], 2: [0, 2, 3]}
    # round half up: 0.625 * 4 = 2.5 keeps 3
    assert select_experts(scores, top_k=1, keep_ratio=0.625, uniform=True) == {0: [1, 2, 3], 2: [0, 2, 3]}
    with pytest.raises(ValueError, match="must keep between 2 and 4"):
        select_experts(scores, top_k=2, keep_experts=1, uniform=True)
    with pytest.raises(ValueError, match="exactly one"):
        select_experts(scores, top_k=2, keep_experts=2, keep_ratio=0.5, uniform=True)


def test_select_global_ranking_with_floor():
    scores = {0: torch.tensor([9.0, 8.0, 7.0, 6.0]), 1: torch.tensor([0.1, 0.2, 5.0, 0.3])}
    # 4 of 8 in total, but layer 1 must keep top_k = 2 of its own (experts 2 and 3).
    assert select_experts(scores, top_k=2, keep_ratio=0.5, uniform=False) == {0: [0, 1], 1: [2, 3]}
    assert select_experts(scores, top_k=1, keep_ratio=0.5, uniform=False) == {0: [0, 1, 2], 1: [2]}
    assert select_experts(scores, top_k=1, keep_experts=3, uniform=False) == {0: [0, 1, 2, 3], 1: [2, 3]}
    assert select_experts(scores, top_k=1, keep_ratio=0.5, uniform=False, min_experts_per_layer=2) == {
        0: [0, 1],
        1: [2, 3],
    }
    assert select_experts(scores, top_k=1, keep_ratio=1.0, uniform=False) == {
        0: [0, 1, 2, 3],
        1: [0, 1, 2, 3],
    }
    with pytest.raises(ValueError, match="must keep between 6"):
        select_experts(scores, top_k=1, keep_ratio=0.5, uniform=False, min_experts_per_layer=3)


def test_select_ties_prefer_lower_indices():
    flat = {0: torch.ones(4), 1: torch.ones(4)}
    assert select_experts(flat, top_k=1, keep_experts=2, uniform=True) == {0: [0, 1], 1: [0, 1]}
    # Across layers the lower layer wins a tie, then the lower expert.
    assert select_experts(flat, top_k=1, keep_ratio=0.5, uniform=False) == {0: [0, 1, 2], 1: [0]}
    scores = {0: torch.tensor([1.0, 3.0, 3.0, 2.0])}
    assert select_experts(scores, top_k=1, keep_experts=1, uniform=True) == {0: [1]}
    assert select_experts(scores, top_k=1, keep_experts=2, uniform=False) == {0: [1, 2]}


# ---- DiEP -------------------------------------------------------------------------------------------


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_alpha_one_beta_one_is_the_original_model(tokenizer):
    """With α multiplying the router's weights, α = 1 and β = 1 leave the model exactly as it was."""
    model = build_tiny_model("qwen2_moe", tokenizer)
    adapter = get_adapter(model.config)
    ids = torch.randint(4, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    reference = logits_of(model, ids)
    moe = adapter.moe_layer_indices(model)
    ones = {i: torch.ones(NUM_EXPERTS) for i in moe}
    with alpha_weighted_routing(
        model, adapter, ones, {i: torch.tensor(1.0) for i in moe}, weighting="router"
    ):
        torch.testing.assert_close(logits_of(model, ids), reference, rtol=0, atol=0)
    with alpha_weighted_routing(
        model, adapter, ones, {i: torch.tensor(0.5) for i in moe}, weighting="router"
    ):
        assert not torch.allclose(logits_of(model, ids), reference)
    torch.testing.assert_close(logits_of(model, ids), reference, rtol=0, atol=0)  # hooks removed


DIEP_CASES = {
    "mixtral-top1": lambda tok: top1_mixtral(tok),
    "mixtral-top2": lambda tok: build_tiny_model("mixtral", tok),
    "qwen2_moe": lambda tok: build_tiny_model("qwen2_moe", tok),
}


@pytest.mark.parametrize("case", DIEP_CASES)
def test_diep_scores(case, tokenizer, calibration_file):
    model = DIEP_CASES[case](tokenizer)
    adapter = get_adapter(model.config)
    moe = adapter.moe_layer_indices(model)
    context = make_context(model, tokenizer, calibration_file)
    ids = torch.randint(4, 300, (1, 8), generator=torch.Generator().manual_seed(1))
    reference = logits_of(model, ids)
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    config = ExpertPruningConfig(
        keep_ratio=0.5,
        max_cached_tokens=100,
        alpha_weighting="replace" if case == "mixtral-top1" else "router",
    )
    scores, details = diep_scores(model, context, config)

    assert sorted(scores) == moe
    for i in moe:
        assert details["alpha"][i].shape == (NUM_EXPERTS,)
        assert details["beta"][i].shape == ()
        assert scores[i].shape == (NUM_EXPERTS,) and torch.isfinite(scores[i]).all()
        torch.testing.assert_close(scores[i], details["alpha"][i].abs() * details["beta"][i])
        assert ((details["alpha"][i] >= 1e-5) & (details["alpha"][i] <= 5)).all()
        assert not torch.equal(details["alpha"][i], torch.ones(NUM_EXPERTS))  # it learned something
    # Official β schedule: 2.0 for the first half of the MoE layers, 0.2 after.
    half = len(moe) / 2
    assert details["beta_init"] == {i: (2.0 if p < half else 0.2) for p, i in enumerate(moe)}
    assert 0 < details["cached_tokens"] <= 100
    assert details["calibration_tokens"] == sum(b.num_tokens for b in context.calibration_batches())
    phases = [h["phase"] for h in details["history"]]
    assert phases == ["alpha", "alpha", "beta"] * 3 + ["alpha", "alpha"]
    assert all(h["lm_loss"] is not None and h["lm_loss"] > 0 for h in details["history"])
    assert details["history"][-1]["reconstruction"] < details["history"][0]["reconstruction"]
    assert set(details["seconds"]["per_layer"]) == set(moe)
    assert details["seconds"]["total"] >= details["seconds"]["cache"]
    # The model is unchanged: weights, requires_grad, no hooks left behind.
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights_before[key]), key
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits_of(model, ids), reference, rtol=0, atol=0)


def test_diep_reconstruction_only_with_constant_beta(tokenizer, calibration_file):
    model = build_tiny_model("olmoe", tokenizer)
    context = make_context(model, tokenizer, calibration_file)
    config = ExpertPruningConfig(keep_ratio=0.5, lm_loss_weight=0.0, beta_init=1.0, epochs=3)
    scores, details = diep_scores(model, context, config)
    assert all(h["lm_loss"] is None for h in details["history"])
    assert details["seconds"]["lm_loss"] == 0.0
    assert set(details["beta_init"].values()) == {1.0}
    assert all(torch.isfinite(s).all() for s in scores.values())


# ---- the method through hf_prune.prune ---------------------------------------------------------------


def recipe(source, calibration_file, output=None, **stage):
    data = {
        "model": str(source),
        "stages": [{"method": "expert_pruning", **stage}],
        "calibration": {"data": str(calibration_file), "num_samples": 8, "seq_len": 48, "batch_size": 4},
    }
    data["output"] = str(output) if output else None
    return data


def check_structure(model, stage):
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    for entry in stage["layers"]:
        layer = layers[entry["layer"]]
        assert entry["experts_after"] == len(entry["kept"]) == adapter.experts(layer).num_experts
        assert adapter.router(layer).weight.shape[0] == len(entry["kept"])
        assert len(entry["scores"]) == entry["experts_before"] == NUM_EXPERTS


def test_frequency_uniform(saved, calibration_file, tmp_path, tokenizer):
    source = saved("mixtral")
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    result = hf_prune.prune(
        recipe(source, calibration_file, tmp_path / "out", algorithm="frequency", keep_experts=2),
        progress=False,
    )
    (stage,) = result.stages
    assert stage["algorithm"] == "frequency" and stage["uniform"] is True
    assert stage["experts_before"] == 4 * NUM_EXPERTS and stage["experts_after"] == 4 * 2
    assert stage["params_after"] < stage["params_before"]
    check_structure(result.model, stage)
    # The kept experts are the two most frequent ones on the same calibration data.
    context = make_context(original, tokenizer, calibration_file)
    stats = router_statistics(original, context)
    for entry in stage["layers"]:
        frequency = stats[entry["layer"]]["frequency"]
        assert entry["scores"] == [float(f) for f in frequency]
        assert entry["kept"] == sorted(sorted(range(NUM_EXPERTS), key=lambda e: (-int(frequency[e]), e))[:2])
    assert stage["calibration_tokens"] == int(stats[0]["tokens"])
    assert result.model.config.num_local_experts == 2
    json.dumps(result.report)  # the report is plain JSON


def test_router_weight_non_uniform(saved, calibration_file, tokenizer):
    source = saved("olmoe")
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    result = hf_prune.prune(
        original,
        recipe(source, calibration_file, algorithm="router_weight", keep_ratio=0.75, uniform=False),
        tokenizer=tokenizer,
        progress=False,
    )
    (stage,) = result.stages
    assert stage["algorithm"] == "router_weight" and stage["uniform"] is False
    assert stage["experts_after"] == 12
    assert all(entry["experts_after"] >= TOP_K for entry in stage["layers"])
    check_structure(result.model, stage)
    # The scores are the summed routing probabilities, and the kept experts come from one ranking over layers.
    stats = router_statistics(original, make_context(original, tokenizer, calibration_file))
    scores = {}
    for entry in stage["layers"]:
        torch.testing.assert_close(
            torch.tensor(entry["scores"], dtype=torch.float64),
            stats[entry["layer"]]["router_weight"],
            rtol=1e-5,
            atol=0,
        )
        scores[entry["layer"]] = stats[entry["layer"]]["router_weight"]
    expected = select_experts(scores, top_k=TOP_K, keep_ratio=0.75, uniform=False)
    assert {e["layer"]: e["kept"] for e in stage["layers"]} == expected
    assert len({e["experts_after"] for e in stage["layers"]}) > 1, "want different counts per layer here"
    ids = torch.randint(4, 300, (1, 8))
    assert torch.isfinite(logits_of(result.model, ids)).all()


def test_diep_end_to_end(saved, calibration_file, tokenizer):
    source = saved("qwen2_moe")
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    result = hf_prune.prune(
        original,
        recipe(source, calibration_file, algorithm="diep", keep_ratio=0.75),
        tokenizer=tokenizer,
        progress=False,
    )
    (stage,) = result.stages
    assert stage["algorithm"] == "diep" and stage["uniform"] is False
    assert [e["layer"] for e in stage["layers"]] == [1, 3]  # layers 0 and 2 are dense
    assert stage["experts_after"] == 6
    check_structure(result.model, stage)
    for entry in stage["layers"]:
        assert len(entry["alpha"]) == NUM_EXPERTS and entry["beta"] > 0 and entry["scoring_seconds"] >= 0
        ranked = sorted(range(NUM_EXPERTS), key=lambda e: (-entry["scores"][e], e))
        assert set(ranked[:TOP_K]) <= set(entry["kept"])
    assert stage["diep"]["seconds"]["total"] > 0 and len(stage["diep"]["history"]) == 11
    json.dumps(result.report)
    ids = torch.randint(4, 300, (1, 8))
    assert torch.isfinite(logits_of(result.model, ids)).all()
    assert original.config.num_experts == NUM_EXPERTS  # the in-memory source is untouched


def test_short_calibration(saved, tmp_path):
    source = saved("mixtral")
    one = tmp_path / "one.txt"
    one.write_text("A single paragraph, far shorter than one batch of eight sequences.\n")
    result = hf_prune.prune(
        recipe(source, one, tmp_path / "short", algorithm="frequency", keep_experts=3), progress=False
    )
    assert result.stages[0]["experts_after"] == 4 * 3
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Hi")
    output = tmp_path / "out"
    with pytest.raises(
        CalibrationError,
        match=r"gives [0-3] tokens, fewer than the 4 that stages\[0\] \(expert_pruning\) needs",
    ):
        hf_prune.prune(recipe(source, tiny, output, algorithm="frequency", keep_experts=3), progress=False)
    assert not output.exists()


# ---- bad input: fails before any weights are loaded ---------------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the recipe was validated")

    monkeypatch.setattr("hf_prune.pipeline.load_model", refuse)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            {"keep_experts": 1},
            r"stages\[0\]\.keep_experts: must be in \[2, 4\] .*at least its 2 experts per token.*got 1",
        ),
        ({"keep_experts": 5}, r"stages\[0\]\.keep_experts: must be in \[2, 4\] .*got 5"),
        ({"keep_ratio": 0}, r"stages\[0\]\.keep_ratio: must be in \(0, 1\], got 0(\.0)?$"),
        ({"keep_ratio": 1.5}, r"stages\[0\]\.keep_ratio: must be in \(0, 1\], got 1.5"),
        (
            {"keep_ratio": 0.25, "algorithm": "frequency"},
            r"stages\[0\]\.keep_ratio: must be in \[0.5, 1\] .*keeps 1 of 4 experts in a layer.*got 0.25",
        ),
        (
            {"keep_ratio": 0.25},
            r"stages\[0\]\.keep_ratio: must be in \[0.5, 1\] .*keeps 4 of 16 experts in total",
        ),
        (
            {"keep_ratio": 0.5, "keep_experts": 2},
            r"stages\[0\]\.keep_ratio: give exactly one of keep_ratio or keep_experts",
        ),
        ({}, r"stages\[0\]\.keep_ratio: give exactly one"),
        (
            {"keep_experts": 2, "min_experts_per_layer": 5},
            r"stages\[0\]\.min_experts_per_layer: must be at most 4",
        ),
        ({"keep_experts": 2, "algorithm": "magnitude"}, r"stages\[0\]\.algorithm: must be one of 'diep'"),
        ({"keep_experts": 2, "beta_init": "paper"}, r"stages\[0\]\.beta_init: expected 'official' or float"),
    ],
)
def test_bad_budgets_fail_before_loading(stage, message, saved, calibration_file, tmp_path, no_model_loading):
    output = tmp_path / "out"
    with pytest.raises(RecipeError, match=message):
        hf_prune.prune(recipe(saved("mixtral"), calibration_file, output, **stage), progress=False)
    assert not output.exists()


def test_dense_model_refused_before_loading(saved, calibration_file, tmp_path, no_model_loading):
    output = tmp_path / "out"
    with pytest.raises(
        UnsupportedModelError,
        match=r"stages\[0\] \(expert_pruning\): expert pruning needs a "
        r"Mixture-of-Experts model; llama has no experts",
    ):
        hf_prune.prune(recipe(saved("llama"), calibration_file, output, keep_experts=2), progress=False)
    assert not output.exists()
    llama = transformers.AutoConfig.from_pretrained(saved("llama"))
    assert "llama has no experts" in ExpertPruningConfig.unsupported_reason(get_adapter(llama))
    mixtral = transformers.AutoConfig.from_pretrained(saved("mixtral"))
    assert ExpertPruningConfig.unsupported_reason(get_adapter(mixtral)) is None


def test_calibration_required(saved, tmp_path):
    data = recipe(saved("mixtral"), "unused.txt", tmp_path / "out", keep_experts=2)
    del data["calibration"]
    with pytest.raises(RecipeError, match=r"calibration: missing, but stages\[0\] \(expert_pruning\) needs"):
        hf_prune.prune(data, progress=False)


def test_expert_counts_from_config(tokenizer):
    for model_type, expected in [("qwen2_moe", [0, 4, 0, 4]), ("mixtral", [4] * 4), ("olmoe", [4] * 4)]:
        config = tiny_config(model_type, tokenizer)
        assert get_adapter(config).experts_per_layer_from_config(config) == expected
    model = build_tiny_model("qwen2_moe", tokenizer)
    assert get_adapter(model.config).experts_per_layer(model) == [0, 4, 0, 4]
    config = copy.deepcopy(tiny_config("mixtral", tokenizer))
    config.experts_per_layer = [2, 3, 4, 2]
    assert get_adapter(config).experts_per_layer_from_config(config) == [2, 3, 4, 2]
