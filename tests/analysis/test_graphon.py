"""Graphon estimates, distances and the Graphon NTK, against masks of known structure, brute force, a
textbook dense NTK written here, and the empirical NTK of wide masked networks (autograd)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hf_prune.analysis import (
    GraphonError,
    cut_distance,
    estimate_graphon,
    graphon_ntk,
    l2_distance,
    spectral_summary,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def exact_block_mask(densities: list[list[float]], size: int) -> torch.Tensor:
    """A size×size 0/1 mask whose (a, b) block keeps exactly densities[a][b] of each row's entries there,
    spread evenly (no randomness), so every block's density is known exactly."""
    blocks = len(densities)
    side = size // blocks
    mask = torch.zeros(size, size)
    for a, b in itertools.product(range(blocks), repeat=2):
        keep = round(densities[a][b] * side)
        for i in range(side):
            columns = [(i + j * side // max(keep, 1)) % side for j in range(keep)]
            mask[a * side + i, [b * side + c for c in columns]] = 1.0
    return mask


def test_constant_graphon_is_recovered_from_a_random_mask():
    generator = torch.Generator().manual_seed(0)
    mask = (torch.rand(2000, 1600, generator=generator) < 0.3).float()
    graphon = estimate_graphon(mask, bins=16)
    assert graphon.shape == (16, 16)
    assert (graphon - 0.3).abs().max() < 0.05
    assert graphon.mean() == pytest.approx(
        float(mask.double().mean()), abs=1e-12
    )  # equal blocks: the mean is kept


def test_two_block_graphon_is_recovered_whatever_the_node_order():
    densities = [[0.8, 0.3], [0.1, 0.2]]
    mask = exact_block_mask(densities, 400)
    generator = torch.Generator().manual_seed(1)
    shuffled = mask[torch.randperm(400, generator=generator)][:, torch.randperm(400, generator=generator)]
    graphon = estimate_graphon(shuffled, bins=4)
    expected = torch.tensor(densities).repeat_interleave(2, 0).repeat_interleave(2, 1).double()
    torch.testing.assert_close(graphon, expected, atol=0.01, rtol=0)


def test_degree_concentrated_threshold_graphon():
    """Row i keeps its first n − i entries: W(u, v) = 1[u + v < 1]; on a K grid a cell is full above the
    anti-diagonal, empty below, and half full on it."""
    n, k = 512, 8
    mask = (torch.arange(n)[:, None] + torch.arange(n)[None, :] < n).float()
    generator = torch.Generator().manual_seed(2)
    mask = mask[torch.randperm(n, generator=generator)][:, torch.randperm(n, generator=generator)]
    graphon = estimate_graphon(mask, bins=k)
    for a, b in itertools.product(range(k), repeat=2):
        expected = 1.0 if a + b < k - 1 else 0.0 if a + b > k - 1 else 0.5
        assert graphon[a, b] == pytest.approx(expected, abs=1 / (n // k) + 1e-9), (a, b)


def test_estimate_is_invariant_to_permutations():
    # Distinct degrees (no ties): any relabelling gives exactly the same estimate.
    n = 300
    degrees = torch.randperm(n, generator=torch.Generator().manual_seed(3)) + 1
    mask = (torch.arange(n)[None, :] < degrees[:, None]).float()
    generator = torch.Generator().manual_seed(4)
    for _ in range(3):
        permuted = mask[torch.randperm(n, generator=generator)][:, torch.randperm(n, generator=generator)]
        assert torch.equal(estimate_graphon(permuted, bins=10), estimate_graphon(mask, bins=10))
    # With ties among degrees the order of equal-degree nodes is arbitrary: the estimate moves only slightly.
    random = (torch.rand(400, 400, generator=generator) < 0.2).float()
    permuted = random[torch.randperm(400, generator=generator)][:, torch.randperm(400, generator=generator)]
    assert l2_distance(estimate_graphon(random, 16), estimate_graphon(permuted, 16)) < 0.03


def test_smoothing_averages_neighbouring_cells():
    mask = exact_block_mask([[1.0, 0.0], [0.0, 0.5]], 64)
    smooth = estimate_graphon(mask, bins=4, smooth=1)
    raw = estimate_graphon(mask, bins=4)
    # Cell (0, 0): mean over rows 0..1 and columns 0..1 of the raw grid (edges clipped).
    assert smooth[0, 0] == pytest.approx(float(raw[:2, :2].mean()))
    assert smooth[1, 2] == pytest.approx(float(raw[0:3, 1:4].mean()))


def test_distances_are_zero_on_identical_inputs_and_symmetric():
    generator = torch.Generator().manual_seed(5)
    a, b = torch.rand(8, 8, generator=generator), torch.rand(8, 8, generator=generator)
    assert l2_distance(a, a) == 0.0 and cut_distance(a, a) == 0.0
    assert l2_distance(a, b) == pytest.approx(l2_distance(b, a))
    assert cut_distance(a, b) == pytest.approx(cut_distance(b, a))
    assert l2_distance(a, b) == pytest.approx(float(((a - b).double() ** 2).mean().sqrt()))


@pytest.mark.parametrize("seed", range(8))
def test_cut_distance_equals_brute_force_on_small_grids(seed):
    difference = torch.randn(5, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    best = 0.0
    for rows in itertools.product([False, True], repeat=5):
        for cols in itertools.product([False, True], repeat=5):
            best = max(best, abs(float(difference[list(rows)][:, list(cols)].sum())))
    assert cut_distance(difference, torch.zeros_like(difference)) == pytest.approx(best / 25, abs=1e-12)


def test_cut_distance_of_a_rank_one_difference():
    u = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    v = torch.tensor([-1.0, 2.0, 2.0, -0.5], dtype=torch.float64)
    # max |Σ_S u · Σ_T v| = max(positive, negative mass of u) · max(positive, negative mass of v)
    expected = max(4.5, 2.0) * max(4.0, 1.5) / 16
    assert cut_distance(torch.outer(u, v), torch.zeros(4, 4, dtype=torch.float64)) == pytest.approx(expected)


def dense_relu_ntk(
    x: torch.Tensor, layers: int, sigma_w2: float = 2.0, sigma_b2: float = 0.0
) -> torch.Tensor:
    """The dense ReLU NTK, pair by pair, from Jacot et al. / Arora et al. (2019): Σ⁰ = σ²xᵀx'/d, then
    per layer Σ = σ²·(√(ab)/2π)(sin θ + (π − θ) cos θ), Σ̇ = σ²(π − θ)/2π, Θ ← Θ·Σ̇ + Σ."""
    n, d = x.shape
    gram = torch.zeros(n, n, dtype=torch.float64)
    for i, j in itertools.product(range(n), repeat=2):
        s_ii, s_jj, s_ij = (sigma_w2 * float(x[p] @ x[q]) / d + sigma_b2 for p, q in ((i, i), (j, j), (i, j)))
        theta_ntk = s_ij
        for _ in range(layers):
            angle = math.acos(max(-1.0, min(1.0, s_ij / math.sqrt(s_ii * s_jj))))
            new_ij = (
                sigma_w2
                * math.sqrt(s_ii * s_jj)
                / (2 * math.pi)
                * (math.sin(angle) + (math.pi - angle) * math.cos(angle))
                + sigma_b2
            )
            dot = sigma_w2 * (math.pi - angle) / (2 * math.pi)
            s_ii, s_jj = (
                sigma_w2 * s_ii / 2 + sigma_b2,
                sigma_w2 * s_jj / 2 + sigma_b2,
            )  # θ = 0 on the diagonal
            theta_ntk = theta_ntk * dot + new_ij
            s_ij = new_ij
        gram[i, j] = theta_ntk
    return gram


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_constant_graphon_is_c_to_the_L_times_the_dense_ntk(density):
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    hidden = 3
    graphons = [torch.full(shape, density, dtype=torch.float64) for shape in ((4, 3), (4, 4), (4, 4))]
    gram = graphon_ntk(x, graphons)
    # 3 masked layers (the readout is dense): c³; the readout is the dense recursion's last step.
    torch.testing.assert_close(gram, density**hidden * dense_relu_ntk(x, hidden), rtol=1e-10, atol=1e-12)


def test_ntk_gram_is_symmetric_positive_semidefinite():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(20, 30, generator=generator, dtype=torch.float64)
    graphons = [torch.rand(5, 6, generator=generator), torch.rand(5, 5, generator=generator)]
    gram = graphon_ntk(x, graphons, readout=torch.rand(5, generator=generator))
    assert torch.equal(gram, gram.T)
    eigenvalues = torch.linalg.eigvalsh(gram)
    assert eigenvalues.min() > -1e-10 * eigenvalues.max()


@pytest.mark.slow
def test_graphon_ntk_is_the_wide_masked_networks_empirical_ntk():
    """Masks drawn from a two-block graphon on a 2048-wide, 2-hidden-layer ReLU net (NTK parametrisation):
    the empirical NTK JJᵀ (autograd), averaged over 6 draws, is within 6% of the Graphon NTK. Ignoring
    where a neuron sits (the graphons' mean density) is 88% off, transposed graphons 8%."""
    n, d = 2048, 256
    first = torch.tensor([[1.0, 0.05], [0.05, 0.5]], dtype=torch.float64)
    second = torch.tensor([[1.0, 0.0], [0.05, 0.3]], dtype=torch.float64)
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    x[:, : d // 2] *= 3.0  # the first input block carries more signal
    expected = graphon_ntk(x, [first, second])

    def draw(graphon, rows, cols, generator):
        r, c = torch.arange(rows) * 2 // rows, torch.arange(cols) * 2 // cols
        return (torch.rand(rows, cols, generator=generator, dtype=torch.float64) < graphon[r][:, c]).double()

    grams = []
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        m1, m2 = draw(first, n, d, generator), draw(second, n, n, generator)
        w1, w2, w3 = (
            torch.randn(*s, generator=generator, dtype=torch.float64).requires_grad_()
            for s in ((n, d), (n, n), (n,))
        )
        rows = []
        for i in range(len(x)):
            h = torch.relu(math.sqrt(2 / d) * x[i] @ (m1 * w1).T)
            h = torch.relu(math.sqrt(2 / n) * h @ (m2 * w2).T)
            out = math.sqrt(2 / n) * h @ w3
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(out, [w1, w2, w3])]))
        jacobian = torch.stack(rows)
        grams.append(jacobian @ jacobian.T)
    empirical = torch.stack(grams).mean(0)
    assert float(((empirical - expected).abs() / expected.abs().max()).max()) < 0.06


def test_spectral_summary_on_known_eigenvalues():
    k = torch.arange(1, 41, dtype=torch.float64)
    eigenvalues = k**-2.0
    q, _ = torch.linalg.qr(
        torch.randn(40, 40, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    )
    gram = q @ torch.diag(eigenvalues) @ q.T
    summary = spectral_summary(gram)
    assert summary["decay_alpha"] == pytest.approx(2.0, abs=1e-8)
    assert summary["trace_over_top"] == pytest.approx(float(eigenvalues.sum()))
    assert summary["top1_over_top2"] == pytest.approx(4.0)
    assert summary["top5_share"] == pytest.approx(float(eigenvalues[:5].sum() / eigenvalues.sum()))


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: estimate_graphon(torch.ones(10, 10)), "has no zeros: nothing was pruned"),
        (
            lambda: estimate_graphon(torch.eye(10), bins=11),
            "bins: 11 is larger than the mask's smaller side (10",
        ),
        (lambda: estimate_graphon(torch.eye(10) * 2), "must hold only 0 and 1"),
        (
            lambda: estimate_graphon(torch.zeros(3, 3, 3)),
            "must be a 2-D tensor [outputs, inputs], got (3, 3, 3)",
        ),
        (lambda: estimate_graphon(torch.eye(10), bins=0), "bins: must be a positive integer, got 0"),
        (lambda: cut_distance(torch.zeros(2, 2), torch.zeros(3, 3)), "of one shape, got (2, 2) and (3, 3)"),
        (
            lambda: graphon_ntk(torch.randn(3, 4), [torch.ones(2, 2), torch.ones(2, 3)]),
            "graphons[1]: has 3 input blocks, but graphons[0] has 2 output blocks",
        ),
        (lambda: graphon_ntk(torch.randn(3, 4), [torch.full((2, 2), 1.5)]), "densities must lie in [0, 1]"),
        (lambda: graphon_ntk(torch.randn(3, 4), [torch.full((2, 2), -0.1)]), "densities must lie in [0, 1]"),
        (lambda: graphon_ntk(torch.randn(3, 4), []), "give one K_out × K_in density matrix per masked layer"),
        (lambda: graphon_ntk(torch.randn(3, 4), [torch.ones(2)]), "graphons[0]: must be a 2-D tensor"),
        (
            lambda: graphon_ntk(torch.randn(3, 4), [torch.ones(2, 5)]),
            "graphons[0]: 5 input blocks for 4 input",
        ),
        (lambda: graphon_ntk(torch.randn(3), [torch.ones(2, 2)]), "x: must be [samples, features], got (3,)"),
        (
            lambda: graphon_ntk(torch.randn(3, 4), [torch.ones(2, 2)], readout=torch.ones(3)),
            "readout: 3 densities for 2 blocks of the last layer",
        ),
        (lambda: estimate_graphon(torch.zeros(0, 3)), "mask: is empty"),
        (lambda: estimate_graphon(torch.eye(4), bins=2, smooth=-1), "smooth: must be >= 0, got -1"),
    ],
)
def test_bad_input_is_named(call, words):
    with pytest.raises(GraphonError) as err:
        call()
    assert words in str(err.value)


def test_biases_add_to_every_layers_covariance():
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    graphons = [torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)]
    gram = graphon_ntk(x, graphons, sigma_w=1.3, sigma_b=0.5)
    torch.testing.assert_close(
        gram, dense_relu_ntk(x, 2, sigma_w2=1.69, sigma_b2=0.25), rtol=1e-10, atol=1e-12
    )


def test_spectral_summary_scales_and_a_missing_second_eigenvalue():
    eigenvalues = 3.0 * torch.arange(1, 11, dtype=torch.float64) ** -1.5
    summary = spectral_summary(torch.diag(eigenvalues))
    assert summary["trace_over_top"] == pytest.approx(float(eigenvalues.sum() / 3.0))
    assert summary["decay_alpha"] == pytest.approx(1.5)
    assert spectral_summary(torch.diag(torch.tensor([2.0, 0.0, 0.0])))["top1_over_top2"] == math.inf
    with pytest.raises(GraphonError, match="needs at least 2 samples and a positive top eigenvalue"):
        spectral_summary(torch.ones(1, 1))


def test_cut_distance_on_non_square_grids_equals_brute_force():
    for seed in range(4):
        difference = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        best = max(
            abs(float(difference[list(r)][:, list(c)].sum()))
            for r in itertools.product([False, True], repeat=3)
            for c in itertools.product([False, True], repeat=6)
        )
        assert cut_distance(difference, torch.zeros_like(difference)) == pytest.approx(best / 18, abs=1e-12)


def test_edge_values_are_accepted():
    assert estimate_graphon(torch.eye(10), bins=10).shape == (10, 10)  # as many bins as nodes
    assert estimate_graphon(torch.eye(10), bins=1).item() == pytest.approx(0.1)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert (
        graphon_ntk(x, [torch.zeros(2, 4, dtype=torch.float64)]).abs().max() < 1e-200
    )  # density 0 is allowed
