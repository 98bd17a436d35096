"""ReplaceMe and depth cuts against references computed without the code under test.

Every reference here comes from the stock transformers model with plain forward hooks, ``torch.linalg``
in float64 and hand-written index arithmetic; nothing from ``hf_prune.methods.depth`` is called to build
an expected value. The models are tiny random Llamas / Qwen2s built from configs (about a second each).
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import transformers as tf

from hf_prune.adapters import get_adapter
from hf_prune.calibration import CalibrationBatch
from hf_prune.context import PruneContext
from hf_prune.errors import ConfigFieldError, UnsupportedModelError
from hf_prune.methods.depth.cuts import Cut, DepthCutConfig, angular_distances, choose_cuts, select_cuts
from hf_prune.methods.depth.estimators import NormalEquations, fit_cosine_map
from hf_prune.methods.depth.replaceme import ReplaceMeConfig

HIDDEN = 16
VOCAB = 64
PAD = 0


def tiny_llama(num_layers=6, *, mlp_bias=False, damped=(), seed=0):
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        mlp_bias=mlp_bias,
        tie_word_embeddings=False,
        pad_token_id=PAD,
    )
    return _randomised(tf.LlamaForCausalLM(config), seed, damped)


def tiny_qwen2(num_layers=6, *, damped=(), seed=0):
    types = ["full_attention", "sliding_attention", "sliding_attention"] * (num_layers // 3)
    config = tf.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=num_layers,
        layer_types=types,
        tie_word_embeddings=False,
        pad_token_id=PAD,
    )
    return _randomised(tf.Qwen2ForCausalLM(config), seed, damped)


@torch.no_grad()
def _randomised(model, seed, damped):
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * 0.2
        is_norm = param.dim() == 1 and "norm" in name
        param.copy_(1.0 + 0.1 * noise if is_norm else noise)
    for index in damped:  # a nearly-identity layer: angular distance picks it
        layer = model.model.layers[index]
        layer.self_attn.o_proj.weight.mul_(0.01)
        layer.mlp.down_proj.weight.mul_(0.01)
        if layer.mlp.down_proj.bias is not None:
            layer.mlp.down_proj.bias.mul_(0.01)
    return model.float().eval()


def batches(lengths=((24, 24, 17, 9), (24, 12, 24, 20)), seed=1):
    """Right-padded batches; the pad positions hold random tokens (not the pad id) so that a statistic that
    reads them changes."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for row_lengths in lengths:
        width = max(row_lengths)
        ids = torch.randint(1, VOCAB, (len(row_lengths), width), generator=generator)
        mask = torch.zeros(len(row_lengths), width, dtype=torch.long)
        for row, n in enumerate(row_lengths):
            mask[row, :n] = 1
        out.append(CalibrationBatch(ids, mask))
    return out


def context_for(model, calibration):
    return PruneContext(adapter=get_adapter(model.config), progress=False, _batches=calibration)


@torch.no_grad()
def hooked_states(model, calibration, modules):
    """Outputs of ``modules`` (name → module) on the non-pad tokens of every batch, stock forward, float64;
    also, for each batch, the rows of the last real token."""
    store = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(mod, args, output, name=name):
            out = output[0] if isinstance(output, tuple) else output
            store[name].append(out.detach())

        handles.append(module.register_forward_hook(hook))
    masks = []
    try:
        for batch in calibration:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            masks.append(batch.attention_mask.bool())
    finally:
        for handle in handles:
            handle.remove()
    tokens = {
        name: torch.cat([o[m] for o, m in zip(outs, masks, strict=True)]).double()
        for name, outs in store.items()
    }
    last = {}
    for name, outs in store.items():
        rows = []
        for o, m in zip(outs, masks, strict=True):
            for r in range(m.shape[0]):
                rows.append(o[r, int(m[r].sum()) - 1])
        last[name] = torch.stack(rows).double()
    return tokens, last


def reference_map(model, calibration, kept, last_removed):
    """(T, M, Y, R) from the stock model: lstsq of R = h_{last} − (h_kept − M) on M over non-pad tokens."""
    layers = model.model.layers
    states, _ = hooked_states(
        model, calibration, {"h": layers[kept], "m": layers[kept].mlp, "target": layers[last_removed]}
    )
    m, h, target = states["m"], states["h"], states["target"]
    y = h - m
    r = target - y
    t = torch.linalg.lstsq(m, r, driver="gelsd").solution
    return t, m, y, r


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---- 1. the least-squares optimum, folded ----------------------------------------------------------


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


# ---- 3. two cuts end to end --------------------------------------------------------------------------


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


# ---- angular distances -------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", ["last", "all"])
@pytest.mark.parametrize("block", [1, 2])
def test_angular_distances_match_hooks(tokens, block):
    """d(l) = mean arccos(cos(h_l, h_{l+n}))/π over last real tokens (or all real tokens), from the stock
    model's hooks; planted bugs caught: the last token taken at the padded end, pad tokens counted,
    the wrong pair of layers, a missing /π or mean."""
    source = tiny_llama(5)
    calibration = batches()
    layers = source.model.layers
    every, last = hooked_states(source, calibration, {str(i): layer for i, layer in enumerate(layers)})
    states = last if tokens == "last" else every
    expected = []
    for start in range(5 - block):
        cos = torch.nn.functional.cosine_similarity(states[str(start)], states[str(start + block)], dim=-1)
        expected.append(float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean()))
    config = DepthCutConfig(num_layers=block, distance_tokens=tokens)
    cuts, distances = select_cuts(source, config, context_for(source, calibration))
    assert distances == pytest.approx(expected, abs=2e-6)
    assert all(d == round(d, 6) for d in distances)  # the report keeps 6 decimals
    best = min(range(len(expected)), key=lambda i: expected[i])
    assert [(c.kept, c.removed) for c in cuts] == [(best, list(range(best + 1, best + block + 1)))]


def test_choose_cuts_by_hand():
    """Greedy lowest-distance, non-overlapping, sorted by depth, touching cuts merged (by hand)."""
    d = torch.tensor([0.9, 0.1, 0.2, 0.05, 0.8, 0.3])  # block 1: starts 3, 1, 2 are the best three
    cuts = choose_cuts(d, block=1, num_cuts=3)
    # starts 1, 2, 3 remove 2, 3, 4: start 2 keeps layer 2 (removed by start 1), start 3 keeps 3: one cut.
    assert [(c.kept, c.removed) for c in cuts] == [(1, [2, 3, 4])]
    assert cuts[0].distances == pytest.approx([0.1, 0.2, 0.05])
    d = torch.tensor([0.5, 0.1, 0.2, 0.9, 0.05, 0.7])  # block 2: start 4 (removes 5, 6), then 1 (2, 3)
    cuts = choose_cuts(d, block=2, num_cuts=2)
    assert [(c.kept, c.removed) for c in cuts] == [(1, [2, 3]), (4, [5, 6])]
    # start 2 (removes 3, 4) overlaps start 1's: skipped even though it is the next lowest.
    d = torch.tensor([0.5, 0.1, 0.2, 0.9, 0.6])
    cuts = choose_cuts(d, block=2, num_cuts=2)
    assert [(c.kept, c.removed) for c in cuts] == [(1, [2, 3]), (4, [5, 6])]
    # ties keep the shallower start (stable sort)
    cuts = choose_cuts(torch.tensor([0.3, 0.3, 0.3]), block=1, num_cuts=1)
    assert [(c.kept, c.removed) for c in cuts] == [(0, [1])]


def test_choose_cuts_too_many_names_num_cuts():
    with pytest.raises(ConfigFieldError) as err:
        choose_cuts(torch.tensor([0.2, 0.1, 0.3]), block=2, num_cuts=2)
    assert err.value.field == "num_cuts"
    assert "only 1 non-overlapping blocks of 2 layers" in err.value.message


def test_cut_report_rounds_distances():
    assert Cut(1, [2, 3], [0.1234567891, 0.5]).to_dict() == {
        "kept_layer": 1,
        "removed_layers": [2, 3],
        "angular_distance": [0.123457, 0.5],
    }


# ---- 4. calibration stops at the deepest layer needed --------------------------------------------------


def count_calls(model):
    counts = {}
    handles = []
    modules = {f"layer{i}": layer for i, layer in enumerate(model.model.layers)}
    modules.update(norm=model.model.norm, lm_head=model.lm_head)
    for name, module in modules.items():
        counts[name] = 0

        def hook(mod, args, output, name=name):
            counts[name] += 1

        handles.append(module.register_forward_hook(hook))
    return counts, handles


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


# ---- 5. per-layer types after pruning ------------------------------------------------------------------


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


# ---- recipe fields: the bad key is named -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        ({}, "num_layers", "give exactly one of num_layers or layers"),
        ({"num_layers": 2, "layers": [1, 2]}, "num_layers", "give exactly one of num_layers or layers"),
        ({"num_layers": 2, "num_cuts": 0}, "num_cuts", "must be a positive integer, got 0"),
        ({"num_layers": 0}, "num_layers", "must be a positive integer, got 0"),
        ({"num_layers": 3, "num_cuts": 2}, "num_cuts", "must divide num_layers (3), got 2"),
        ({"layers": [1, 2], "num_cuts": 2}, "num_cuts", "must be 1 with explicit layers"),
        (
            {"layers": [0, 2]},
            "layers",
            "must be [first, last] with 1 <= first <= last (layer first-1 is kept), got [0, 2]",
        ),
        (
            {"layers": [3, 2]},
            "layers",
            "must be [first, last] with 1 <= first <= last (layer first-1 is kept), got [3, 2]",
        ),
        (
            {"layers": [1, 2, 3]},
            "layers",
            "must be [first, last] with 1 <= first <= last (layer first-1 is kept), got [1, 2, 3]",
        ),
        (
            {"layers": [2]},
            "layers",
            "must be [first, last] with 1 <= first <= last (layer first-1 is kept), got [2]",
        ),
        ({"layers": [1, 1], "ridge": -1.0}, "ridge", "must be >= 0, got -1.0"),
        ({"layers": [1, 1], "lr": 0.0}, "lr", "must be > 0, got 0.0"),
        ({"layers": [1, 1], "epochs": 0}, "epochs", "must be a positive integer, got 0"),
        ({"layers": [1, 1], "batch_tokens": 0}, "batch_tokens", "must be a positive integer, got 0"),
    ],
)
def test_bad_fields_are_named(kwargs, field, words):
    with pytest.raises(ConfigFieldError) as err:
        ReplaceMeConfig(**kwargs)
    assert err.value.field == field
    assert err.value.message == words


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_layers": 1, "num_cuts": 1},
        {"layers": [1, 1]},
        {"layers": [5, 5]},
        {"layers": [1, 1], "epochs": 1, "batch_tokens": 1, "ridge": 0.0, "lr": 1e-9},
    ],
)
def test_good_fields_pass(kwargs):
    ReplaceMeConfig(**kwargs)


def test_check_model_bounds_name_the_key():
    config = tiny_llama(4).config
    adapter = get_adapter(config)
    ReplaceMeConfig(num_layers=3).check_model(config, adapter)
    ReplaceMeConfig(layers=[1, 3]).check_model(config, adapter)
    with pytest.raises(ConfigFieldError) as err:
        ReplaceMeConfig(num_layers=4).check_model(config, adapter)
    assert (
        err.value.field == "num_layers"
        and "less than the model's 4 decoder layers, got 4" in err.value.message
    )
    with pytest.raises(ConfigFieldError) as err:
        ReplaceMeConfig(layers=[2, 4]).check_model(config, adapter)
    assert err.value.field == "layers" and "below 4" in err.value.message and "[2, 4]" in err.value.message


def test_calibration_needs_and_token_floor():
    config = tiny_llama(4).config
    assert DepthCutConfig(num_layers=1).needs_calibration
    assert not DepthCutConfig(layers=[1, 1]).needs_calibration
    assert ReplaceMeConfig(layers=[1, 1]).needs_calibration
    assert ReplaceMeConfig(layers=[1, 1]).min_calibration_tokens(config) == HIDDEN
    assert ReplaceMeConfig(layers=[1, 1], estimator="cosine").min_calibration_tokens(config) == 0


def test_replaceme_refuses_post_ffn_norm_before_weights():
    config = tf.Gemma2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    adapter = get_adapter(config)
    reason = ReplaceMeConfig.unsupported_reason(adapter)
    assert reason is not None and reason.startswith("ReplaceMe cannot fold its map into gemma2: ")
    with pytest.raises(UnsupportedModelError, match="ReplaceMe cannot fold"):
        ReplaceMeConfig(layers=[1, 1]).check_model(config, adapter)
    assert DepthCutConfig.unsupported_reason(adapter) is None  # layer_drop may still drop gemma2 layers
    assert ReplaceMeConfig.unsupported_reason(get_adapter(tiny_llama(2).config)) is None


# ---- estimators: direct references ---------------------------------------------------------------------


def test_normal_equations_sums_by_hand():
    g = torch.Generator().manual_seed(5)
    m, r = torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g)
    eq = NormalEquations(4)
    eq.add(m[:10], r[:10])
    eq.add(m[10:], r[10:])
    md, rd = m.double(), r.double()
    torch.testing.assert_close(eq.gram, md.T @ md)
    torch.testing.assert_close(eq.cross, md.T @ rd)
    assert float(eq.target_sq) == pytest.approx(float((rd**2).sum()))
    assert eq.num_tokens == 30
    eq.all_reduce()  # no process group: nothing changes
    assert eq.num_tokens == 30
    torch.testing.assert_close(eq.gram, md.T @ md)


def test_solve_with_ridge_equals_linalg_solve():
    g = torch.Generator().manual_seed(6)
    m, r = (
        torch.randn(50, 5, generator=g, dtype=torch.float64),
        torch.randn(50, 5, generator=g, dtype=torch.float64),
    )
    eq = NormalEquations(5)
    eq.add(m, r)
    t, alpha = eq.solve(3.0)
    assert alpha == 3.0
    torch.testing.assert_close(
        t, torch.linalg.solve(m.T @ m + 3.0 * torch.eye(5, dtype=torch.float64), m.T @ r)
    )


def test_singular_fallback_ridge_value_by_hand():
    """An all-zero column makes MᵀM exactly singular: α goes 0 → 1e-10·mean(diag) → ×10 … until it factors;
    the returned T is the ridge solution for the α reported."""
    g = torch.Generator().manual_seed(7)
    m = torch.randn(40, 4, generator=g, dtype=torch.float64)
    m[:, 2] = 0.0
    r = torch.randn(40, 4, generator=g, dtype=torch.float64)
    eq = NormalEquations(4)
    eq.add(m, r)
    t, alpha = eq.solve()
    scale = float((m * m).sum(dim=0).mean())
    assert alpha > 0
    steps = math.log10(alpha / (scale * 1e-10))
    assert steps == pytest.approx(round(steps), abs=1e-9) and 0 <= round(steps) < 12
    expected = torch.linalg.solve(m.T @ m + alpha * torch.eye(4, dtype=torch.float64), m.T @ r)
    torch.testing.assert_close(t, expected)
    # An all-zero gram (no tokens) takes the smallest ridge, 1e-30·1e-10 (the scale is clamped); NaN
    # activations never factor: the error says so.
    t, alpha = NormalEquations(3).solve()
    assert alpha == pytest.approx(1e-40) and torch.equal(t, torch.zeros(3, 3, dtype=torch.float64))
    eq = NormalEquations(3)
    eq.add(torch.full((4, 3), float("nan")), torch.ones(4, 3))
    with pytest.raises(RuntimeError, match="stayed singular after ridge fallback"):
        eq.solve()


def test_squared_error_of_a_random_map_by_hand():
    g = torch.Generator().manual_seed(8)
    m, r = (
        torch.randn(20, 3, generator=g, dtype=torch.float64),
        torch.randn(20, 3, generator=g, dtype=torch.float64),
    )
    t = torch.randn(3, 3, generator=g, dtype=torch.float64)
    eq = NormalEquations(3)
    eq.add(m, r)
    assert eq.squared_error(t) == pytest.approx(float(((m @ t - r) ** 2).sum()), rel=1e-12)


def test_cosine_map_one_adam_step_by_hand():
    """One epoch, one batch holding every token: T = I − lr·sign(∇) (Adam's first step), ∇ by autograd on
    the loss written here."""
    g = torch.Generator().manual_seed(9)
    m, r = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    y = torch.randn(8, 3, generator=g)
    for base in (None, y):
        t = torch.eye(3, requires_grad=True)
        pred, target = m @ t, r
        if base is not None:
            pred, target = pred + base, target + base
        (1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1).mean()).backward()
        expected = torch.eye(3) - 0.01 * torch.sign(t.grad)
        got = fit_cosine_map(m, r, base, lr=0.01, epochs=1, batch_tokens=8, progress=False)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected.double(), rtol=0, atol=1e-6)


def test_cosine_map_step_count_and_seed():
    """epochs × ceil(N / batch_tokens) Adam steps; the shuffle follows the seed."""
    g = torch.Generator().manual_seed(10)
    m, r = torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)
    a = fit_cosine_map(m, r, lr=0.01, epochs=2, batch_tokens=4, seed=1, progress=False)
    b = fit_cosine_map(m, r, lr=0.01, epochs=2, batch_tokens=4, seed=1, progress=False)
    c = fit_cosine_map(m, r, lr=0.01, epochs=2, batch_tokens=4, seed=2, progress=False)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    # Reference: the same Adam loop written here (3 batches per epoch: 4, 4, 2 tokens).
    t = torch.nn.Parameter(torch.eye(3))
    opt = torch.optim.Adam([t], lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        for idx in torch.randperm(10, generator=gen).split(4):
            loss = 1 - torch.nn.functional.cosine_similarity(m[idx] @ t, r[idx], dim=-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.testing.assert_close(a, t.detach().double())


# ---- a real model: stories260K ---------------------------------------------------------------------------


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


# ---- data-parallel sums ------------------------------------------------------------------------------


def _two_rank_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(11)
        m, r = torch.randn(60, 4, generator=g), torch.randn(60, 4, generator=g)
        rows = slice(0, 25) if rank == 0 else slice(25, 60)  # uneven shards
        eq = NormalEquations(4)
        eq.add(m[rows], r[rows])
        eq.all_reduce()
        t, _ = eq.solve()
        many = NormalEquations(1)  # more tokens than float32 counts exactly (2^24)
        many.num_tokens = 2**24 + 1
        many.all_reduce()
        torch.save(
            {
                "t": t,
                "tokens": eq.num_tokens,
                "target_sq": eq.target_sq,
                "gram": eq.gram,
                "many": many.num_tokens,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_ranks_equals_one_process_lstsq(tmp_path):
    """Two gloo ranks each hold part of the tokens; after ``all_reduce`` both solve the lstsq of all the
    tokens (torch.linalg.lstsq) and count every token. Planted bugs caught: a statistic not summed, the
    token count not summed."""
    import torch.multiprocessing as mp

    mp.start_processes(
        _two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    g = torch.Generator().manual_seed(11)
    m, r = torch.randn(60, 4, generator=g).double(), torch.randn(60, 4, generator=g).double()
    expected = torch.linalg.lstsq(m, r).solution
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["tokens"] == 60 and got["many"] == 2**25 + 2
        torch.testing.assert_close(got["gram"], m.T @ m)
        assert float(got["target_sq"]) == pytest.approx(float((r * r).sum()))
        torch.testing.assert_close(got["t"], expected, rtol=1e-6, atol=1e-6)
    NormalEquations(4).all_reduce()  # without a process group: a no-op (and mutmut sees the call here)


# ---- progress output -----------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["lstsq", "cosine"])
def test_progress_bars_only_when_asked(capfd, estimator):
    """progress False prints nothing; progress True names each pass (distances, the calibrated block, the
    cosine fit) on stderr."""
    source = tiny_llama(4, damped=(2,))
    calibration = batches()
    config = ReplaceMeConfig(num_layers=1, estimator=estimator, epochs=1)
    pruned = copy.deepcopy(source)
    config.apply(
        pruned, PruneContext(adapter=get_adapter(pruned.config), progress=False, _batches=calibration)
    )
    quiet = capfd.readouterr()
    assert quiet.err == "" and quiet.out == ""
    pruned = copy.deepcopy(source)
    config.apply(
        pruned, PruneContext(adapter=get_adapter(pruned.config), progress=True, _batches=calibration)
    )
    err = capfd.readouterr().err
    assert "angular distances: " in err and "calibrate layers 2-2: " in err
    assert ("cosine map: " in err) == ("loss=" in err) == (estimator == "cosine")
    assert "\n" not in err and err.endswith("\r")  # every bar is erased when its pass ends (leave=False)


# ---- config-only checks: composite configs, MoE layer flags, refused architectures ----------------------


def tiny_llava_config():
    text = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1,
        layer_types=["full_attention"] * 4,
    )  # fmt: skip
    vision = tf.CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    return tf.LlavaConfig(text_config=text, vision_config=vision)


def test_predict_config_of_a_composite_config_leaves_the_source_alone():
    """LLaVA: the prediction cuts the *text* config's count and list; the caller's config (and its text
    config, a sub-object) keeps 4 layers. Planted bug caught: a shallow copy."""
    config = tiny_llava_config()
    adapter = get_adapter(config)
    predicted = ReplaceMeConfig(layers=[1, 2]).predict_config(config, adapter)
    assert predicted.get_text_config().num_hidden_layers == 2
    assert config.get_text_config().num_hidden_layers == 4
    assert config.get_text_config().layer_types == ["full_attention"] * 4
    # The token floor is the text model's hidden size (LLaVA's top config has none).
    assert ReplaceMeConfig(layers=[1, 1]).min_calibration_tokens(config) == HIDDEN


def test_min_calibration_tokens_of_a_plain_config_object():
    from types import SimpleNamespace

    assert ReplaceMeConfig(layers=[1, 1]).min_calibration_tokens(SimpleNamespace(hidden_size=24)) == 24


def test_predict_config_rewrites_qwen2_moe_layer_flags():
    """Qwen2-MoE with decoder_sparse_step 2: layers 1 and 3 of 4 are MoE (by hand: (i+1) % 2 == 0).
    Removing layer 1 leaves old layers 0, 2, 3: dense, dense, MoE, so mlp_only_layers = [0, 1] with step 1.
    Removing the deepest layer (num_layers 1) leaves 0, 1, 2: dense, MoE, dense."""
    config = tf.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, shared_expert_intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[],
    )  # fmt: skip
    adapter = get_adapter(config)
    predicted = ReplaceMeConfig(layers=[1, 1]).predict_config(config, adapter)
    assert predicted.num_hidden_layers == 3
    assert predicted.mlp_only_layers == [0, 1] and predicted.decoder_sparse_step == 1
    predicted = ReplaceMeConfig(num_layers=1).predict_config(config, adapter)
    assert predicted.mlp_only_layers == [0, 2] and predicted.decoder_sparse_step == 1
    assert config.mlp_only_layers == [] and config.decoder_sparse_step == 2


def test_depth_refuses_token_pruning_only_architectures():
    """BERT (an encoder classifier) is refused by the depth base class, and ReplaceMe says the same."""
    config = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    adapter = get_adapter(config)
    expected = (
        "depth pruning does not support bert: an encoder classifier: only text token pruning supports it"
    )
    assert DepthCutConfig.unsupported_reason(adapter) == expected
    assert ReplaceMeConfig.unsupported_reason(adapter) == expected


def test_cosine_map_defaults_seed_zero_quiet_progress(capfd):
    """fit_cosine_map's defaults: seed 0 (the same map as seed=0 given explicitly, several batches so the
    shuffle matters), a progress bar on stderr unless progress=False."""
    g = torch.Generator().manual_seed(12)
    m, r = torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)
    default = fit_cosine_map(m, r, lr=0.01, epochs=2, batch_tokens=3)
    err = capfd.readouterr().err
    assert "cosine map: " in err and re.search(r" 8/8 ", err)  # 2 epochs × ceil(10 / 3) steps
    assert "\n" not in err and err.endswith("\r")  # the bar is erased when done (leave=False)
    explicit = fit_cosine_map(m, r, lr=0.01, epochs=2, batch_tokens=3, seed=0, progress=False)
    assert capfd.readouterr().err == ""
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    other = fit_cosine_map(m, r, lr=0.01, epochs=2, batch_tokens=3, seed=1, progress=False)
    assert not torch.allclose(default, other)


def test_cosine_map_step_counts_and_shown_loss(capfd):
    """The bar's total is epochs × ceil(N / batch_tokens) (9 and 10 tokens in batches of 3: 3 and 4 steps an
    epoch), and the loss it shows is 1 − cos: 0 when R = M at the identity."""
    g = torch.Generator().manual_seed(13)
    m = torch.randn(10, 3, generator=g)
    fit_cosine_map(m[:9], m[:9], lr=1e-3, epochs=1, batch_tokens=3)
    err = capfd.readouterr().err
    assert re.search(r" 3/3 ", err) and "loss=0.0000" in err
    fit_cosine_map(m, m, lr=1e-3, epochs=1, batch_tokens=3)
    assert re.search(r" 4/4 ", capfd.readouterr().err)


def test_cosine_map_float32_whatever_the_inputs_and_default_dtype():
    """float64 inputs (and a float64 default dtype) still fit in float32: the same map as float32 inputs.
    Planted bugs caught: a cast dropped (float64 tensors meet the float32 map), the map built in the default
    dtype."""
    g = torch.Generator().manual_seed(14)
    m, r, y = (torch.randn(12, 3, generator=g) for _ in range(3))
    expected = fit_cosine_map(m, r, y, lr=0.01, epochs=2, batch_tokens=5, progress=False)
    got = fit_cosine_map(
        m.double(), r.double(), y.double(), lr=0.01, epochs=2, batch_tokens=5, progress=False
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = fit_cosine_map(m, r, y, lr=0.01, epochs=2, batch_tokens=5, progress=False)
    finally:
        torch.set_default_dtype(previous)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_predict_config_with_per_layer_expert_counts():
    """A non-uniform config (experts_per_layer [0, 1, 0, 1]: layers with a single expert are still MoE):
    removing layer 1 keeps old layers 0, 2, 3, so experts_per_layer [0, 0, 1] and mlp_only_layers [0, 1]."""
    config = tf.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=1,
        moe_intermediate_size=8, shared_expert_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip
    config.experts_per_layer = [0, 1, 0, 1]
    predicted = ReplaceMeConfig(layers=[1, 1]).predict_config(config, get_adapter(config))
    assert predicted.experts_per_layer == [0, 0, 1]
    assert predicted.mlp_only_layers == [0, 1]


def test_angular_distances_accumulate_in_float64():
    """The per-start sums are float64: equal to the float64 reference to 1e-12 (float32 sums would not be)."""
    source = tiny_llama(4)
    calibration = batches(lengths=((24,) * 8, (24,) * 8, (20,) * 8), seed=4)
    layers = source.model.layers
    every, _ = hooked_states(source, calibration, {str(i): layer for i, layer in enumerate(layers)})
    expected = []
    for start in range(3):
        cos = torch.nn.functional.cosine_similarity(every[str(start)], every[str(start + 1)], dim=-1)
        expected.append(float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean()))
    got = angular_distances(source, context_for(source, calibration), 1, "all")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_choose_cuts_ties_and_overlaps_with_every_earlier_cut():
    """Ties among many candidates go to the shallowest start (a stable sort; an unstable one picks another
    start once there are ~20 candidates); a candidate is refused if it overlaps *any* earlier cut, not only
    the last one taken. Reference by hand."""
    cuts = choose_cuts(torch.zeros(32, dtype=torch.float64), block=1, num_cuts=2)
    assert [(c.kept, c.removed) for c in cuts] == [(0, [1, 2])]  # starts 0 and 1 touch: merged
    # block 2: best 1 (removes 2-3), then 5 (6-7); 2 (3-4) overlaps the first; 4 (5-6) the second; 3 (4-5) fits.
    d = torch.tensor([0.9, 0.1, 0.3, 0.8, 0.7, 0.2, 0.85])
    cuts = choose_cuts(d, block=2, num_cuts=3)
    assert [(c.kept, c.removed) for c in cuts] == [(1, [2, 3, 4, 5, 6, 7])]
    assert cuts[0].distances == pytest.approx([0.1, 0.8, 0.2])


@pytest.mark.parametrize("kind", ["same", "opposite"])
def test_angular_distance_of_identical_and_opposite_states_is_finite(kind):
    """A layer whose output equals its input (distance 0) or its negation (distance 1): rounding puts some
    cosines just past ±1, which must be clamped before arccos (else NaN). The layer is made so by a forward
    hook on the stock model."""
    source = tiny_llama(4)
    calibration = batches(lengths=((24,) * 8, (24,) * 8), seed=5)
    sign = 1.0 if kind == "same" else -1.0

    def replace(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return sign * hidden

    handle = source.model.layers[2].register_forward_hook(replace, with_kwargs=True)
    try:
        got = angular_distances(source, context_for(source, calibration), 1, "all")
    finally:
        handle.remove()
    assert torch.isfinite(got).all()
    assert float(got[1]) == pytest.approx(0.0 if kind == "same" else 1.0, abs=1e-6)


def test_choose_cuts_error_says_what_to_do():
    with pytest.raises(ConfigFieldError) as err:
        choose_cuts(torch.tensor([0.2, 0.1, 0.3]), block=2, num_cuts=2)
    assert err.value.message.endswith("; lower num_cuts or give explicit layers")


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


def test_relative_errors_when_the_residual_is_small():
    """Every layer nearly the identity (output projections × 0.01): ‖R‖² < 1, and the report's relative
    errors are still ‖M·T − R‖² / ‖R‖² and ‖M − R‖² / ‖R‖² (reference on stock-model hooks)."""
    source = tiny_llama(4, damped=(0, 1, 2, 3))
    calibration = batches()
    t, m, _, r = reference_map(source, calibration, kept=1, last_removed=2)
    r_sq = float((r * r).sum())
    assert r_sq < 0.5
    pruned = copy.deepcopy(source)
    (cut,) = ReplaceMeConfig(layers=[2, 2]).apply(pruned, context_for(pruned, calibration))["cuts"]
    assert cut["relative_error_with_map"] == pytest.approx(float(((m @ t - r) ** 2).sum()) / r_sq, rel=1e-5)
    assert cut["relative_error_without_map"] == pytest.approx(float(((m - r) ** 2).sum()) / r_sq, rel=1e-6)


def test_cosine_seed_reaches_the_fit():
    """ReplaceMe's seed field reaches the cosine fit's shuffle: seeds 0 and 1 fold different maps (several
    batches per epoch)."""
    source = tiny_llama(4)
    calibration = batches()
    folded = []
    for seed in (0, 1):
        pruned = copy.deepcopy(source)
        config = ReplaceMeConfig(
            layers=[2, 2], estimator="cosine", lr=1e-2, epochs=2, batch_tokens=16, seed=seed
        )
        config.apply(pruned, context_for(pruned, calibration))
        folded.append(pruned.model.layers[1].mlp.down_proj.weight.detach().clone())
    assert not torch.allclose(folded[0], folded[1])


def test_squared_error_of_a_float32_map():
    """A float32 map is cast to the sums' float64 before use (gram @ T would refuse mixed dtypes)."""
    g = torch.Generator().manual_seed(15)
    m, r = (
        torch.randn(20, 3, generator=g, dtype=torch.float64),
        torch.randn(20, 3, generator=g, dtype=torch.float64),
    )
    t = torch.randn(3, 3, generator=g)
    eq = NormalEquations(3)
    eq.add(m, r)
    assert eq.squared_error(t) == pytest.approx(float(((m @ t.double() - r) ** 2).sum()), rel=1e-12)


def test_solve_keeps_zero_ridge_for_an_ill_conditioned_but_regular_gram():
    """diag(1, 1e-10): condition 1e10 is below the 1e13 limit, so α stays 0 and T = (MᵀM)⁻¹MᵀR exactly;
    an indefinite matrix (not reachable from ``add``) still fails after the 12 tries (α up to mean diag)."""
    eq = NormalEquations(2)
    eq.gram = torch.diag(torch.tensor([1.0, 1e-10], dtype=torch.float64))
    eq.cross = torch.eye(2, dtype=torch.float64)
    t, alpha = eq.solve()
    assert alpha == 0.0
    torch.testing.assert_close(t, torch.diag(torch.tensor([1.0, 1e10], dtype=torch.float64)))
    eq.gram = torch.diag(torch.tensor([4.0, -2.0], dtype=torch.float64))  # mean diag 1: 12th try α = 1
    with pytest.raises(RuntimeError, match="stayed singular"):
        eq.solve()


def test_ridge_grows_tenfold_per_try():
    """diag(1, -1e-9) (mean diag s ≈ 0.5): α = 1e-10·s (still indefinite), then 1e-9·s, then 1e-8·s ≈ 5e-9,
    the first that makes it positive definite: α is exactly 1e-8·s. The error when it never factors is the
    whole message."""
    eq = NormalEquations(2)
    eq.gram = torch.diag(torch.tensor([1.0, -1e-9], dtype=torch.float64))
    eq.cross = torch.eye(2, dtype=torch.float64)
    _, alpha = eq.solve()
    assert alpha == pytest.approx((1.0 - 1e-9) / 2 * 1e-8, rel=1e-9)
    eq.gram = torch.full((2, 2), float("nan"), dtype=torch.float64)
    with pytest.raises(
        RuntimeError, match="^least-squares normal equations stayed singular after ridge fallback$"
    ):
        eq.solve()
