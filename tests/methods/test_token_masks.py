"""The small pieces of text / prompt token pruning (which tokens are kept, the retainer's soft masks and
pooling, the repacking of a pruned prompt and what its cache remembers) against values worked out by hand
on constructed inputs. No model runs here; each expected value is written out or computed by a loop over
the definition in the docstring, never by the function under test."""

import math
from types import SimpleNamespace

import pytest
import torch
from hf_prune.model_patches import prompt_prefill, prompt_retainer, text_token_pruning
from torch import nn

MIN32 = torch.finfo(torch.float32).min


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---- prompt_retainer ----


def test_always_kept_is_the_first_and_last_real_token():
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]).bool()
    expected = [[0, 1, 0, 1, 0], [1, 0, 0, 0, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert prompt_retainer.always_kept(mask).long().tolist() == expected


def test_chosen_and_expected_ratios_by_hand():
    adtp = {"algorithm": "adtp", "candidate_ratios": [0.1, 0.5, 1.0], "keep_ratio": None}
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    assert prompt_retainer.chosen_ratios(adtp, logits).tolist() == pytest.approx([0.5, 0.1, 1.0])
    assert prompt_retainer.chosen_ratios(adtp, logits[:2]).tolist() == pytest.approx([0.5, 0.1])  # B ≠ R
    fixed = {"algorithm": "fixed", "candidate_ratios": [0.1, 0.5, 1.0], "keep_ratio": 0.3}
    assert prompt_retainer.chosen_ratios(fixed, logits).tolist() == pytest.approx([0.3] * 3)
    # softmax (0.2, 0.3, 0.5) -> 0.2·0.1 + 0.3·0.5 + 0.5·1 = 0.67; uniform -> (0.1 + 0.5 + 1) / 3
    logits = torch.tensor(
        [[math.log(0.2), math.log(0.3), math.log(0.5)], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    expected = prompt_retainer.expected_ratios(adtp, logits)
    assert expected.dtype == torch.float64 and expected.tolist() == pytest.approx([0.67, 1.6 / 3], abs=1e-12)
    fixed_expected = prompt_retainer.expected_ratios(fixed, logits)
    assert fixed_expected.dtype == torch.float64 and fixed_expected.tolist() == pytest.approx([0.3, 0.3])


@pytest.mark.parametrize("module", [prompt_retainer, text_token_pruning])
def test_soft_keep_by_hand(module):
    """q = the eligible score at rank ρ·n − 1 (0-based, interpolated), p = σ((s − q)/T)."""
    saliency = torch.tensor([[5.0, 1.0, 3.0, 4.0, 2.0]] * 4)
    eligible = torch.tensor([[0, 1, 1, 1, 1]] * 4).bool()  # eligible scores, descending: 4, 3, 2, 1
    ratios = torch.tensor([0.5, 0.6, 0.1, 1.0])
    # rank 0.5·4 − 1 = 1 -> q = 3; rank 1.4 -> q = 0.6·3 + 0.4·2 = 2.6; rank clamped to 0 -> q = 4; ρ = 1: q = −∞
    thresholds = [3.0, 2.6, 4.0, -math.inf]
    got = module.soft_keep(saliency, eligible, ratios, 0.5)
    for row, q in enumerate(thresholds):
        expected = [sigmoid((s - q) / 0.5) for s in saliency[row].tolist()]
        if module is prompt_retainer:
            expected[0] = 1.0  # not eligible: kept
        assert got[row, 1:].tolist() == pytest.approx(expected[1:], abs=1e-6), row
        assert got[row, 0].item() == pytest.approx(expected[0], abs=1e-6)
    # Padding (not eligible) in a shorter row does not shift the ranks: eligible 3, 1 of n = 2, ρ = 0.75
    # -> rank 0.5 -> q = 0.5·3 + 0.5·1 = 2.
    got = module.soft_keep(
        torch.tensor([[3.0, 9.0, 1.0, 7.0]]), torch.tensor([[1, 0, 1, 0]]).bool(), torch.tensor([0.75]), 1.0
    )
    assert got[0, [0, 2]].tolist() == pytest.approx([sigmoid(1.0), sigmoid(-1.0)], abs=1e-6)


def test_soft_attention_bias_by_hand():
    p = torch.tensor([[1.0, 0.5, 0.25, 0.0], [0.5, 1.0, 0.5, 0.8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]).bool()
    for window in (None, 2):
        bias = prompt_retainer.soft_attention_bias(p, mask, window)
        assert bias.shape == (2, 1, 4, 4) and bias.dtype == torch.float32
        for b in range(2):
            for q in range(4):
                for k in range(4):
                    visible = (k <= q and bool(mask[b, k]) and (window is None or q - k < window)) or q == k
                    log_p = math.log(max(float(p[b, k]), torch.finfo(torch.float32).tiny))
                    value = float(bias[b, 0, q, k])
                    if visible:
                        assert value == pytest.approx(log_p, abs=1e-5), (window, b, q, k)
                    else:
                        assert value <= MIN32 / 2, (window, b, q, k)
    assert math.isfinite(float(bias[0, 0, 3, 3]))  # p = 0 is a very negative bias, not −∞ (no NaN rows)


def test_prompt_retainer_pools_the_mean_and_the_last_real_token():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]]).bool()  # padding on both sides, none
    retainer = prompt_retainer.PromptRetainer(2, 3, 4)
    retainer.saliency = nn.Linear(2, 1)
    with torch.no_grad():
        retainer.saliency.weight.copy_(torch.tensor([[1.0, 0.0]]))
        retainer.saliency.bias.zero_()
    retainer.ratio = nn.Identity()
    saliency, pooled = retainer(hidden, mask)
    assert saliency.tolist() == hidden[..., 0].tolist()
    # row 0: real tokens 1, 2 -> mean of (2, 3) and (4, 5) = (3, 4), last = (4, 5); row 1: mean (11, 12), last (14, 15)
    assert pooled.tolist() == [[3.0, 4.0, 4.0, 5.0], [11.0, 12.0, 14.0, 15.0]]
    # one real token, at position 0 (right padding): mean and last are that token
    _, pooled = retainer(hidden, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 1]]).bool())
    assert pooled.tolist() == [[0.0, 1.0, 0.0, 1.0], [14.0, 15.0, 14.0, 15.0]]


def test_text_retainer_pools_cls_and_the_mean_of_real_tokens():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    retainer = text_token_pruning.TokenRetainer(2, 3, 4)
    retainer.ratio = nn.Identity()
    _, pooled = retainer(hidden, mask)
    # row 0: [CLS] (0, 1), mean of (0, 1), (2, 3) = (1, 2); row 1: [CLS] (6, 7), mean (8, 9)
    assert pooled.tolist() == [[0.0, 1.0, 1.0, 2.0], [6.0, 7.0, 8.0, 9.0]]
    assert float(retainer.price) == 0.0 and "price" in dict(retainer.named_buffers())


# ---- text_token_pruning helpers ----


def test_additive_mask_and_top_fraction_by_hand():
    keep = torch.tensor([[True, False, True]])
    bias = text_token_pruning.additive_mask(keep, torch.float32)
    assert bias.shape == (1, 1, 1, 3) and bias[0, 0, 0].tolist() == [0.0, MIN32, 0.0]
    soft = text_token_pruning.additive_mask(torch.tensor([[1.0, 0.5, 0.0]]), torch.float32)
    assert soft[0, 0, 0, :2].tolist() == pytest.approx([0.0, math.log(0.5)])
    assert soft[0, 0, 0, 2].item() == pytest.approx(math.log(torch.finfo(torch.float32).tiny))
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.05, 0.95, 0.0]])
    eligible = torch.tensor([[0] + [1] * 10 + [0]]).bool()  # ten eligible: positions 1..10
    # ⌈0.3·10⌉ = 3 (not 4: 0.3·10 is 3.0000000000000004 in floating point): 0.95 (10), 0.8 (5), 0.7 (3)
    kept = text_token_pruning.top_fraction(scores, eligible, torch.tensor([0.3]))
    assert torch.nonzero(kept[0]).flatten().tolist() == [3, 5, 10]
    kept = text_token_pruning.top_fraction(scores, eligible, torch.tensor([0.01]))  # ⌈0.1⌉ = 1
    assert torch.nonzero(kept[0]).flatten().tolist() == [10]


# ---- prompt_prefill ----


def test_kept_tokens_by_hand():
    mask = torch.tensor(
        [
            [0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            [1] * 12,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0] * 12,
        ]
    ).bool()
    scores = torch.tensor(
        [
            [9, 0.1, 0.5, 0.3, 0.9, 0.2, 0.05, 9, 9, 9, 9, 9],
            [9, 0.1, 0.5, 0.3, 0.9, 0.2, 0.6, 0.7, 0.8, 0.4, 0.35, 0.0],
            [9] * 12,
            [9] * 12,
        ]
    )
    # row 0: anchors 1, 6; others 2..5 (0.5, 0.3, 0.9, 0.2), ⌈0.5·4⌉ = 2 -> 4, 2
    # row 1: anchors 0, 11; others 1..10, ⌈0.3·10⌉ = 3 -> 4 (0.9), 8 (0.8), 7 (0.7)
    kept = prompt_prefill.kept_tokens(scores, mask, torch.tensor([0.5, 0.3, 0.5, 0.5]))
    rows = [torch.nonzero(row).flatten().tolist() for row in kept]
    assert rows == [[1, 2, 4, 6], [0, 4, 7, 8, 11], [11], []]
    kept = prompt_prefill.kept_tokens(scores, mask, 0.3)  # one float ratio for every row (row 0: ⌈1.2⌉ = 2)
    assert [torch.nonzero(row).flatten().tolist() for row in kept][:2] == [[1, 2, 4, 6], [0, 4, 7, 8, 11]]


def test_seeded_scores_follow_the_real_tokens():
    draws = torch.rand(5, generator=torch.Generator().manual_seed(7))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()
    scores = prompt_prefill.seeded_scores(mask, 7)
    assert scores[0, 2:].tolist() == draws[:3].tolist()
    assert scores[1].tolist() == draws.tolist()
    assert scores[2, :2].tolist() == draws[:2].tolist()


def test_left_packed_order_and_gather_by_hand():
    keep = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]]).bool()
    order = prompt_prefill.left_packed_order(keep)
    # width 3; row 1's one kept token last, dropped ones (in order) before it
    assert order.tolist() == [[0, 2, 3], [2, 3, 1]]
    tokens = torch.arange(2 * 4 * 2).view(2, 4, 2)
    assert prompt_prefill.gather_tokens(tokens, order).tolist() == [
        [[0, 1], [4, 5], [6, 7]],
        [[12, 13], [14, 15], [10, 11]],
    ]
    cache = torch.arange(2 * 2 * 4 * 1).view(2, 2, 4, 1)  # [B, heads, L, d]
    assert prompt_prefill.gather_tokens(cache, order, 2)[:, :, :, 0].tolist() == [
        [[0, 2, 3], [4, 6, 7]],
        [[10, 11, 9], [14, 15, 13]],
    ]


def test_attention_received_averages_over_heads_and_the_queries_that_see_the_key():
    weights = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).tril()  # causal weights
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]).bool()
    got = prompt_prefill.attention_received(weights, mask)
    for b in range(2):
        for k in range(4):
            queries = [q for q in range(4) if q >= k and mask[b, q]]
            if not queries:
                continue
            expected = sum(float(weights[b, h, q, k]) for h in range(3) for q in queries) / (3 * len(queries))
            assert float(got[b, k]) == pytest.approx(expected, rel=1e-5), (b, k)


def test_layer_kinds():
    assert prompt_prefill.layer_kinds(
        SimpleNamespace(layer_types=["full_attention", "sliding_attention", "x"], num_hidden_layers=2)
    ) == ["full_attention", "sliding_attention"]
    assert (
        prompt_prefill.layer_kinds(SimpleNamespace(sliding_window=8, num_hidden_layers=2))
        == ["sliding_attention"] * 2
    )
    assert (
        prompt_prefill.layer_kinds(SimpleNamespace(sliding_window=None, num_hidden_layers=3))
        == ["full_attention"] * 3
    )


def test_decode_inputs_by_hand():
    state = prompt_prefill.PrunedPrompt(torch.tensor([[0, 1, 1], [1, 1, 1]]), 5, torch.tensor([7, 5]))
    assert state.width == 3
    mask, positions = state.decode_inputs(3, 1, None, None)  # the first step after the prefill
    assert mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]] and positions.tolist() == [[7], [5]]
    mask, positions = state.decode_inputs(5, 2, None, None)  # two tokens since, two new ones
    assert positions.tolist() == [[9, 10], [7, 8]] and mask.shape == (2, 7)
    caller = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])  # the caller's prompt + 1 token
    mask, _ = state.decode_inputs(3, 1, caller, None)
    assert mask.tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]]
    over_cache = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # the cache's 3 entries + 1 token
    mask, given = state.decode_inputs(3, 1, over_cache, torch.tensor([[4], [4]]))
    assert mask.tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]] and given.tolist() == [[4], [4]]
    four_d = torch.zeros(2, 1, 1, 4)
    assert state.decode_inputs(3, 1, four_d, None)[0] is four_d
    with pytest.raises(
        ValueError,
        match=r"attention_mask of shape \(2, 9\) fits neither the prompt \(5 tokens\) "
        r"nor the pruned cache \(3\) plus 1 tokens since, for 2 rows",
    ):
        state.decode_inputs(3, 1, torch.ones(2, 9), None)


@pytest.mark.parametrize("module", [prompt_retainer, text_token_pruning])
def test_soft_keep_with_one_eligible_token(module):
    """n = 1: the threshold is that token's own score, so p = σ(0) = 1/2, also in a one-token row."""
    got = module.soft_keep(
        torch.tensor([[5.0, 2.0]]), torch.tensor([[0, 1]]).bool(), torch.tensor([0.6]), 1.0
    )
    assert got[0, 1].item() == pytest.approx(0.5)
    got = module.soft_keep(torch.tensor([[2.0]]), torch.tensor([[1]]).bool(), torch.tensor([0.5]), 1.0)
    assert got.tolist() == [[pytest.approx(0.5)]]


def test_soft_attention_bias_keeps_the_dtype_of_the_probabilities():
    p = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    bias = prompt_retainer.soft_attention_bias(p, torch.tensor([[1, 1]]).bool())
    assert bias.dtype == torch.float64
    assert float(bias[0, 0, 0, 1]) <= torch.finfo(torch.float64).min / 2  # the future key, blocked
    assert float(bias[0, 0, 1, 1]) == pytest.approx(math.log(0.5))


def test_prompt_retainer_heads_by_hand():
    """The saliency head is Linear → GELU → Linear(size, 1) per token, the ratio head the same over the
    pooled [mean, last] with one logit per candidate; a one-token row pools to that token twice."""
    torch.manual_seed(0)
    retainer = prompt_retainer.PromptRetainer(3, 4, 5)
    hidden = torch.randn(2, 3, 3)
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]]).bool()
    saliency, logits = retainer(hidden, mask)
    assert saliency.shape == (2, 3) and logits.shape == (2, 4)
    s1, s2 = retainer.saliency[0], retainer.saliency[2]
    r1, r2 = retainer.ratio[0], retainer.ratio[2]
    assert (s1.in_features, s1.out_features, s2.out_features) == (3, 5, 1)
    assert (r1.in_features, r1.out_features, r2.out_features) == (6, 5, 4)

    def mlp(first, second, x):
        inner = x @ first.weight.T + first.bias
        inner = 0.5 * inner * (1 + torch.erf(inner / math.sqrt(2)))  # exact GELU
        return inner @ second.weight.T + second.bias

    with torch.no_grad():
        torch.testing.assert_close(saliency, mlp(s1, s2, hidden)[..., 0])
        pooled = torch.stack(
            [torch.cat([hidden[0, 2], hidden[0, 2]]), torch.cat([hidden[1].mean(0), hidden[1, 2]])]
        )
        torch.testing.assert_close(logits, mlp(r1, r2, pooled))


def test_decode_mask_has_the_cache_dtype_whatever_the_callers():
    state = prompt_prefill.PrunedPrompt(torch.tensor([[0, 1, 1]]), 3, torch.tensor([3]))
    mask, _ = state.decode_inputs(3, 1, torch.tensor([[0.0, 1.0, 1.0, 1.0]]), None)
    assert mask.dtype == torch.long and mask.tolist() == [[0, 1, 1, 1]]


# ---- text_token_pruning.check_settings: defaults and the messages naming the bad key ----


def test_check_settings_fills_defaults_and_normalises():
    merged = text_token_pruning.check_settings(
        {"candidate_ratios": [0.5, 0.1, 0.5, 1], "special_token_ids": [3, 2, 3]}, 4
    )
    assert merged == {
        "algorithm": "adtp",
        "layer": 0,
        "keep_ratio": None,
        "candidate_ratios": [0.1, 0.5, 1.0],
        "retainer_size": 64,
        "temperature": 0.05,
        "seed": 0,
        "special_token_ids": [2, 3],
    }
    # the edges that are allowed
    text_token_pruning.check_settings({"algorithm": "random", "keep_ratio": 1, "layer": 3, "seed": 0}, 4)
    text_token_pruning.check_settings({"algorithm": "attention", "keep_ratio": 0.5, "layer": 1}, 2)
    text_token_pruning.check_settings(
        {"algorithm": "attention", "keep_ratio": 0.5, "layer": 0}, 2, attention_from_previous_layer=False
    )
    text_token_pruning.check_settings({"layer": 5, "retainer_size": 1, "temperature": 1e-9})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"algorithm": "best"},
            "token_pruning.algorithm: 'best' is not one of adtp, fixed, attention, random",
        ),
        ({"algorithm": "fixed"}, "token_pruning.keep_ratio: fixed needs a retention ratio in (0, 1]"),
        ({"keep_ratio": 0}, "token_pruning.keep_ratio: must be in (0, 1], got 0"),
        ({"keep_ratio": 1.5}, "token_pruning.keep_ratio: must be in (0, 1], got 1.5"),
        ({"keep_ratio": True}, "token_pruning.keep_ratio: must be in (0, 1], got True"),
        ({"keep_ratio": "0.5"}, "token_pruning.keep_ratio: must be in (0, 1], got '0.5'"),
        (
            {"candidate_ratios": []},
            "token_pruning.candidate_ratios: must be a non-empty list of ratios in (0, 1], got []",
        ),
        (
            {"candidate_ratios": 0.5},
            "token_pruning.candidate_ratios: must be a non-empty list of ratios in (0, 1], got 0.5",
        ),
        (
            {"candidate_ratios": [0.5, 0]},
            "token_pruning.candidate_ratios: must be a non-empty list of ratios in (0, 1], got [0.5, 0]",
        ),
        (
            {"candidate_ratios": [1.1]},
            "token_pruning.candidate_ratios: must be a non-empty list of ratios in (0, 1], got [1.1]",
        ),
        (
            {"candidate_ratios": [True]},
            "token_pruning.candidate_ratios: must be a non-empty list of ratios in (0, 1], got [True]",
        ),
        (
            {"candidate_ratios": ["a"]},
            "token_pruning.candidate_ratios: must be a non-empty list of ratios in (0, 1], got ['a']",
        ),
        ({"layer": 4}, "token_pruning.layer: must be an integer >= 0 and below the 4 layers, got 4"),
        ({"layer": -1}, "token_pruning.layer: must be an integer >= 0 and below the 4 layers, got -1"),
        ({"layer": 1.0}, "token_pruning.layer: must be an integer >= 0 and below the 4 layers, got 1.0"),
        (
            {"algorithm": "attention", "keep_ratio": 0.5, "layer": 0},
            "token_pruning.layer: attention scores come from the layer before; use layer >= 1",
        ),
        ({"retainer_size": 0}, "token_pruning.retainer_size: must be a positive integer, got 0"),
        ({"retainer_size": 2.0}, "token_pruning.retainer_size: must be a positive integer, got 2.0"),
        ({"seed": -1}, "token_pruning.seed: must be a non-negative integer, got -1"),
        ({"seed": True}, "token_pruning.seed: must be a non-negative integer, got True"),
        ({"special_token_ids": 3}, "token_pruning.special_token_ids: must be a list of token ids, got 3"),
        (
            {"special_token_ids": [3.0]},
            "token_pruning.special_token_ids: must be a list of token ids, got [3.0]",
        ),
        ({"temperature": 0}, "token_pruning.temperature: must be > 0, got 0"),
        ({"temperature": "hot"}, "token_pruning.temperature: must be > 0, got 'hot'"),
    ],
)
def test_check_settings_names_the_bad_key(settings, message):
    with pytest.raises(ValueError) as error:
        text_token_pruning.check_settings(settings, 4)
    assert str(error.value) == message


def test_check_settings_without_a_layer_count():
    with pytest.raises(ValueError) as error:
        text_token_pruning.check_settings({"layer": -1})
    assert str(error.value) == "token_pruning.layer: must be an integer >= 0, got -1"


def test_a_new_text_pruning_model_has_an_unset_price_and_sized_heads():
    """Built from a config (as ``from_pretrained`` does): the retainer's heads sized by the config and the
    settings, its price NaN ("never trained", so adtp refuses to choose ratios with it)."""
    shared = dict(
        vocab_size=12, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8
    )
    config = text_token_pruning.HfPruneBertConfig(
        **shared, token_pruning={"candidate_ratios": [0.2, 0.6, 1.0], "retainer_size": 5}
    )
    model = text_token_pruning.HfPruneBertForSequenceClassification(config).eval()
    saliency, ratio = model.retainer.saliency, model.retainer.ratio
    assert (saliency[0].in_features, saliency[0].out_features, saliency[2].out_features) == (8, 5, 1)
    assert (ratio[0].in_features, ratio[0].out_features, ratio[2].out_features) == (16, 5, 3)
    assert torch.isnan(model.retainer.price)
    with pytest.raises(ValueError, match=r"^adtp: the retainer has no price \(retainer.price\)"):
        model(input_ids=torch.tensor([[2, 5, 6, 3]]))
    # no token_pruning at all: the defaults (adtp, six candidates, size 64)
    bare = text_token_pruning.HfPruneBertForSequenceClassification(
        text_token_pruning.HfPruneBertConfig(**shared)
    )
    assert bare.retainer.ratio[2].out_features == 6 and bare.retainer.saliency[0].out_features == 64
