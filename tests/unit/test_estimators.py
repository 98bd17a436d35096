"""ReplaceMe's estimators and cut selection, on small synthetic data."""

import pytest
import torch

from hf_prune.methods.depth.cuts import Cut, choose_cuts, shifted
from hf_prune.methods.depth.estimators import NormalEquations, fit_cosine_map


def synthetic(n=400, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, d, generator=g, dtype=torch.float64)
    true_map = torch.randn(d, d, generator=g, dtype=torch.float64)
    r = m @ true_map + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return m, r


def test_lstsq_equals_direct_solve():
    m, r = synthetic()
    equations = NormalEquations(m.shape[1])
    equations.add(m, r)
    transform, alpha = equations.solve()
    direct = torch.linalg.lstsq(m, r).solution
    assert alpha == 0.0
    torch.testing.assert_close(transform, direct, rtol=1e-9, atol=1e-9)


def test_streaming_accumulation_equals_one_batch():
    m, r = synthetic(n=1000)
    whole, streamed = NormalEquations(m.shape[1]), NormalEquations(m.shape[1])
    whole.add(m, r)
    for rows in torch.arange(m.shape[0]).split(137):  # uneven batches, float32 inputs as from a model
        streamed.add(m[rows].float(), r[rows].float())
    assert streamed.num_tokens == whole.num_tokens == 1000
    torch.testing.assert_close(streamed.solve()[0], whole.solve()[0], rtol=1e-5, atol=1e-5)


def test_squared_error_from_sums_matches_residuals():
    m, r = synthetic()
    equations = NormalEquations(m.shape[1])
    equations.add(m, r)
    transform = equations.solve()[0]
    direct = float(((m @ transform - r) ** 2).sum())
    assert equations.squared_error(transform) == pytest.approx(direct, rel=1e-8)
    identity = torch.eye(m.shape[1], dtype=torch.float64)
    assert equations.squared_error(identity) == pytest.approx(float(((m - r) ** 2).sum()), rel=1e-8)


def test_singular_gram_falls_back_to_ridge():
    m, r = synthetic(d=6)
    m = torch.cat([m, m[:, :1]], dim=1)  # a duplicated column makes MᵀM singular
    r = torch.cat([r, r[:, :1]], dim=1)
    equations = NormalEquations(7)
    equations.add(m, r)
    transform, alpha = equations.solve()
    assert alpha > 0 and torch.isfinite(transform).all()
    # The ridge solution still fits the data about as well as the minimum-norm solution.
    best = torch.linalg.lstsq(m, r, driver="gelsd").solution
    assert equations.squared_error(transform) <= 1.01 * equations.squared_error(best) + 1e-9


@pytest.mark.parametrize("with_base", [False, True])
def test_cosine_map_improves_cosine_loss(with_base):
    m, r = synthetic(n=600, d=8)
    base = torch.randn_like(r) * 0.1 if with_base else None

    def loss(t):
        pred, target = m @ t, r
        if base is not None:
            pred, target = pred + base, target + base
        return float(1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1).mean())

    t = fit_cosine_map(
        m.float(),
        r.float(),
        None if base is None else base.float(),
        lr=1e-2,
        epochs=20,
        batch_tokens=128,
        progress=False,
    )
    assert loss(t) < 0.5 * loss(torch.eye(8, dtype=torch.float64))


def test_choose_cuts_greedy_non_overlapping_and_merged():
    distances = torch.tensor([0.5, 0.1, 0.4, 0.2, 0.9, 0.3])  # starts 0..5, block 1
    cuts = choose_cuts(distances, block=1, num_cuts=2)
    assert [(c.kept, c.removed) for c in cuts] == [(1, [2]), (3, [4])]
    # Starts 1 and 2 with block 1 remove layers 2 and 3: contiguous, so one cut keeping layer 1.
    cuts = choose_cuts(torch.tensor([0.9, 0.1, 0.2, 0.8]), block=1, num_cuts=2)
    assert [(c.kept, c.removed) for c in cuts] == [(1, [2, 3])]
    assert cuts[0].distances == pytest.approx([0.1, 0.2])
    # Overlapping candidates are skipped: block 2, best start 1 removes 2-3; start 2 would overlap.
    cuts = choose_cuts(torch.tensor([0.9, 0.1, 0.15, 0.8, 0.3]), block=2, num_cuts=2)
    assert [(c.kept, c.removed) for c in cuts] == [(1, [2, 3]), (4, [5, 6])]


def test_choose_cuts_reports_when_blocks_do_not_fit():
    from hf_prune.errors import ConfigFieldError

    with pytest.raises(ConfigFieldError, match="non-overlapping blocks"):
        choose_cuts(torch.tensor([0.5, 0.1, 0.6]), block=2, num_cuts=2)


def test_shifted_indices_after_earlier_removals():
    assert shifted(Cut(kept=5, removed=[6, 7], distances=[]), removed_before=2) == (3, 5)


def _all_reduce_worker(rank, init_file, inputs, targets, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        equations = NormalEquations(inputs.shape[1])
        half = inputs.shape[0] // 2
        rows = slice(0, half) if rank == 0 else slice(half, None)
        equations.add(inputs[rows], targets[rows])
        equations.all_reduce()
        results[rank] = (equations.solve()[0], equations.num_tokens)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_statistics_sum_over_ranks(tmp_path):
    """Two gloo ranks with half the tokens each reach the single-process solution."""
    import torch.multiprocessing as mp

    m, r = synthetic(n=300, d=6)
    whole = NormalEquations(6)
    whole.add(m, r)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_all_reduce_worker, args=(str(tmp_path / "rendezvous"), m, r, results), nprocs=2)
        for rank in (0, 1):
            transform, tokens = results[rank]
            assert tokens == 300
            torch.testing.assert_close(transform, whole.solve()[0], rtol=1e-9, atol=1e-9)


def test_pad_tokens_never_enter_the_statistics():
    """One padded batch of two sequences gives the same map as the two sequences unpadded, one by one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_prune.adapters import get_adapter
    from hf_prune.calibration import CalibrationBatch
    from hf_prune.context import PruneContext
    from hf_prune.methods.depth.replaceme import ReplaceMeConfig, estimate_map

    torch.manual_seed(0)
    model = (
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=50,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=3,
                num_attention_heads=2,
                num_key_value_heads=1,
            )
        )
        .double()
        .eval()
    )
    long, short = torch.randint(3, 50, (1, 12)), torch.randint(3, 50, (1, 7))
    padded_ids = torch.zeros(2, 12, dtype=torch.long)
    padded_ids[0], padded_ids[1, :7] = long[0], short[0]
    padded_ids[1, 7:] = 49  # garbage in the pad positions must not matter
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0], mask[1, :7] = 1, 1
    config = ReplaceMeConfig(layers=[2, 2])
    adapter = get_adapter(model.config)

    def fit(batches):
        return estimate_map(model, 1, 2, config, PruneContext(adapter, progress=False, _batches=batches))

    padded_map, padded_stats = fit([CalibrationBatch(padded_ids, mask)])
    separate_map, separate_stats = fit(
        [CalibrationBatch(long, torch.ones_like(long)), CalibrationBatch(short, torch.ones_like(short))]
    )
    assert padded_stats["calibration_tokens"] == separate_stats["calibration_tokens"] == 19
    torch.testing.assert_close(padded_map, separate_map, rtol=1e-8, atol=1e-8)
