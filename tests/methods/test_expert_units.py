"""Small pieces of expert pruning against answers worked out by hand: the per-layer-count config and model
classes (``model_patches/nonuniform_moe.py``), validation messages of ``removal``, and the helpers of
``scoring`` (β schedule, rounding, token caching, selection errors)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import transformers
from hf_prune.model_patches import nonuniform_moe
from tiny_models import build_tiny_model, build_tokenizer, tiny_config, write_calibration_file

from hf_prune.adapters import get_adapter
from hf_prune.calibration import CalibrationBatch
from hf_prune.context import PruneContext
from hf_prune.errors import CalibrationError, ConfigFieldError, UnsupportedModelError
from hf_prune.methods.experts import diep, removal, scoring
from hf_prune.methods.experts.expert_pruning import ExpertPruningConfig
from hf_prune.recipe import CalibrationConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _fields(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}


# ---- nonuniform_moe ----------------------------------------------------------------------------------


def test_moe_layer_flags_by_hand():
    mixtral = transformers.MixtralConfig(num_hidden_layers=3)
    assert nonuniform_moe.moe_layer_flags(mixtral) == [True, True, True]
    qwen = transformers.Qwen2MoeConfig(
        num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3], num_experts=4
    )
    # sparse where (i + 1) % 2 == 0 and not listed as dense: 1, 5 (3 is dense)
    assert nonuniform_moe.moe_layer_flags(qwen) == [False, True, False, False, False, True]
    qwen = transformers.Qwen2MoeConfig(
        num_hidden_layers=3, decoder_sparse_step=1, mlp_only_layers=None, num_experts=4
    )
    assert nonuniform_moe.moe_layer_flags(qwen) == [True, True, True]
    qwen = transformers.Qwen2MoeConfig(
        num_hidden_layers=2, decoder_sparse_step=1, mlp_only_layers=[], num_experts=0
    )
    assert nonuniform_moe.moe_layer_flags(qwen) == [False, False]


def test_config_checks_experts_per_layer(tokenizer):
    base = _fields(build_tiny_model("mixtral", tokenizer).config)  # 4 layers, 4 experts, top-2
    cls = nonuniform_moe.HfPruneMixtralConfig
    assert cls(**base, experts_per_layer=[2, 3, 4, 2]).experts_per_layer == [2, 3, 4, 2]
    assert cls(**base).experts_per_layer is None
    with pytest.raises(ValueError, match=r"^experts_per_layer has 3 entries for 4 layers$"):
        cls(**base, experts_per_layer=[2, 3, 4])
    for bad in (1, 5):
        with pytest.raises(
            ValueError,
            match=rf"^experts_per_layer\[2\] = {bad}: must be an int in \[2, 4\] \(top-k to num_local_experts\)$",
        ):
            cls(**base, experts_per_layer=[2, 2, bad, 2])
    qwen = _fields(build_tiny_model("qwen2_moe", tokenizer).config)  # layers 0, 2 dense
    qcls = nonuniform_moe.HfPruneQwen2MoeConfig
    assert qcls(**qwen, experts_per_layer=[0, 2, 0, 4]).experts_per_layer == [0, 2, 0, 4]
    with pytest.raises(ValueError, match=r"^experts_per_layer\[2\] = 3: must be 0 \(a dense layer\)$"):
        qcls(**qwen, experts_per_layer=[0, 2, 3, 4])
    with pytest.raises(
        ValueError, match=r"experts_per_layer\[1\] = 0: must be an int in \[2, 4\] \(top-k to num_experts\)"
    ):
        qcls(**qwen, experts_per_layer=[0, 0, 0, 4])
    config = qcls(**qwen, experts_per_layer=[0, 2, 0, 4])
    config.experts_per_layer = [0, 2.0, 0, 4]  # assignment is not re-checked: check explicitly
    with pytest.raises(ValueError, match=r"^experts_per_layer\[1\] = 2\.0: must be an int"):
        config.check_experts_per_layer()
    config.experts_per_layer = [0, True, 0, 4]
    with pytest.raises(ValueError, match=r"experts_per_layer\[1\] = True"):
        config.check_experts_per_layer()


def test_model_class_shrinks_each_layer(tokenizer):
    stock = build_tiny_model("mixtral", tokenizer)
    config = nonuniform_moe.HfPruneMixtralConfig(**_fields(stock.config), experts_per_layer=[2, 3, 4, 2])
    model = nonuniform_moe.HfPruneMixtralForCausalLM(config)
    hidden = stock.config.hidden_size
    for n, layer in zip([2, 3, 4, 2], model.model.layers, strict=True):
        assert layer.mlp.experts.num_experts == layer.mlp.gate.num_experts == n
        assert layer.mlp.gate.weight.shape == (n, hidden)
        assert layer.mlp.experts.gate_up_proj.shape[0] == layer.mlp.experts.down_proj.shape[0] == n
    assert model.num_experts == 4
    with pytest.raises(ValueError, match=r"^HfPruneMixtralForCausalLM needs config.experts_per_layer$"):
        nonuniform_moe.HfPruneMixtralForCausalLM(nonuniform_moe.HfPruneMixtralConfig(**_fields(stock.config)))
    qwen = build_tiny_model("qwen2_moe", tokenizer)
    config = nonuniform_moe.HfPruneQwen2MoeConfig(**_fields(qwen.config), experts_per_layer=[0, 2, 0, 3])
    model = nonuniform_moe.HfPruneQwen2MoeForCausalLM(config)
    assert model.num_experts == 3
    assert [getattr(layer.mlp, "experts", None) is not None for layer in model.model.layers] == [
        False,
        True,
        False,
        True,
    ]
    config.experts_per_layer = [2, 2, 0, 3]  # disagrees with the MoE layers (1 and 3)
    with pytest.raises(
        ValueError, match=r"experts_per_layer \[2, 2, 0, 3\] does not match the MoE layers \[1, 3\]"
    ):
        nonuniform_moe.HfPruneQwen2MoeForCausalLM(config)


def test_select_experts_keeps_the_given_order_and_buffers():
    experts = torch.nn.Module()
    experts.num_experts = 3
    experts.w = torch.nn.Parameter(torch.arange(6.0).reshape(3, 2))
    experts.frozen = torch.nn.Parameter(torch.arange(3.0), requires_grad=False)
    experts.register_buffer("counts", torch.tensor([10, 11, 12]))
    experts.register_buffer("scratch", torch.tensor([5.0, 6.0, 7.0]), persistent=False)
    experts.register_buffer("scalar", torch.tensor(3.0))
    experts.other = torch.nn.Parameter(torch.zeros(2, 3))  # first dimension is not the expert count
    router = torch.nn.Module()
    router.num_experts = 3
    router.weight = torch.nn.Parameter(torch.tensor([[1.0], [2.0], [3.0]]))
    nonuniform_moe.select_experts(experts, router, [2, 0])
    assert experts.num_experts == router.num_experts == 2
    assert torch.equal(experts.w, torch.tensor([[4.0, 5.0], [0.0, 1.0]])) and experts.w.requires_grad
    assert torch.equal(experts.frozen, torch.tensor([2.0, 0.0])) and not experts.frozen.requires_grad
    assert isinstance(experts.frozen, torch.nn.Parameter)
    assert torch.equal(experts.counts, torch.tensor([12, 10])) and "counts" in experts.state_dict()
    assert torch.equal(experts.scratch, torch.tensor([7.0, 5.0])) and "scratch" not in experts.state_dict()
    assert float(experts.scalar) == 3.0 and experts.other.shape == (2, 3)
    assert torch.equal(router.weight, torch.tensor([[3.0], [1.0]]))
    assert isinstance(router.weight, torch.nn.Parameter)


def test_family_lookups():
    assert nonuniform_moe.stock_family("hf_prune_qwen3_moe") == "qwen3_moe"
    assert nonuniform_moe.stock_family("olmoe") == "olmoe"
    assert nonuniform_moe.stock_family("hf_prune_llama") is None
    assert nonuniform_moe.stock_family("llama") is None
    assert nonuniform_moe.stock_classes("hf_prune_mixtral") == (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
    )
    assert nonuniform_moe.stock_classes("qwen2_moe") == (
        transformers.Qwen2MoeConfig,
        transformers.Qwen2MoeForCausalLM,
    )
    assert nonuniform_moe.nonuniform_classes("hf_prune_olmoe") == (
        nonuniform_moe.HfPruneOlmoeConfig,
        nonuniform_moe.HfPruneOlmoeForCausalLM,
    )
    supported = r"\(supported: mixtral, olmoe, qwen2_moe, qwen3_moe\)$"
    with pytest.raises(ValueError, match=rf"^no stock MoE classes for model_type 'llama' {supported}"):
        nonuniform_moe.stock_classes("llama")
    with pytest.raises(
        ValueError, match=rf"^no per-layer expert classes for model_type 'hf_prune_x' {supported}"
    ):
        nonuniform_moe.nonuniform_classes("hf_prune_x")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for family, (config_class, model_class) in nonuniform_moe.CLASSES.items():
        assert config_class.model_type == f"hf_prune_{family}" == f"{nonuniform_moe.PREFIX}{family}"
        assert CONFIG_MAPPING[config_class.model_type] is config_class
        config = config_class(num_hidden_layers=1, experts_per_layer=None)
        assert type(transformers.AutoModelForCausalLM._model_mapping[type(config)]) is type(model_class) or (
            transformers.AutoModelForCausalLM._model_mapping[type(config)] is model_class
        )
        stock_config, stock_model = nonuniform_moe.stock_classes(family)
        assert issubclass(config_class, stock_config) and issubclass(model_class, stock_model)
        assert model_class.stock_class is stock_model and config_class.stock_config_class is stock_config
        key = nonuniform_moe.FAMILIES[family][2]
        assert config_class.expert_count_key == key and hasattr(stock_config(), key)


# ---- removal -----------------------------------------------------------------------------------------


def test_removal_validation_messages(tokenizer):
    model = build_tiny_model("mixtral", tokenizer)
    adapter = get_adapter(model.config)
    good = {i: [0, 1] for i in range(4)}
    cases = [
        ([[0, 1]] * 4, r"^keep_experts: expected a mapping of MoE layer index to expert indices, got list$"),
        ({**good, 3: "01"}, r"^keep_experts: layer 3: expected a list of expert indices, got '01'$"),
        ({**good, 3: 5}, r"^keep_experts: layer 3: expected a list of expert indices, got 5$"),
        ({**good, 3: [0, True]}, r"^keep_experts: layer 3 expert index True is not an integer$"),
        ({**good, 3: [0, 1.0]}, r"^keep_experts: layer 3 expert index 1.0 is not an integer$"),
        (
            {**good, 9: [0, 1]},
            r"^keep_experts: layer 9 does not exist \(decoder layers 0\.\.3; MoE layers \[0, 1, 2, 3\]\)$",
        ),
        ({**good, -1: [0, 1]}, r"^keep_experts: layer -1 does not exist"),
        (
            {**good, 3: [0, 4]},
            r"^keep_experts: layer 3: expert index 4 does not exist \(valid range 0\.\.3, the layer has 4 experts\)$",
        ),
        (
            {**good, 3: [1]},
            r"^keep_experts: layer 3: keeps 1 experts, fewer than the 2 each token is routed to "
            r"\(num_experts_per_tok\)$",
        ),
        (
            {0: [0, 1], 2: [0, 1]},
            r"^keep_experts: MoE layers \[1, 3\] are missing: give the experts to keep for every MoE layer "
            r"\[0, 1, 2, 3\]$",
        ),
        ({**good, "3": [0, 1]}, r"^keep_experts: layer 3 is given more than once$"),
        (
            {True: [0, 1], 0: [0, 1], 2: [0, 1], 3: [0, 1]},
            r"^keep_experts: layer index True is not an integer$",
        ),
        ({**good, "x": [0, 1]}, r"^keep_experts: layer index 'x' is not an integer$"),
    ]
    for keep, message in cases:
        with pytest.raises(ConfigFieldError, match=message):
            removal.validate_keep(model, adapter, keep)
    # Keys as YAML gives them, indices in any order: normalised to int layers, sorted indices.
    assert removal.validate_keep(model, adapter, {" 3": [1, 0], "0": ["2", 1], 1: [3, 0], 2: [0, 1]}) == {
        0: [1, 2],
        1: [0, 3],
        2: [0, 1],
        3: [0, 1],
    }
    assert removal.validate_keep(model, adapter, {"-0": [0, 1], 1: [0, 1], 2: [0, 1], 3: [0, 1]})[0] == [0, 1]
    llama = build_tiny_model("llama", tokenizer)
    with pytest.raises(
        UnsupportedModelError, match=r"^llama: not a mixture-of-experts model, no experts to remove$"
    ):
        removal.validate_keep(llama, get_adapter(llama.config), good)


def test_removal_report_by_hand(tokenizer):
    model = build_tiny_model("olmoe", tokenizer)
    params = sum(p.numel() for p in model.parameters())
    per_expert = (
        sum(
            p[0].numel()
            for p in (
                model.model.layers[0].mlp.experts.gate_up_proj,
                model.model.layers[0].mlp.experts.down_proj,
            )
        )
        + model.model.layers[0].mlp.gate.weight.shape[1]
    )
    report = removal.remove_experts(
        model, get_adapter(model.config), {0: [3, 1], 1: [0, 1, 2], 2: [0, 1, 2, 3], 3: [2, 0]}
    )
    assert report["uniform"] is False and report["model_type"] == "hf_prune_olmoe"
    assert report["experts_per_layer_before"] == [4, 4, 4, 4] and report["experts_per_layer"] == [2, 3, 4, 2]
    assert report["experts_before"] == 16 and report["experts_after"] == 11
    assert report["params_before"] == params and report["params_after"] == params - 5 * per_expert
    assert report["layers"][0] == {
        "layer": 0,
        "kept": [1, 3],
        "removed": [0, 2],
        "experts_before": 4,
        "experts_after": 2,
    }
    assert report["layers"][2]["removed"] == []
    assert removal.kept_expert_indices_report(report) == [
        "layer 0: kept experts [1, 3] of 4",
        "layer 1: kept experts [0, 1, 2] of 4",
        "layer 2: kept experts [0, 1, 2, 3] of 4",
        "layer 3: kept experts [0, 2] of 4",
    ]
    assert model.config.num_experts == model.num_experts == 4
    # Back to one count: the stock class, the count key rewritten, the head's copy too.
    report = removal.remove_experts(
        model, get_adapter(model.config), {0: [0, 1], 1: [0, 1], 2: [0, 1], 3: [0, 1]}
    )
    assert report["uniform"] is True and report["model_type"] == "olmoe"
    assert type(model) is transformers.OlmoeForCausalLM and model.config.num_experts == model.num_experts == 2
    stock = build_tiny_model("mixtral", tokenizer)
    removal.remove_experts(stock, get_adapter(stock.config), {i: [1, 3, 2] for i in range(4)})
    assert type(stock) is transformers.MixtralForCausalLM
    assert stock.config.num_local_experts == stock.num_experts == 3


# ---- scoring helpers ---------------------------------------------------------------------------------


def test_beta_schedule_and_rounding():
    assert diep.beta_initial_values(4, "official") == [2.0, 2.0, 0.2, 0.2]
    assert diep.beta_initial_values(3, "official") == [2.0, 2.0, 0.2]  # positions 0, 1 < 1.5
    assert diep.beta_initial_values(1, "official") == [2.0]
    assert diep.beta_initial_values(2, 0.7) == [0.7, 0.7]
    assert diep.beta_initial_values(2, 3) == [3.0, 3.0] and isinstance(
        diep.beta_initial_values(1, 3)[0], float
    )
    assert [scoring.round_half_up(v) for v in (0.5, 1.5, 2.5, 2.49, 3.0)] == [1, 2, 3, 2, 3]


def test_moe_layers_refuses_a_dense_model(tokenizer):
    llama = build_tiny_model("llama", tokenizer)
    with pytest.raises(
        UnsupportedModelError,
        match=r"^expert pruning needs a Mixture-of-Experts model; llama has no MoE layers$",
    ):
        scoring.moe_layers(llama, get_adapter(llama.config))


def test_select_experts_errors_and_empty():
    assert scoring.select_experts({}, top_k=2, keep_experts=2, uniform=True) == {}
    with pytest.raises(ValueError, match=r"^give exactly one of keep_ratio or keep_experts$"):
        scoring.select_experts({0: torch.ones(4)}, top_k=2, uniform=True)
    with pytest.raises(ValueError, match=r"^layer 1 has 1 experts, fewer than the 2 every layer must keep$"):
        scoring.select_experts({0: torch.ones(4), 1: torch.ones(1)}, top_k=2, keep_experts=2, uniform=False)
    with pytest.raises(ValueError, match=r"^layer 0: keeping 5 of 4 experts; must keep between 2 and 4$"):
        scoring.select_experts({0: torch.ones(4)}, top_k=2, keep_experts=5, uniform=True)
    with pytest.raises(
        ValueError, match=r"^keeping 10 of 8 experts; must keep between 4 \(2 per layer\) and 8$"
    ):
        scoring.select_experts({0: torch.ones(4), 1: torch.ones(4)}, top_k=2, keep_experts=5, uniform=False)
    # keep_experts = budget per layer on average; the floor counts min_experts_per_layer when larger.
    scores = {0: torch.tensor([4.0, 3.0, 2.0, 1.0]), 1: torch.tensor([0.5, 0.4, 0.3, 0.2])}
    assert scoring.select_experts(scores, top_k=1, keep_experts=2, uniform=False) == {0: [0, 1, 2], 1: [0]}
    assert scoring.select_experts(
        scores, top_k=1, keep_experts=2, uniform=False, min_experts_per_layer=2
    ) == {
        0: [0, 1],
        1: [0, 1],
    }
    assert scoring.select_experts(scores, top_k=1, keep_experts=4, uniform=True) == {
        0: [0, 1, 2, 3],
        1: [0, 1, 2, 3],
    }
    # Scores in float64 are compared exactly (a float32 round would tie them).
    close = {0: torch.tensor([1.0, 1.0 + 1e-12], dtype=torch.float64)}
    assert scoring.select_experts(close, top_k=1, keep_experts=1, uniform=True) == {0: [1]}


def _context(model, tokenizer, tmp_path, batches):
    data = write_calibration_file(tmp_path / "unused.txt", num_chars=500)
    context = PruneContext(
        get_adapter(model.config), tokenizer, CalibrationConfig(data=str(data)), progress=False
    )
    context._batches = batches
    return context


def test_cache_moe_io_takes_every_stride_th_real_token(tokenizer, tmp_path):
    model = build_tiny_model("qwen2_moe", tokenizer).eval()
    g = torch.Generator().manual_seed(5)
    batches = []
    for length in (7, 4):
        ids = torch.randint(4, 300, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, length:] = 0
        batches.append(CalibrationBatch(ids, mask))
    # Reference: every MoE block's input/output on all real tokens, in batch order.
    xs, zs = {1: [], 3: []}, {1: [], 3: []}
    for batch in batches:
        keep = batch.attention_mask.reshape(-1).bool()
        hooks = []
        for i in (1, 3):

            def hook(_m, args, out, i=i, keep=keep):
                out = out[0] if isinstance(out, tuple) else out
                xs[i].append(args[0].reshape(-1, args[0].shape[-1])[keep])
                zs[i].append(out.reshape(-1, out.shape[-1])[keep])

            hooks.append(model.model.layers[i].mlp.register_forward_hook(hook))
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        for h in hooks:
            h.remove()
    total = 9 + 7 + 9 + 4
    context = _context(model, tokenizer, tmp_path, batches)
    for max_tokens, stride in ((100, 1), (10, 3), (29, 1), (28, 2), (1, 29)):
        inputs, outputs, cached = diep.cache_moe_io(model, context, max_tokens)
        assert cached.calibration_tokens == total and cached.total == len(range(0, total, stride))
        assert sorted(inputs) == sorted(outputs) == [1, 3]
        for i in (1, 3):
            torch.testing.assert_close(inputs[i], torch.cat(xs[i])[::stride], rtol=0, atol=1e-6)
            torch.testing.assert_close(outputs[i], torch.cat(zs[i])[::stride], rtol=0, atol=1e-6)
            assert inputs[i].dtype == torch.float32 and inputs[i].shape[0] == len(range(0, total, stride))
    context._batches = [
        CalibrationBatch(torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    ]
    with pytest.raises(CalibrationError, match=r"^DiEP: the calibration data gave no token to cache$"):
        diep.cache_moe_io(model, context, 10)


def test_router_statistics_refuses_a_token_count_mismatch(tokenizer, tmp_path):
    model = build_tiny_model("mixtral", tokenizer)
    ids = torch.randint(4, 300, (1, 6))
    context = _context(
        model, tokenizer, tmp_path, [CalibrationBatch(ids, torch.ones(1, 6, dtype=torch.long))]
    )
    router = model.model.layers[0].mlp.gate
    original = router.forward

    def forward(hidden_states):
        logits, weights, indices = original(hidden_states)
        return logits[:-1], weights[:-1], indices[:-1]

    router.forward = forward
    with pytest.raises(
        RuntimeError, match=r"^layer 0: the router saw 5 tokens, the calibration batch has 6 positions$"
    ):
        scoring.router_statistics(model, context)
    del router.forward
    stats = scoring.router_statistics(model, context)
    assert sorted(stats) == [0, 1, 2, 3]
    for entry in stats.values():
        assert entry["frequency"].dtype == torch.int64 and entry["router_weight"].dtype == torch.float64
        assert entry["tokens"].dtype == torch.int64 and int(entry["tokens"]) == 6
        assert entry["frequency"].shape == (4,)


def test_alpha_weighted_routing_by_hand(tokenizer):
    """β·α[chosen] replaces (or multiplies) the router's top-k weights; hooks are removed on exit."""
    model = build_tiny_model("mixtral", tokenizer)
    adapter = get_adapter(model.config)
    router = model.model.layers[2].mlp.gate
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, weights, indices = router(x)
        alphas = {i: torch.tensor([0.5, 1.5, 2.5, 3.5]) for i in range(4)}
        betas = {i: torch.tensor(float(i + 1)) for i in range(4)}
        with diep.alpha_weighted_routing(model, adapter, alphas, betas):
            l2, w2, i2 = router(x)
        assert torch.equal(l2, logits) and torch.equal(i2, indices)
        torch.testing.assert_close(w2, 3.0 * torch.tensor([0.5, 1.5, 2.5, 3.5])[indices])
        with diep.alpha_weighted_routing(model, adapter, alphas, betas, weighting="router"):
            _, w3, _ = router(x)
        torch.testing.assert_close(w3, 3.0 * torch.tensor([0.5, 1.5, 2.5, 3.5])[indices] * weights)
        assert torch.equal(router(x)[1], weights)
        # Only the layers given are hooked.
        with diep.alpha_weighted_routing(model, adapter, {0: alphas[0]}, betas):
            assert torch.equal(router(x)[1], weights)


def test_diep_leaves_model_as_it_was(tokenizer, tmp_path):
    model = build_tiny_model("olmoe", tokenizer)
    model.train()
    model.model.layers[0].mlp.gate.weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(4, 300, (2, 6))
    context = _context(model, tokenizer, tmp_path, [CalibrationBatch(ids, torch.ones_like(ids))])
    from hf_prune.methods.experts.expert_pruning import ExpertPruningConfig

    config = ExpertPruningConfig(keep_ratio=0.5, epochs=1, lm_loss_weight=0.0, beta_init=1.0)
    scores, details = diep.diep_scores(model, context, config)
    assert model.training and not model.model.layers[0].mlp.gate.weight.requires_grad
    assert model.model.layers[1].mlp.gate.weight.requires_grad
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert details["alpha_weighting"] == "replace" and details["beta_init"] == {
        0: 1.0,
        1: 1.0,
        2: 1.0,
        3: 1.0,
    }
    assert details["history"][0]["lm_loss"] is None and details["seconds"]["lm_loss"] == 0.0
    assert all(s.dtype == torch.float32 for s in scores.values())


def test_register_adds_new_types_and_keeps_the_first():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    class FirstConfig(nonuniform_moe.HfPruneMixtralConfig):
        model_type = "hf_prune_unit_test_moe"

    class FirstModel(nonuniform_moe.HfPruneMixtralForCausalLM):
        config_class = FirstConfig

    class SecondConfig(FirstConfig):
        pass

    class SecondModel(FirstModel):
        config_class = SecondConfig

    assert "hf_prune_unit_test_moe" not in CONFIG_MAPPING
    nonuniform_moe._register(FirstConfig, FirstModel)
    assert CONFIG_MAPPING["hf_prune_unit_test_moe"] is FirstConfig
    assert transformers.AutoModelForCausalLM._model_mapping[FirstConfig] is FirstModel
    nonuniform_moe._register(SecondConfig, SecondModel)  # the same model_type again: no error, first wins
    assert CONFIG_MAPPING["hf_prune_unit_test_moe"] is FirstConfig
    assert FirstModel._auto_class == "AutoModelForCausalLM" and FirstConfig._auto_class == "AutoConfig"
    nonuniform_moe.register()  # idempotent
    assert CONFIG_MAPPING["hf_prune_mixtral"] is nonuniform_moe.HfPruneMixtralConfig


def test_nonuniform_vision_language_refused_before_slicing(tokenizer):
    """A LLaVA around a Mixtral: one count per layer works, different counts are refused with the model
    left as it was (the refusal used to come after the experts were sliced)."""
    config = tiny_config("llava", tokenizer)
    config.text_config = tiny_config("mixtral", tokenizer)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config)
    adapter = get_adapter(model.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        UnsupportedModelError,
        match=r"^llava: a different expert count per layer is only supported for decoder-only models; "
        r"keep the same count in every MoE layer$",
    ):
        removal.remove_experts(model, adapter, {0: [0, 1], 1: [0, 1, 2], 2: [0, 1], 3: [0, 1]})
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    report = removal.remove_experts(model, adapter, {i: [1, 2, 3] for i in range(4)})
    assert report["uniform"] is True and model.config.text_config.num_local_experts == 3


def test_head_expert_count_follows_the_widest_layer(tokenizer):
    model = build_tiny_model("mixtral", tokenizer)
    removal.remove_experts(
        model, get_adapter(model.config), {0: [0, 1], 1: [0, 1, 3], 2: [1, 2, 3], 3: [2, 3]}
    )
    assert model.config.experts_per_layer == [2, 3, 3, 2]
    assert model.num_experts == model.config.num_local_experts == 3


def test_register_registers_every_family(monkeypatch):
    calls = []
    monkeypatch.setattr(nonuniform_moe, "_registered", False)
    monkeypatch.setattr(nonuniform_moe, "_register", lambda *classes: calls.append(classes))
    nonuniform_moe.register()
    assert calls == list(nonuniform_moe.CLASSES.values()) and nonuniform_moe._registered is True
    nonuniform_moe.register()
    assert len(calls) == 4


def test_save_pretrained_passes_positional_arguments(tokenizer, tmp_path):
    stock = build_tiny_model("mixtral", tokenizer)
    config = nonuniform_moe.HfPruneMixtralConfig(**_fields(stock.config), experts_per_layer=[2, 3, 4, 2])
    model = nonuniform_moe.HfPruneMixtralForCausalLM(config)
    model.save_pretrained(tmp_path / "worker", False)  # is_main_process=False: this process writes nothing
    assert not (tmp_path / "worker" / "config.json").exists()
    model.save_pretrained(tmp_path / "main", True, max_shard_size="20KB")  # keyword arguments reach it too
    assert len(list((tmp_path / "main").glob("model-*.safetensors"))) > 1
    assert (tmp_path / "main" / "config.json").is_file()


def test_diep_progress_bar_only_when_asked(tokenizer, tmp_path, capsys):
    from hf_prune.methods.experts.expert_pruning import ExpertPruningConfig

    model = build_tiny_model("olmoe", tokenizer)
    ids = torch.randint(4, 300, (2, 6))
    context = _context(model, tokenizer, tmp_path, [CalibrationBatch(ids, torch.ones_like(ids))])
    config = ExpertPruningConfig(keep_ratio=0.5, epochs=2, lm_loss_weight=0.0, beta_init=1.0)
    capsys.readouterr()
    diep.diep_scores(model, context, config)
    assert capsys.readouterr().err == ""
    context.progress = True
    diep.diep_scores(model, context, config)
    err = capsys.readouterr().err
    assert re.search(r"\rDiEP: +0%\|.*\| 0/2 ", err), err  # epochs × batches steps


# ---- DiEP: cached rows across batches and processes, the training state --------------------------------


def _padded_batches():
    """Three batches of 2 sequences × 5 positions, right-padded; 7 + 10 + 4 = 21 real tokens."""
    lengths = [(5, 2), (5, 5), (1, 3)]
    batches = []
    for first, second in lengths:
        mask = torch.zeros(2, 5, dtype=torch.long)
        mask[0, :first], mask[1, :second] = 1, 1
        batches.append(CalibrationBatch(torch.arange(10).reshape(2, 5), mask))
    return batches


def _by_hand(batches, max_tokens):
    """(batch, sequence, column) of every cached token, numbered in order: every stride-th real token."""
    real = [
        (b, s, c)
        for b, batch in enumerate(batches)
        for s in range(2)
        for c in range(5)
        if batch.attention_mask[s, c]
    ]
    stride = -(-len(real) // max_tokens)
    return real[::stride]


@pytest.mark.parametrize("max_tokens", [100, 8, 5, 1])
@pytest.mark.parametrize("world", [1, 2])
def test_cached_rows_map_every_process_share_to_the_one_process_numbering(max_tokens, world, monkeypatch):
    batches = _padded_batches()
    expected = _by_hand(batches, max_tokens)
    seen: dict[int, tuple[int, int, int]] = {}
    for rank in range(world):
        monkeypatch.setattr(diep, "rank_and_world", lambda rank=rank: (rank, world))
        cached = diep.cached_rows(batches, max_tokens)
        assert cached.total == len(expected) and cached.calibration_tokens == 21
        numbers = iter(cached.order.tolist())
        for b, rows in enumerate(cached.rows):
            for row in rows.tolist():  # a flattened position of this process's sequences of batch b
                local_sequence, column = divmod(row, 5)
                seen[next(numbers)] = (b, local_sequence * world + rank, column)
        assert next(numbers, None) is None
        # every step's share: this process's numbers within the step's run of the numbering
        steps = 3
        runs = torch.tensor_split(torch.arange(len(expected)), steps)
        for step in range(steps):
            indices, count = cached.step_share(step, steps)
            assert count == runs[step].numel()
            assert set(cached.order[indices].tolist()) == set(runs[step].tolist()) & set(
                cached.order.tolist()
            )
    assert [seen[n] for n in range(len(expected))] == expected


def test_step_share_of_a_step_without_cached_tokens():
    cached = diep.cached_rows(_padded_batches(), 1)  # one cached token, three steps
    assert cached.step_share(0, 3)[1] == 1
    indices, count = cached.step_share(2, 3)
    assert count == 0 and indices.numel() == 0 and indices.dtype == torch.long


def _training(**changes):
    config = ExpertPruningConfig(keep_ratio=0.5, **changes)
    return diep.DiepTraining(config, {1: 3, 3: 3}, dict.fromkeys((1, 3), torch.device("cpu")))


def test_training_state_round_trip():
    training = _training(lm_loss_weight=0.0)
    with torch.no_grad():
        training.alphas[1].copy_(torch.tensor([0.5, 2.0, 1.5]))
        training.betas[3].fill_(0.25)
    training.history = [
        {"epoch": 0, "phase": "alpha", "reconstruction": 1.1, "lm_loss": None},  # not float32 numbers
        {"epoch": 1, "phase": "alpha", "reconstruction": 0.7, "lm_loss": None},
        {"epoch": 2, "phase": "beta", "reconstruction": 0.3, "lm_loss": None},
    ]
    restored = _training(lm_loss_weight=0.0)
    assert restored.load_state(training.state()) == 3
    assert restored.history == training.history
    for i in (1, 3):
        assert torch.equal(restored.alphas[i], training.alphas[i])
        assert torch.equal(restored.betas[i], training.betas[i])
    with_lm = _training()
    with_lm.history = [{"epoch": 0, "phase": "alpha", "reconstruction": 0.5, "lm_loss": 3.1}]
    again = _training()
    assert again.load_state(with_lm.state()) == 1 and again.history == with_lm.history


def test_step_sums_the_gradients_of_every_process(monkeypatch):
    # two processes with the same gradients: the all-reduced step moves twice as far as one process's
    training = _training(lr_alpha=0.1)
    training.begin_epoch(0)  # an α epoch
    training.zero_grad()
    (training.alphas[1] * torch.tensor([1.0, 2.0, 3.0])).sum().backward()  # α of layer 3: no gradient here
    monkeypatch.setattr(diep, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(diep, "all_reduce_sum", lambda tensor: tensor.mul_(2))
    training.step()
    assert torch.allclose(training.alphas[1], torch.tensor([0.8, 0.6, 0.4]))
    assert torch.equal(training.alphas[3], torch.ones(3))  # a zero gradient was summed, not skipped
    assert torch.equal(training.alphas[3].grad, torch.zeros(3))
    assert training.betas[1].grad is None  # β is not this epoch's
    training.begin_epoch(2)  # a β epoch (α twice, then β)
    training.zero_grad()
    (training.betas[3] * 4.0).backward()
    training.step()
    assert training.betas[3].item() == pytest.approx(1e-5)  # 0.2 - 0.1·8 < 0: clamped to clamp_min
    assert torch.equal(training.betas[1].grad, torch.zeros(()))  # summed too, though zero here


def test_step_clamps_alpha_to_the_configured_range():
    training = _training(lr_alpha=1.0, clamp_min=0.01, clamp_max=2.0)
    training.begin_epoch(0)
    training.zero_grad()
    (training.alphas[1] * torch.tensor([5.0, -5.0, 0.5])).sum().backward()
    training.step()
    assert training.alphas[1].tolist() == pytest.approx([0.01, 2.0, 0.5])


def test_epoch_history_is_the_mean_over_steps_summed_over_processes(monkeypatch):
    training = _training()
    training.begin_epoch(0)
    for summed in (6.0, 3.0):  # two steps, each over 3 targets of its batch
        training.lm_loss(training.alphas[1].sum() * 0 + summed, 3)
    training.end_epoch(0, 2)
    assert training.history == [{"epoch": 0, "phase": "alpha", "reconstruction": 0.0, "lm_loss": 1.5}]
    monkeypatch.setattr(diep, "all_reduce_sum", lambda tensor: tensor.mul_(2))  # another process, the same
    training.begin_epoch(2)
    training.lm_loss(training.betas[1] * 0 + 6.0, 3)
    training.end_epoch(2, 1)
    assert training.history[-1] == {"epoch": 2, "phase": "beta", "reconstruction": 0.0, "lm_loss": 4.0}
