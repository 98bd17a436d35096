"""The maths of the training-time sparsity methods, against references written here: the cubic schedule
and GraNet's cosine by their formulas (and torch's own CosineAnnealingLR), masks by brute force in plain
Python on constructed weights, ERK densities by hand, and the bad configs each named by its key."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hf_prune.integrations.pruning_callback import PruningCallback, training_method_from
from hf_prune.integrations.training_callback import refuse_sharded_training

from hf_prune.errors import HfPruneError, RecipeError
from hf_prune.methods.sparsity.granet import GraNetConfig
from hf_prune.methods.sparsity.masks import (
    NeuronGroup,
    n_m_masks,
    neuron_masks,
    prune_and_regrow,
    prune_and_regrow_neurons,
    unstructured_masks,
)
from hf_prune.methods.sparsity.schedules import (
    cubic_sparsity,
    erk_densities,
    is_pruning_step,
    last_pruning_step,
)


def zhu_gupta(t, s_i, s_f, t0, t_f):
    """The schedule as the paper writes it, for t0 <= t <= t_f."""
    return s_f + (s_i - s_f) * (1 - (t - t0) / (t_f - t0)) ** 3


def test_cubic_schedule_is_the_papers_formula():
    for t in range(5, 26):
        assert cubic_sparsity(t, initial=0.1, final=0.9, start_step=5, end_step=25) == pytest.approx(
            zhu_gupta(t, 0.1, 0.9, 5, 25)
        )
    assert cubic_sparsity(0, initial=0.1, final=0.9, start_step=5, end_step=25) == 0.1
    assert cubic_sparsity(99, initial=0.1, final=0.9, start_step=5, end_step=25) == 0.9
    # The steps where it prunes: every 4th from 5, and 25 itself; the held sparsity is the last one's.
    held = [last_pruning_step(t, start_step=5, end_step=25, frequency=4) for t in (4, 5, 8, 9, 24, 25, 30)]
    assert held == [None, 5, 5, 9, 21, 25, 25]
    steps = [t for t in range(40) if is_pruning_step(t, start_step=5, end_step=25, frequency=4)]
    assert steps == [5, 9, 13, 17, 21, 25]
    steps = [t for t in range(40) if is_pruning_step(t, start_step=0, end_step=10, frequency=4)]
    assert steps == [0, 4, 8, 10]  # end_step itself too


def test_cosine_regrowth_fraction_matches_torch_cosine_annealing():
    total = 37
    method = GraNetConfig(final_sparsity=0.5)
    method.total_steps = total
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=0.005)
    for step in range(total + 1):
        assert method.regrowth_fraction(step) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()
        schedule.step()


def test_unstructured_layer_and_global_by_brute_force():
    a = torch.tensor([[0.5, -0.1, 0.3], [0.05, -0.9, 0.2]])
    b = torch.tensor([[0.01, 0.7], [-0.4, 0.02]])
    layer = unstructured_masks({"a": a, "b": b}, None, 0.5, "layer")
    # a: the 3 smallest |w| of 6 are 0.05, 0.1, 0.2; b: the 2 smallest of 4 are 0.01, 0.02.
    assert layer["a"].tolist() == [[True, False, True], [False, True, False]]
    assert layer["b"].tolist() == [[False, True], [True, False]]
    every = sorted(
        [(abs(v), n, i) for n, t in (("a", a), ("b", b)) for i, v in enumerate(t.flatten().tolist())]
    )
    pruned = {(n, i) for _, n, i in every[:5]}  # round(0.5 * 10) smallest over both
    glob = unstructured_masks({"a": a, "b": b}, None, 0.5, "global")
    for name, t in (("a", a), ("b", b)):
        expect = [(name, i) not in pruned for i in range(t.numel())]
        assert glob[name].flatten().tolist() == expect


def test_pruned_weights_stay_pruned_even_when_they_grew():
    weight = torch.tensor([5.0, 0.1, 0.2, 0.3])
    mask = torch.tensor([False, True, True, True])  # the largest one was pruned earlier
    new = unstructured_masks({"w": weight}, {"w": mask}, 0.5, "layer")["w"]
    assert new.tolist() == [False, False, True, True]


def test_n_m_masks_by_brute_force():
    torch.manual_seed(0)
    weight = torch.randn(3, 8)
    full = n_m_masks({"w": weight}, None, 2, 4, 1.0)["w"]
    for row in range(3):
        for g in range(2):
            group = weight[row, 4 * g : 4 * g + 4].abs().tolist()
            top = sorted(range(4), key=lambda i: -group[i])[:2]
            assert [i in top for i in range(4)] == full[row, 4 * g : 4 * g + 4].tolist()
    # Half of the 6 groups: those whose two smallest |w| sum least.
    half = n_m_masks({"w": weight}, None, 2, 4, 0.5)["w"].view(-1, 4)
    costs = sorted(range(6), key=lambda g: sum(sorted(weight.view(-1, 4)[g].abs().tolist())[:2]))
    assert [int((~half[g]).sum()) for g in range(6)] == [2 if g in costs[:3] else 0 for g in range(6)]
    # The groups done stay done when the schedule moves on to all of them.
    later = n_m_masks({"w": weight}, {"w": half.view(3, 8)}, 2, 4, 1.0)["w"].view(-1, 4)
    for g in costs[:3]:
        assert torch.equal(later[g], half[g])
    assert all(int(later[g].sum()) == 2 for g in range(6))


def test_neuron_masks_by_l1_norm_by_hand():
    up = torch.tensor([[1.0, 1.0], [0.1, 0.1], [2.0, 0.0], [0.0, 0.05]])  # 4 neurons, hidden 2
    down = torch.tensor([[0.5, 0.0, 1.0, 0.0], [0.5, 0.2, 0.0, 0.1]])
    params = {"up": up, "down": down}
    group = NeuronGroup(["up"], [None], "down")
    # L1 per neuron: 2+1=3, 0.2+0.2=0.4, 2+1=3, 0.05+0.1=0.15 -> the two smallest are neurons 3 and 1.
    masks = neuron_masks([group], params, None, 0.5, "layer")
    assert masks["up"].tolist() == [[True, True], [False, False], [True, True], [False, False]]
    assert masks["down"].tolist() == [[True, False, True, False]] * 2
    silencing = neuron_masks([group], params, None, 0.5, "layer", whole=False)
    assert set(silencing) == {"up"}  # the output column stays, so a dead neuron keeps a gradient


def test_regrowth_drops_smallest_and_regrows_largest_gradients_by_hand():
    weight = torch.tensor([0.9, 0.1, 0.5, 0.0, 0.3, 0.0, 0.7, 0.0])
    mask = torch.tensor([True, True, True, False, True, False, True, False])  # 5 active
    grad = torch.tensor([0.0, 0.2, 0.0, 0.6, 0.0, 0.1, 0.0, 0.8])
    new, count = prune_and_regrow(weight, grad, mask, 0.4)  # round(0.4 * 5) = 2
    assert count == 2
    # Dropped: the 2 smallest active |w| (0.1 at 1, 0.3 at 4). Candidates: 1, 3, 4, 5, 7; largest |g|: 7, 3.
    assert new.tolist() == [True, False, True, True, False, False, True, True]
    assert int(new.sum()) == int(mask.sum())


def test_regrowth_skips_a_weight_whose_gradient_is_not_finite():
    method = GraNetConfig(final_sparsity=0.5, scope="layer")
    weight = torch.nn.Parameter(torch.tensor([[0.9, 0.1, 0.5, 0.3]]))
    weight.grad = torch.tensor([[float("inf"), 0.0, 0.0, 1.0]])
    method._params = {"w": weight}
    method.masks = {"w": torch.tensor([[True, True, False, True]])}
    assert method.regrow(0.5) == 0
    assert method.masks["w"].tolist() == [[True, True, False, True]] and method.skipped_regrowth == 1


def test_erk_densities_by_hand():
    shapes = [(10, 20), (40, 40), (5, 3, 3, 3)]
    raw = [(10 + 20) / 200, (40 + 40) / 1600, (5 + 3 + 3 + 3) / 135]
    sizes = [200, 1600, 135]
    # No layer goes dense at 20%: densities are eps * raw with sum = 0.2 * total.
    eps = 0.2 * sum(sizes) / sum(r * s for r, s in zip(raw, sizes, strict=True))
    assert max(eps * r for r in raw) < 1
    assert erk_densities(shapes, 0.2) == pytest.approx([eps * r for r in raw])
    # At 60% the first layer would get 1.40: it goes dense; the rescaled conv then gets 1.06: dense too;
    # the large layer takes the rest of the budget.
    dense = erk_densities(shapes, 0.6)
    first_try = 0.6 * sum(sizes) / sum(r * s for r, s in zip(raw, sizes, strict=True))
    assert first_try * raw[0] > 1 and first_try * raw[2] < 1
    second_try = (0.6 * sum(sizes) - 200) / (raw[1] * 1600 + raw[2] * 135)
    assert second_try * raw[2] > 1
    assert dense == pytest.approx([1.0, (0.6 * sum(sizes) - 135 - 200) / 1600, 1.0])
    assert sum(d * s for d, s in zip(dense, sizes, strict=True)) == pytest.approx(0.6 * sum(sizes))


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"method": "gmp", "final_sparsity": 1.0}, "final_sparsity"),
        ({"method": "gmp", "final_sparsity": 0.5, "start_step": 10, "end_step": 5}, "end_step"),
        ({"method": "gmp", "pattern": "4:2", "scope": "layer"}, "pattern"),
        ({"method": "gmp", "pattern": "2:4", "scope": "layer", "final_sparsity": 0.8}, "final_sparsity"),
        ({"method": "gmp", "pattern": "2:4"}, "scope"),
        ({"method": "gmp"}, "final_sparsity"),
        ({"method": "gmp", "final_sparsity": 0.5, "pattern": "blocks"}, "pattern"),
        ({"method": "gmp", "final_sparsity": 0.5, "initial_sparsity": 0.7}, "initial_sparsity"),
        ({"method": "gmp", "final_sparsity": 0.5, "frequency": 0}, "frequency"),
        ({"method": "gmp", "final_sparsity": 0.5, "sparsity": 0.5}, "sparsity"),
        ({"method": "granet", "final_sparsity": 0.5, "init": "erk"}, "init"),
        ({"method": "granet", "final_sparsity": 0.5, "initial_regrowth": 1.5}, "initial_regrowth"),
        ({"method": "lottery", "fraction_per_round": 0.0}, "fraction_per_round"),
        ({"method": "lottery", "rewind": "both"}, "rewind"),
    ],
)
def test_bad_configs_name_the_key(config, key):
    with pytest.raises(RecipeError, match=rf"config\.{key}:"):
        training_method_from(config)


def test_callback_refuses_one_shot_and_lottery_and_unknown_methods():
    with pytest.raises(RecipeError, match="replaceme.* not a training-time method.*gmp, granet, lottery"):
        PruningCallback({"method": "replaceme"})
    with pytest.raises(RecipeError, match="run_lottery"):
        PruningCallback({"method": "lottery"})
    with pytest.raises(RecipeError, match="unknown method 'gmpp'"):
        PruningCallback({"method": "gmpp", "final_sparsity": 0.5})


def test_callback_reads_a_stage_file_and_a_recipe(tmp_path):
    stage = tmp_path / "stage.yaml"
    stage.write_text("method: granet\nfinal_sparsity: 0.9\nend_step: 40\nscope: layer\n")
    callback = PruningCallback(stage)
    assert (
        callback.name == "granet"
        and callback.method.final_sparsity == 0.9
        and callback.method.scope == "layer"
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: m\noutput: o\nstages:\n  - method: gmp\n    final_sparsity: 0.3\n")
    assert PruningCallback(recipe).method.final_sparsity == 0.3
    recipe.write_text("stages:\n  - method: replaceme\n")
    with pytest.raises(RecipeError, match="exactly one training-time method, found 0"):
        PruningCallback(recipe)


def test_sharded_training_is_refused_before_it_starts():
    with pytest.raises(HfPruneError, match="DeepSpeed"):
        refuse_sharded_training(SimpleNamespace(deepspeed="ds.json", fsdp=[]))
    with pytest.raises(HfPruneError, match="FSDP"):
        refuse_sharded_training(SimpleNamespace(deepspeed=None, fsdp=["full_shard"]))
    refuse_sharded_training(SimpleNamespace(deepspeed=None, fsdp=[]))  # plain / DDP runs pass


def test_lottery_sparsity_after_rounds():
    _, method = training_method_from({"method": "lottery"})
    assert method.sparsity_after(14) == pytest.approx(1 - 0.8**14)
    assert math.ceil(math.log(0.05) / math.log(0.8)) == 14  # 95% takes 14 rounds at 20%, as METHODS.md says


@pytest.mark.parametrize(
    ("family", "first_input", "output"),
    [
        ("llama", "model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
        (
            "bert",
            "bert.encoder.layer.{i}.intermediate.dense.weight",
            "bert.encoder.layer.{i}.output.dense.weight",
        ),
        (
            "distilbert",
            "distilbert.transformer.layer.{i}.ffn.lin1.weight",
            "distilbert.transformer.layer.{i}.ffn.lin2.weight",
        ),
    ],
)
def test_neuron_groups_are_each_layers_mlp(family, first_input, output):
    import transformers

    from hf_prune.methods.sparsity.targets import neuron_groups

    layers = 2
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
        model = transformers.LlamaForCausalLM(config)
    elif family == "bert":
        config = transformers.BertConfig(
            vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2
        )
        model = transformers.BertForSequenceClassification(config)
    else:
        config = transformers.DistilBertConfig(vocab_size=64, dim=16, hidden_dim=24, n_layers=2, n_heads=2)
        model = transformers.DistilBertForSequenceClassification(config)
    groups = neuron_groups(model, ["*"], [])
    assert [g.input_weights[0] for g in groups] == [first_input.format(i=i) for i in range(layers)]
    assert [g.output_weight for g in groups] == [output.format(i=i) for i in range(layers)]
    params = dict(model.named_parameters())
    for g in groups:  # rows of every input and the output's columns are the same 24 neurons
        widths = {params[n].shape[0] for n in g.input_weights} | {params[g.output_weight].shape[1]}
        assert widths == {24}


def test_granet_erk_start_is_sparse_with_erk_densities_by_hand():
    model = torch.nn.Sequential(torch.nn.Linear(40, 10), torch.nn.Linear(10, 30), torch.nn.Linear(30, 30))
    method = GraNetConfig(
        final_sparsity=0.8, initial_sparsity=0.6, init="erk", targets=["*"], exclude=[], end_step=4
    )
    method.begin(model, step=0, total_steps=8)
    shapes = [(10, 40), (30, 10), (30, 30)]
    raw = [(o + i) / (o * i) for o, i in shapes]  # Erdős–Rényi: (n_out + n_in) / (n_out · n_in)
    sizes = [o * i for o, i in shapes]
    eps = 0.4 * sum(sizes) / sum(r * s for r, s in zip(raw, sizes, strict=True))
    assert all(eps * r < 1 for r in raw)  # no layer goes dense at 40% density here
    for (name, weight), r, n in zip(method._params.items(), raw, sizes, strict=True):
        assert int((weight != 0).sum()) == round(eps * r * n), name  # the masks are applied at step 0
        assert int(method.masks[name].sum()) == round(eps * r * n), name
    assert method.history == [{"step": 0, "sparsity": 0.6, "init": "erk"}]


def test_structured_regrowth_by_hand():
    """Four neurons, three alive: drop round(0.34 * 3) = 1 alive neuron with the smallest L1 (rows and
    column), then revive the dead one (the dropped one included) whose silencing row has the largest
    gradient norm. Only the silencing row (and its bias) is masked while training."""
    gate = torch.nn.Parameter(torch.tensor([[1.0, 1.0], [0.2, 0.1], [0.0, 0.0], [2.0, 0.5]]))
    up = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.1, 0.1], [3.0, 3.0], [1.0, 1.0]]))
    down = torch.nn.Parameter(torch.tensor([[1.0, 0.1, 2.0, 1.0], [0.0, 0.1, 2.0, 1.0]]))
    bias = torch.nn.Parameter(torch.zeros(4))
    gate.grad = torch.tensor([[0.0, 0.0], [0.1, 0.0], [3.0, 4.0], [0.0, 0.1]])  # row norms 0, 0.1, 5, 0.1
    params = {"gate": gate, "up": up, "down": down, "bias": bias}
    group = NeuronGroup(["gate", "up"], ["bias", None], "down")
    masks = {
        "gate": torch.tensor([[True] * 2, [True] * 2, [False] * 2, [True] * 2]),
        "bias": torch.tensor([True, True, False, True]),
    }
    new, count = prune_and_regrow_neurons(group, params, masks, 0.34)
    # L1 of the alive ones: n0 = 2 + 1 + 1 = 4, n1 = 0.3 + 0.2 + 0.2 = 0.7, n3 = 2.5 + 2 + 2 = 6.5 -> drop n1;
    # dead now: n1 (grad norm 0.1) and n2 (5) -> revive n2.
    assert count == 1
    assert set(new) == {"gate", "bias"}
    assert new["gate"].all(dim=1).tolist() == [True, False, True, True]
    assert new["bias"].tolist() == [True, False, True, True]


def test_neuron_masks_global_over_two_mlps_by_hand():
    # MLP a: L1 per neuron 3, 0.4, 5; MLP b: 0.2, 6, 0.5 (rows + column, computed below by hand).
    params = {
        "a.up": torch.tensor([[1.0, 1.0], [0.1, 0.1], [2.0, 2.0]]),
        "a.down": torch.tensor([[1.0, 0.2, 1.0]]),
        "b.up": torch.tensor([[0.1, 0.0], [3.0, 2.0], [0.2, 0.2]]),
        "b.down": torch.tensor([[0.1, 1.0, 0.1]]),
    }
    groups = [NeuronGroup(["a.up"], [None], "a.down"), NeuronGroup(["b.up"], [None], "b.down")]
    masks = neuron_masks(groups, params, None, 0.5, "global")  # round(0.5 * 6) = 3 smallest of all six
    assert masks["a.up"].all(dim=1).tolist() == [True, False, True]  # 0.4 pruned
    assert masks["b.up"].all(dim=1).tolist() == [False, True, False]  # 0.2 and 0.5 pruned
    assert masks["b.down"].tolist() == [[False, True, False]]
    # Sparser next time (the schedule only rises): the dead stay dead, even where their weights are large
    # again, and the next weakest goes: a0 (L1 3).
    params["b.up"] = params["b.up"] * 100
    again = neuron_masks(groups, params, masks, 0.67, "global")  # round(0.67 * 6) = 4
    assert again["a.up"].all(dim=1).tolist() == [False, False, True]
    assert again["b.up"].all(dim=1).tolist() == [False, True, False]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_apply_masks_zeros_weights_and_their_optimizer_state(optimizer_name):
    from hf_prune.methods.sparsity.masks import apply_masks

    weight = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, -4.0]]))
    other = torch.nn.Parameter(torch.tensor([5.0, 6.0]))  # unmasked: untouched
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD([weight, other], lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW([weight, other], lr=0.1)
    (weight.sum() * 3 + other.sum()).backward()
    optimizer.step()
    before_other = {k: v.clone() for k, v in optimizer.state[other].items() if torch.is_tensor(v)}
    wrapped = type("AcceleratedOptimizer", (), {"optimizer": optimizer})()  # accelerate's wrapper shape
    mask = torch.tensor([[True, False], [False, True]])
    apply_masks({"w": weight, "o": other}, {"w": mask}, wrapped)
    assert weight[~mask].eq(0).all() and weight[mask].ne(0).all()
    state = [v for v in optimizer.state[weight].values() if torch.is_tensor(v) and v.shape == weight.shape]
    assert len(state) == (1 if optimizer_name == "sgd" else 2)  # momentum / exp_avg and exp_avg_sq
    for value in state:
        assert value[~mask].eq(0).all() and value[mask].ne(0).all()
    for key, value in before_other.items():
        assert torch.equal(optimizer.state[other][key], value)
