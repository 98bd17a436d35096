"""ReplaceMe and depth cuts against references computed without the code under test.

Every reference here comes from the stock transformers model with plain forward hooks, ``torch.linalg``
in float64 and hand-written index arithmetic; nothing from ``hf_prune.methods.depth`` is called to build
an expected value. The models are tiny random Llamas / Qwen2s built from configs (about a second each).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from depth_references import (
    HIDDEN,
    PAD,
    VOCAB,
    _randomised,
    batches,
    context_for,
    count_calls,
    hooked_states,
    reference_map,
    tiny_llama,
    tiny_qwen2,
)

from hf_prune.adapters import get_adapter
from hf_prune.calibration import CalibrationBatch
from hf_prune.methods.depth.cuts import DepthCutConfig, select_cuts
from hf_prune.methods.depth.replaceme import ReplaceMeConfig


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_replaceme_fold_is_the_lstsq_optimum_of_stock_activations(mlp_bias):
    """Planted bugs caught: a ridge always on (1% of mean diag MᵀM), pad tokens in the statistics, the
    target taken after the wrong layer, W ← T·W instead of Tᵀ·W, the bias left unfolded or folded as T·b."""
    source = tiny_llama(6, mlp_bias=mlp_bias)
    calibration = batches()
    t, m, y, r = reference_map(source, calibration, kept=1, last_removed=3)
    pruned = copy.deepcopy(source)
    report = ReplaceMeConfig(layers=[2, 3]).apply(pruned, context_for(pruned, calibration))

    src_down = source.model.layers[1].mlp.down_proj
    got_down = pruned.model.layers[1].mlp.down_proj
    # nn.Linear: out = x Wᵀ + b (rows); (x Wᵀ + b) T = x (TᵀW)ᵀ + bT, so W ← TᵀW and b ← Tᵀb.
    expected_w = t.T @ src_down.weight.double()
    torch.testing.assert_close(got_down.weight.double(), expected_w, rtol=1e-5, atol=1e-6)
    if mlp_bias:
        expected_b = t.T @ src_down.bias.double()
        assert not torch.allclose(expected_b, src_down.bias.double())  # the fold really changes it
        torch.testing.assert_close(got_down.bias.double(), expected_b, rtol=1e-5, atol=1e-6)

    # Everything else is the source's, and layers 2 and 3 are gone.
    assert pruned.config.num_hidden_layers == len(pruned.model.layers) == 4
    for new, old in zip(range(4), (0, 1, 4, 5), strict=True):
        a = dict(pruned.model.layers[new].named_parameters())
        b = dict(source.model.layers[old].named_parameters())
        for key in a:
            if new == 1 and key.startswith("mlp.down_proj"):
                continue
            assert torch.equal(a[key], b[key]), (new, key)

    # The report's errors against the reference's, computed directly on the activations.
    (cut,) = report["cuts"]
    assert cut["kept_layer"] == 1 and cut["removed_layers"] == [2, 3]
    assert cut["calibration_tokens"] == m.shape[0] == sum(b.num_tokens for b in calibration)
    assert cut["ridge_used"] == 0.0
    assert cut["folded_into"] == ["mlp.down_proj"]
    r_sq = float((r * r).sum())
    assert cut["relative_error_with_map"] == pytest.approx(float(((m @ t - r) ** 2).sum()) / r_sq, rel=1e-6)
    assert cut["relative_error_without_map"] == pytest.approx(float(((m - r) ** 2).sum()) / r_sq, rel=1e-6)
    assert report["layers_before"] == 6 and report["layers_after"] == 4
    assert report["removed_layers"] == [2, 3] and report["estimator"] == "lstsq"
    assert report["candidate_distances"] is None


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_pruned_layer_output_is_y_plus_m_times_t(mlp_bias):
    """The pruned model's kept layer outputs Y + M·T (exact arithmetic on the stock model's activations),
    and the layer after it receives that. Planted bugs caught: bias not folded, W folded as T·W."""
    source = tiny_llama(6, mlp_bias=mlp_bias)
    calibration = batches()
    t, m, y, _ = reference_map(source, calibration, kept=1, last_removed=3)
    pruned = copy.deepcopy(source)
    ReplaceMeConfig(layers=[2, 3]).apply(pruned, context_for(pruned, calibration))
    states, _ = hooked_states(pruned, calibration, {"h": pruned.model.layers[1]})
    torch.testing.assert_close(states["h"], y + m @ t, rtol=1e-4, atol=1e-5)


def test_lstsq_ridge_field_is_used():
    """A ridge α given in the recipe gives T = (MᵀM + αI)⁻¹MᵀR (torch.linalg.solve on the stock activations)."""
    source = tiny_llama(6)
    calibration = batches()
    _, m, _, r = reference_map(source, calibration, kept=0, last_removed=1)
    alpha = 0.5 * float((m * m).sum(dim=0).mean())
    t = torch.linalg.solve(m.T @ m + alpha * torch.eye(HIDDEN, dtype=torch.float64), m.T @ r)
    pruned = copy.deepcopy(source)
    report = ReplaceMeConfig(layers=[1, 1], ridge=alpha).apply(pruned, context_for(pruned, calibration))
    expected = t.T @ source.model.layers[0].mlp.down_proj.weight.double()
    torch.testing.assert_close(
        pruned.model.layers[0].mlp.down_proj.weight.double(), expected, rtol=1e-5, atol=1e-6
    )
    assert report["cuts"][0]["ridge_used"] == alpha


def test_cosine_estimator_moves_towards_the_cosine_optimum():
    """estimator: cosine runs Adam from the identity on the stock activations: with a large step the folded
    map's cosine loss on (M, R) drops well below the identity's. Planted bug caught: the cosine branch
    fitting on the wrong tensors / never folding."""
    source = tiny_llama(6)
    calibration = batches()
    _, m, y, r = reference_map(source, calibration, kept=1, last_removed=2)
    pruned = copy.deepcopy(source)
    config = ReplaceMeConfig(layers=[2, 2], estimator="cosine", lr=1e-2, epochs=30, batch_tokens=64)
    report = config.apply(pruned, context_for(pruned, calibration))
    assert report["estimator"] == "cosine" and "ridge_used" not in report["cuts"][0]
    # Recover T from the folded weight: W' = TᵀW, W has full row rank (16 × 32).
    w = source.model.layers[1].mlp.down_proj.weight.double()
    t = torch.linalg.lstsq(w.T, pruned.model.layers[1].mlp.down_proj.weight.double().T).solution

    def loss(map_):
        return float(1 - torch.nn.functional.cosine_similarity(m @ map_.detach(), r, dim=-1).mean())

    identity = torch.eye(HIDDEN, dtype=torch.float64)
    assert loss(t) < 0.5 * loss(identity)


def test_cosine_full_loss_uses_y():
    """cosine_loss: full fits 1 − cos(M·T + Y, target); check the folded map beats the identity on that loss
    and that it differs from the residual-loss fit (so Y was used)."""
    source = tiny_llama(6)
    calibration = batches()
    _, m, y, r = reference_map(source, calibration, kept=1, last_removed=2)
    w = source.model.layers[1].mlp.down_proj.weight.double()
    maps = {}
    for loss_kind in ("full", "residual"):
        pruned = copy.deepcopy(source)
        config = ReplaceMeConfig(
            layers=[2, 2], estimator="cosine", cosine_loss=loss_kind, lr=1e-2, epochs=20, batch_tokens=64
        )
        config.apply(pruned, context_for(pruned, calibration))
        folded = pruned.model.layers[1].mlp.down_proj.weight.double()
        maps[loss_kind] = torch.linalg.lstsq(w.T, folded.T).solution

    def full_loss(map_):
        return float(1 - torch.nn.functional.cosine_similarity(m @ map_.detach() + y, r + y, dim=-1).mean())

    assert full_loss(maps["full"]) < full_loss(torch.eye(HIDDEN, dtype=torch.float64))
    assert not torch.allclose(maps["full"], maps["residual"], atol=1e-3)


def test_two_cuts_end_to_end(tmp_path):
    """num_layers 2, num_cuts 2 on a 6-layer Llama whose layers 2 and 4 are nearly the identity: both are
    removed (two separate cuts, kept layers 1 and 3), every other weight is the source's, the second cut's
    map is the lstsq optimum on the model after the first cut (built by hand), and the save reloads with
    AutoModelForCausalLM to the same logits and generates. Planted bugs caught: indices not shifted between
    cuts, cuts merged wrongly, the second map fitted on the unpruned model."""
    source = tiny_llama(6, damped=(2, 4))
    calibration = batches()
    pruned = copy.deepcopy(source)
    report = ReplaceMeConfig(num_layers=2, num_cuts=2).apply(pruned, context_for(pruned, calibration))

    assert report["removed_layers"] == [2, 4]
    assert [(c["kept_layer"], c["removed_layers"]) for c in report["cuts"]] == [(1, [2]), (3, [4])]
    assert pruned.config.num_hidden_layers == len(pruned.model.layers) == 4
    for new, old in enumerate((0, 1, 3, 5)):
        a = dict(pruned.model.layers[new].named_parameters())
        b = dict(source.model.layers[old].named_parameters())
        for key in a:
            if old in (1, 3) and key == "mlp.down_proj.weight":
                assert not torch.equal(a[key], b[key])
            else:
                assert torch.equal(a[key], b[key]), (old, key)
        assert pruned.model.layers[new].self_attn.layer_idx == new

    # By hand: first cut on the source, then the second cut's T on that model.
    t1, *_ = reference_map(source, calibration, kept=1, last_removed=2)
    by_hand = copy.deepcopy(source)
    with torch.no_grad():
        down = by_hand.model.layers[1].mlp.down_proj
        down.weight.copy_((t1.T @ down.weight.double()).float())
    by_hand.model.layers = torch.nn.ModuleList([by_hand.model.layers[i] for i in (0, 1, 3, 4, 5)])
    t2, *_ = reference_map(by_hand, calibration, kept=2, last_removed=3)
    torch.testing.assert_close(
        pruned.model.layers[1].mlp.down_proj.weight.double(), down.weight.double(), rtol=1e-5, atol=1e-6
    )
    expected = t2.T @ source.model.layers[3].mlp.down_proj.weight.double()
    torch.testing.assert_close(
        pruned.model.layers[2].mlp.down_proj.weight.double(), expected, rtol=1e-4, atol=1e-5
    )

    pruned.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 4
    ids = calibration[0].input_ids[:2, :10]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits)
        out = reloaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
        expected_out = pruned.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    assert out.shape == (2, 15) and torch.equal(out, expected_out)


def test_adjacent_cuts_merge_into_one_map():
    """Damped layers 2 and 3 with num_cuts 2: the two one-layer blocks touch, merge into one cut (kept 1,
    removed 2-3), with one map equal to the lstsq optimum for h_3 on layer 1's MLP output."""
    source = tiny_llama(6, damped=(2, 3))
    calibration = batches()
    pruned = copy.deepcopy(source)
    report = ReplaceMeConfig(num_layers=2, num_cuts=2).apply(pruned, context_for(pruned, calibration))
    (cut,) = report["cuts"]
    assert cut["kept_layer"] == 1 and cut["removed_layers"] == [2, 3] and len(cut["angular_distance"]) == 2
    t, *_ = reference_map(source, calibration, kept=1, last_removed=3)
    expected = t.T @ source.model.layers[1].mlp.down_proj.weight.double()
    torch.testing.assert_close(
        pruned.model.layers[1].mlp.down_proj.weight.double(), expected, rtol=1e-5, atol=1e-6
    )


def test_calibration_stops_at_the_deepest_layer_needed():
    """Explicit layers [2, 3] of 6: the map needs h_3, so layers 4 and 5, the final norm and the LM head
    never run (forward-hook call counts on the source's modules), and the statistics equal those of a full
    stock forward (the reference T). Planted bug caught: stop_after the last layer, or no stop at all."""
    source = tiny_llama(6)
    calibration = batches()
    t, *_ = reference_map(source, calibration, kept=1, last_removed=3)
    pruned = copy.deepcopy(source)
    counts, handles = count_calls(pruned)
    ReplaceMeConfig(layers=[2, 3]).apply(pruned, context_for(pruned, calibration))
    for handle in handles:
        handle.remove()
    n = len(calibration)
    assert counts == {
        "layer0": n,
        "layer1": n,
        "layer2": n,
        "layer3": n,
        "layer4": 0,
        "layer5": 0,
        "norm": 0,
        "lm_head": 0,
    }
    expected = t.T @ source.model.layers[1].mlp.down_proj.weight.double()
    torch.testing.assert_close(
        pruned.model.layers[1].mlp.down_proj.weight.double(), expected, rtol=1e-5, atol=1e-6
    )


def test_angular_distance_pass_skips_norm_and_head():
    """Choosing a cut needs every layer's output but never the final norm or the LM head."""
    source = tiny_llama(4)
    calibration = batches()
    counts, handles = count_calls(source)
    select_cuts(source, DepthCutConfig(num_layers=1), context_for(source, calibration))
    for handle in handles:
        handle.remove()
    n = len(calibration)
    assert counts == {"layer0": n, "layer1": n, "layer2": n, "layer3": n, "norm": 0, "lm_head": 0}


def test_layer_types_drop_exactly_the_removed_layers(tmp_path):
    """Qwen2 with layer_types [full, slide, slide] × 2 and layers 2 and 4 damped: two cuts remove 2 and 4;
    the config's layer_types is the source list with indices 2 and 4 deleted (by hand), each attention
    module keeps its sliding window, and the reload builds the same types and logits. predict_config with
    explicit layers cuts the list the same way."""
    source = tiny_qwen2(6, damped=(2, 4))
    calibration = batches()
    types = list(source.config.layer_types)
    assert types == ["full_attention", "sliding_attention", "sliding_attention"] * 2
    pruned = copy.deepcopy(source)
    report = ReplaceMeConfig(num_layers=2, num_cuts=2).apply(pruned, context_for(pruned, calibration))
    assert report["removed_layers"] == [2, 4]
    expected = [types[0], types[1], types[3], types[5]]
    assert pruned.config.layer_types == expected
    for layer, kind in zip(pruned.model.layers, expected, strict=True):
        assert layer.self_attn.sliding_window == (4 if kind == "sliding_attention" else None)
    pruned.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == expected and reloaded.config.num_hidden_layers == 4
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits)

    adapter = get_adapter(source.config)
    predicted = ReplaceMeConfig(layers=[1, 2]).predict_config(source.config, adapter)
    assert predicted.layer_types == [types[0], types[3], types[4], types[5]]
    assert predicted.num_hidden_layers == 4
    assert source.config.layer_types == types  # a copy was changed, not the source's config
    predicted = ReplaceMeConfig(num_layers=2).predict_config(source.config, adapter)
    assert predicted.layer_types == types[:4]


def test_stories260k_last_layer_cut_is_the_lstsq_optimum(shared_assets, one_torch_thread):
    """stories260K (a real trained Llama, hidden 64, 5 layers), TinyStories text in right-padded batches:
    removing the last layer folds the lstsq map whose target is the *raw* output of layer 4 (a stock
    forward hook), not HF's final-normed hidden state. Planted bugs caught: the target after the final
    norm, pad tokens in the statistics, an always-on ridge."""
    folder = shared_assets / "models" / "stories260K"
    text = (shared_assets / "text" / "tinystories" / "sample.txt").read_text(encoding="utf-8")
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    source = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(text)["input_ids"]
    calibration = []
    for start, lengths in ((0, (96, 80, 64)), (240, (96, 50, 90))):
        width = max(lengths)
        input_ids = torch.full((len(lengths), width), 7, dtype=torch.long)  # pads: a real token, masked
        mask = torch.zeros(len(lengths), width, dtype=torch.long)
        offset = start
        for row, n in enumerate(lengths):
            input_ids[row, :n] = torch.tensor(ids[offset : offset + n])
            mask[row, :n] = 1
            offset += n
        calibration.append(CalibrationBatch(input_ids, mask))
    t, m, _, r = reference_map(source, calibration, kept=3, last_removed=4)
    pruned = copy.deepcopy(source)
    report = ReplaceMeConfig(layers=[4, 4]).apply(pruned, context_for(pruned, calibration))
    assert (
        pruned.config.num_hidden_layers == 4 and report["cuts"][0]["calibration_tokens"] == m.shape[0] == 476
    )
    expected = t.T @ source.model.layers[3].mlp.down_proj.weight.double()
    torch.testing.assert_close(
        pruned.model.layers[3].mlp.down_proj.weight.double(), expected, rtol=1e-4, atol=1e-6
    )
    r_sq = float((r * r).sum())
    assert report["cuts"][0]["relative_error_with_map"] == pytest.approx(
        float(((m @ t - r) ** 2).sum()) / r_sq, rel=1e-5
    )


def test_three_cuts_shift_by_every_earlier_removal():
    """Eight layers, 2, 4 and 6 nearly the identity, num_cuts 3: the third cut's indices shift by the two
    layers the first two cuts removed. Reference: the kept layers' weights are the source's layers 0, 1, 3, 5,
    7 (down_proj of 1, 3, 5 folded)."""
    source = tiny_llama(8, damped=(2, 4, 6))
    calibration = batches()
    pruned = copy.deepcopy(source)
    report = ReplaceMeConfig(num_layers=3, num_cuts=3).apply(pruned, context_for(pruned, calibration))
    assert report["removed_layers"] == [2, 4, 6]
    assert len(pruned.model.layers) == pruned.config.num_hidden_layers == 5
    for new, old in enumerate((0, 1, 3, 5, 7)):
        a = dict(pruned.model.layers[new].named_parameters())
        b = dict(source.model.layers[old].named_parameters())
        for key in a:
            assert torch.equal(a[key], b[key]) != (old in (1, 3, 5) and key == "mlp.down_proj.weight"), (
                old,
                key,
            )


def test_moe_fold_into_every_expert_and_the_shared_expert():
    """Qwen2-MoE (every layer MoE, a shared expert): M is the whole MoE block's output, T the lstsq optimum
    on stock-model hooks, and it folds into each expert's down projection (fused [E, out, in]) and the shared
    expert's as Tᵀ·W; the pruned layer then outputs Y + M·T. Planted bugs caught: experts folded with T
    instead of Tᵀ, the shared expert left out."""
    config = tf.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, shared_expert_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[],
        tie_word_embeddings=False, pad_token_id=PAD,
    )  # fmt: skip
    source = _randomised(tf.Qwen2MoeForCausalLM(config), 0, ())
    calibration = batches()
    t, m, y, _ = reference_map(source, calibration, kept=1, last_removed=2)
    pruned = copy.deepcopy(source)
    report = ReplaceMeConfig(layers=[2, 2]).apply(pruned, context_for(pruned, calibration))
    assert report["cuts"][0]["folded_into"] == ["mlp.experts.down_proj", "mlp.shared_expert.down_proj"]
    src, got = source.model.layers[1].mlp, pruned.model.layers[1].mlp
    for e in range(4):
        expected = t.T @ src.experts.down_proj[e].double()
        torch.testing.assert_close(got.experts.down_proj[e].double(), expected, rtol=1e-5, atol=1e-6)
    expected = t.T @ src.shared_expert.down_proj.weight.double()
    torch.testing.assert_close(got.shared_expert.down_proj.weight.double(), expected, rtol=1e-5, atol=1e-6)
    states, _ = hooked_states(pruned, calibration, {"h": pruned.model.layers[1]})
    torch.testing.assert_close(states["h"], y + m @ t, rtol=1e-4, atol=1e-5)
