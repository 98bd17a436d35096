"""ReplaceMe's estimators (normal equations, ridge fallback, cosine map, all-reduce) and the depth cuts'
angular distances and choice, against by-hand values, ``torch.linalg`` and stock-model hooks."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from depth_references import (
    batches,
    context_for,
    hooked_states,
    reference_map,
    tiny_llama,
)

from hf_prune.adapters import get_adapter
from hf_prune.context import PruneContext
from hf_prune.errors import ConfigFieldError
from hf_prune.methods.depth.cuts import Cut, DepthCutConfig, angular_distances, choose_cuts, select_cuts
from hf_prune.methods.depth.estimators import NormalEquations, fit_cosine_map
from hf_prune.methods.depth.replaceme import ReplaceMeConfig


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
