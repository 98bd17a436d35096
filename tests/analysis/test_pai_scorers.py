"""Pruning-at-initialisation scorers on a 2-layer toy network, against hand computations: SNIP = |w·g| with
the gradient written out by hand, SynFlow with an all-ones input and |w|, GraSP's Hessian-gradient product
from torch.autograd.functional on the flattened weights, and the masks' budgets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_prune.analysis import GraphonError, prune_at_init
from hf_prune.analysis.pai_scorers import keep_top, score_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_network(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False)).double()
    return model


def toy_data(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(5, 3, generator=generator, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])


def cross_entropy_loss(x, y):
    return lambda m: nn.functional.cross_entropy(m(x), y)


def test_snip_is_weight_times_hand_written_gradient():
    model, (x, y) = toy_network(), toy_data()
    w1, w2 = model[0].weight.detach(), model[2].weight.detach()
    # Forward and backward of softmax cross-entropy through one ReLU layer, by hand.
    z = x @ w1.T
    h = z.clamp_min(0)
    logits = h @ w2.T
    delta = (torch.softmax(logits, dim=1) - nn.functional.one_hot(y, 2)) / len(x)  # dL/dlogits
    g2 = delta.T @ h
    g1 = ((delta @ w2) * (z > 0)).T @ x
    scores = score_weights(model, "snip", ["0", "2"], loss=cross_entropy_loss(x, y))
    torch.testing.assert_close(scores["0"], (w1 * g1).abs())
    torch.testing.assert_close(scores["2"], (w2 * g2).abs())


def test_synflow_is_the_path_norm_gradient_with_all_ones_input():
    model = toy_network()
    a1, a2 = model[0].weight.detach().abs(), model[2].weight.detach().abs()
    # R = 1ᵀ |W2| |W1| 1 (ReLU is the identity on non-negative values): dR/dW2[i, j] = (|W1| 1)_j,
    # dR/dW1[j, k] = (1ᵀ |W2|)_j.
    expected_2 = a2 * a1.sum(dim=1)[None, :]
    expected_1 = a1 * a2.sum(dim=0)[:, None]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = score_weights(model, "synflow", ["0", "2"])
    torch.testing.assert_close(scores["0"], expected_1)
    torch.testing.assert_close(scores["2"], expected_2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # signs and dtype restored
    assert model[0].weight.dtype == torch.float64


def test_grasp_scores_are_weight_times_hessian_gradient():
    model, (x, y) = toy_network(), toy_data()
    shapes = [model[0].weight.shape, model[2].weight.shape]
    flat = torch.cat([model[0].weight.detach().flatten(), model[2].weight.detach().flatten()])

    def loss_of(theta):
        w1 = theta[:12].reshape(shapes[0])
        w2 = theta[12:].reshape(shapes[1])
        return nn.functional.cross_entropy((x @ w1.T).clamp_min(0) @ w2.T, y)

    gradient = torch.autograd.functional.jacobian(loss_of, flat)
    _, hessian_gradient = torch.autograd.functional.hvp(loss_of, flat, gradient)
    # The mask keeps the highest w·Hg, i.e. the lowest GraSP score S = −w·Hg.
    expected = flat * hessian_gradient
    scores = score_weights(model, "grasp", ["0", "2"], loss=cross_entropy_loss(x, y))
    torch.testing.assert_close(torch.cat([scores["0"].flatten(), scores["2"].flatten()]), expected)


def test_magnitude_global_keeps_the_largest_weights_overall():
    model = toy_network()
    masks = prune_at_init(model, "magnitude", 0.75, scope="global")
    weights = torch.cat([model[0].weight.detach().flatten(), model[2].weight.detach().flatten()]).abs()
    keep = weights >= weights.sort(descending=True).values[4]  # 20 weights, 25% kept = 5
    assert torch.equal(torch.cat([masks["0"].flatten(), masks["2"].flatten()]), keep)


@pytest.mark.parametrize("method", ["random", "magnitude", "synflow"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_masks_meet_the_budget(method, scope):
    model = nn.Sequential(nn.Linear(20, 30, bias=False), nn.ReLU(), nn.Linear(30, 10, bias=False))
    masks = prune_at_init(model, method, 0.8, scope=scope, rounds=10)
    kept = sum(int(m.sum()) for m in masks.values())
    if scope == "global":
        assert kept == 180  # 20% of 900
    else:
        assert [int(m.sum()) for m in masks.values()] == [120, 60]


def test_synflow_rounds_never_revive_a_pruned_weight():
    model = nn.Sequential(nn.Linear(16, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
    masks_3 = prune_at_init(model, "synflow", 0.9, rounds=3)
    masks_1 = prune_at_init(model, "synflow", 1 - 0.1 ** (1 / 3), rounds=1)
    # After round 1 of 3 the kept set is that of a single round at density 0.1^(1/3); later rounds only
    # remove weights from it.
    for name in masks_3:
        assert not bool((masks_3[name] & ~masks_1[name]).any())


def test_keep_top_breaks_ties_by_index():
    masks = keep_top({"a": torch.zeros(4, dtype=torch.float64)}, 0.5, "layer")
    assert masks["a"].tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"method": "obd", "sparsity": 0.5}, "method: unknown scorer 'obd'"),
        ({"method": "random", "sparsity": 1.0}, "sparsity: must be in (0, 1), got 1.0"),
        ({"method": "random", "sparsity": 0.0}, "sparsity: must be in (0, 1), got 0.0"),
        ({"method": "random", "sparsity": 0.5, "targets": ["1"]}, "targets: ['1'] are not nn.Linear modules"),
        ({"method": "snip", "sparsity": 0.5}, "method snip: needs data"),
        ({"method": "random", "sparsity": 0.5, "scope": "row"}, "scope: must be 'global' or 'layer'"),
    ],
)
def test_bad_input_is_named(kwargs, words):
    with pytest.raises(GraphonError) as err:
        prune_at_init(toy_network(), **kwargs)
    assert words in str(err.value)


def test_a_model_without_linear_layers_is_refused():
    with pytest.raises(GraphonError, match="the model has no nn.Linear layer to prune"):
        prune_at_init(nn.Sequential(nn.ReLU()), "random", 0.5)


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_transformer_projections_are_scored_and_the_model_left_alone(method):
    from tiny_models import build_tiny_model, build_tokenizer

    from hf_prune.adapters import get_adapter
    from hf_prune.analysis.pai_scorers import prune_projections_at_init

    model = build_tiny_model("llama", build_tokenizer())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    input_ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    masks = prune_projections_at_init(model, method, 0.7, input_ids, rounds=5)
    projections = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    assert sorted(masks) == sorted(projections) == sorted(get_adapter(model.config).adapter_targets(model)[0])
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * total)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"  # GraSP's switch to eager is undone


def test_iterative_synflow_by_hand_on_the_toy_network():
    """Two rounds at final density 0.25: round 1 keeps the top 50% of single-round scores; round 2 scores
    again with the pruned weights at 0 and keeps the top 25% of all weights among the live ones."""
    model = toy_network(3)
    a1, a2 = model[0].weight.detach().abs(), model[2].weight.detach().abs()

    def scores(m1, m2):
        w1, w2 = a1 * m1, a2 * m2
        return w1 * (w2.sum(dim=0)[:, None]), w2 * w1.sum(dim=1)[None, :]

    def top(s1, s2, count):
        flat = torch.cat([s1.flatten(), s2.flatten()])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.sort(descending=True, stable=True).indices[:count]] = True
        return keep[:12].reshape(4, 3), keep[12:].reshape(2, 4)

    m1, m2 = top(*scores(torch.ones(4, 3), torch.ones(2, 4)), 10)
    s1, s2 = scores(m1.double(), m2.double())
    m1, m2 = top(torch.where(m1, s1, -1.0), torch.where(m2, s2, -1.0), 5)
    masks = prune_at_init(model, "synflow", 0.75, rounds=2)
    assert torch.equal(masks["0"], m1) and torch.equal(masks["2"], m2)
