"""hf_prune.evals.bench: fields, ratios, analytic FLOPs, MoE active parameters, LLaVA with an image."""

from __future__ import annotations

import copy
import json
import statistics

import pytest
import torch
import transformers
from hf_prune.evals.bench import (
    BenchSettings,
    analytic_flops_per_token,
    benchmark_models,
    format_bench_table,
    prefill_latency_ms,
)
from tiny_models import build_preprocessor, build_tiny_model, save_tiny_model

from hf_prune.adapters import count_parameters
from hf_prune.checkpoint import load_model

FAST = BenchSettings(seq_lens=(8, 16), decode_tokens=4, warmup=1, repeats=2)


# Tiny models: one intra-op thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def drop_layer(model, index: int):
    """Remove one decoder layer the v5 way: slice, fix num_hidden_layers, renumber layer_idx."""
    kept = [layer for i, layer in enumerate(model.model.layers) if i != index]
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    for new_idx, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_idx
    return model


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    folder = save_tiny_model("llama", tmp_path_factory.mktemp("bench") / "llama")
    original = load_model(str(folder), dtype="float32", device="cpu")
    pruned = drop_layer(build_tiny_model("llama"), 2)
    results = benchmark_models(
        {"original": (original, None, folder), "pruned": (pruned, None, None)},
        FAST,
        baseline="original",
        progress=False,
    )
    return folder, original, pruned, results


def test_two_llamas_have_every_field_and_exact_ratios(llama_pair):
    folder, original, pruned, results = llama_pair
    json.loads(json.dumps(results))  # JSON-serialisable
    assert results["baseline"] == "original" and "RSS" in results["memory_metric"]
    for name, model in (("original", original), ("pruned", pruned)):
        res = results["models"][name]
        assert res["parameters"] == count_parameters(model)
        assert res["weights_mib"] == pytest.approx(4 * count_parameters(model) / 2**20, rel=0.01)  # float32
        assert res["layers"] == model.config.num_hidden_layers
        for key in ("8", "16"):
            entry = res["prefill"][key]
            assert entry["seq_len"] == int(key) and len(entry["times_ms"]) == 2
            assert entry["median_ms"] > 0 and entry["iqr_ms"] >= 0 and entry["peak_memory_mib"] >= 0
            assert res["flops"][key] == analytic_flops_per_token(model.config, int(key))
        assert res["decode"]["tokens_per_s"] > 0 and res["decode"]["new_tokens"] == 4
        assert res["decode"]["prompt_len"] == 8 and res["decode"]["peak_memory_mib"] >= 0
    assert results["models"]["pruned"]["disk_bytes"] is None
    assert (
        results["models"]["original"]["disk_bytes"]
        == sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        > 0
    )

    ratios = results["models"]["pruned"]["ratios"]
    assert ratios["parameters"] == count_parameters(pruned) / count_parameters(original) < 1
    assert ratios["weights_mib"] < 1
    for key in ("8", "16"):
        small, big = (
            analytic_flops_per_token(pruned.config, int(key)),
            analytic_flops_per_token(original.config, int(key)),
        )
        for figure in ("prefill_flops_per_token", "decode_flops_per_token", "params_active"):
            assert ratios["flops"][key][figure] == small[figure] / big[figure] < 1
        # latency ratios are the ratio of the two medians, each the median of its own recorded runs
        pruned_runs, original_runs = (
            results["models"][m]["prefill"][key]["times_ms"] for m in ("pruned", "original")
        )
        assert ratios["prefill"][key]["median_ms"] == pytest.approx(
            statistics.median(pruned_runs) / statistics.median(original_runs), rel=1e-12
        )
    pruned_tps, original_tps = (
        results["models"][m]["decode"]["tokens_per_s_runs"] for m in ("pruned", "original")
    )
    assert ratios["decode"]["tokens_per_s"] == pytest.approx(
        statistics.median(pruned_tps) / statistics.median(original_tps), rel=1e-12
    )
    assert "disk_bytes" not in ratios  # no folder for the pruned model: no ratio
    assert set(results["models"]["original"]["ratios"]["flops"]["8"].values()) == {1.0}


def test_table_shows_every_model_and_ratio(llama_pair):
    *_, results = llama_pair
    table = format_bench_table(results, "original")
    assert "pruned/original" in table and "prefill ms @16" in table and "decode tokens/s" in table
    ratio = results["models"]["pruned"]["ratios"]["flops"]["decode_prompt"]["params_active"]
    assert "RSS" in table and f"{ratio:.3f}x" in table
    assert "pruned/original" not in format_bench_table(results, None)
    assert prefill_latency_ms(results)["pruned"] == {
        n: results["models"]["pruned"]["prefill"][str(n)]["median_ms"] for n in (8, 16)
    }


def test_llama_flops_by_hand():
    config = build_tiny_model("llama").config
    V, H, I, L, nh, nkv, d = 300, 32, 64, 4, 4, 2, 8  # noqa: N806, E741
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        V,
        H,
        I,
        L,
    )
    per_layer = H * nh * d + 2 * H * nkv * d + nh * d * H + 3 * H * I  # 3072 + 6144
    S = 16  # noqa: N806
    got = analytic_flops_per_token(config, S)
    assert got["decode_flops_per_token"] == 2 * L * per_layer + 2 * V * H + L * 4 * nh * d * S == 101_120
    assert (
        got["prefill_flops_per_token"]
        == 2 * L * per_layer + (2 * V * H + L * 4 * nh * d * S * (S + 1) // 2) / S
    )
    assert got["prefill_flops_per_token"] == 79_280
    assert got["params_active"] == L * (per_layer + 2 * H) + H + 2 * V * H == 56_352


def test_sliding_window_caps_attended_keys():
    llama, mistral = build_tiny_model("llama").config, build_tiny_model("mistral").config  # mistral: window 8
    full, windowed = analytic_flops_per_token(llama, 16), analytic_flops_per_token(mistral, 16)
    per_key = llama.num_hidden_layers * 4 * llama.num_attention_heads * llama.head_dim
    assert full["decode_flops_per_token"] - windowed["decode_flops_per_token"] == per_key * (16 - 8)
    keys_full, keys_windowed = sum(range(1, 17)), sum(min(t, 8) for t in range(1, 17))
    assert (
        full["prefill_flops_per_token"] - windowed["prefill_flops_per_token"]
        == per_key * (keys_full - keys_windowed) / 16
    )
    assert analytic_flops_per_token(mistral, 8) == analytic_flops_per_token(llama, 8)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_dense_active_params_are_all_params(model_type):
    model = build_tiny_model(model_type)
    assert analytic_flops_per_token(model.config, 8)["params_active"] == count_parameters(model)


def test_moe_active_params_count_top_k_experts_only():
    model = build_tiny_model("mixtral")
    c = model.config
    inactive = (
        c.num_hidden_layers
        * (c.num_local_experts - c.num_experts_per_tok)
        * 3
        * c.hidden_size
        * c.intermediate_size
    )
    assert c.num_local_experts > c.num_experts_per_tok
    assert analytic_flops_per_token(c, 8)["params_active"] == count_parameters(model) - inactive


def test_moe_active_params_include_the_shared_expert():
    model = build_tiny_model("qwen2_moe")
    c = model.config
    sparse_layers = [i for i in range(c.num_hidden_layers) if (i + 1) % c.decoder_sparse_step == 0]
    inactive = (
        len(sparse_layers)
        * (c.num_experts - c.num_experts_per_tok)
        * 3
        * c.hidden_size
        * c.moe_intermediate_size
    )
    active = analytic_flops_per_token(c, 8)["params_active"]
    assert active == count_parameters(model) - inactive
    layer = model.model.layers[sparse_layers[0]].mlp
    shared = (
        sum(p.numel() for p in layer.shared_expert.parameters()) + layer.shared_expert_gate.weight.numel()
    )
    c.shared_expert_intermediate_size = 0
    assert active - analytic_flops_per_token(c, 8)["params_active"] == len(sparse_layers) * shared


def test_llava_benchmarks_with_an_image():
    model, processor = build_tiny_model("llava"), build_preprocessor("llava")
    settings = BenchSettings(seq_lens=(8, 32), decode_tokens=3, warmup=1, repeats=1)
    res = benchmark_models({"llava": (model, processor, None)}, settings, progress=False)["models"]["llava"]
    assert res["image"] is True and res["crops_per_image"] == 1
    # 16 image tokens + BOS: a shorter request grows to hold the image, a longer one is padded with text.
    assert res["prefill"]["8"]["seq_len"] == 17 and res["prefill"]["32"]["seq_len"] == 32
    flops = res["flops"]["32"]
    assert (
        flops["image_tokens_per_crop"] == 16
        and res["vision_flops_per_image"] == flops["vision_flops_per_crop"] > 0
    )
    assert flops["params_active"] == analytic_flops_per_token(model.config.text_config, 32)["params_active"]
    assert res["decode"]["tokens_per_s"] > 0
    text_only = benchmark_models(
        {"llava": (model, processor, None)},
        BenchSettings(seq_lens=(8,), decode_tokens=2, warmup=0, repeats=1, image=False),
        progress=False,
    )["models"]["llava"]
    assert text_only["image"] is False and text_only["prefill"]["8"]["seq_len"] == 8
    batched = benchmark_models(
        {"llava": (model, processor, None)},
        BenchSettings(seq_lens=(24,), decode_tokens=2, warmup=0, repeats=1, batch_size=2),
        progress=False,
    )["models"]["llava"]
    assert (
        batched["image"] is True
        and batched["prefill"]["24"]["seq_len"] == 24
        and batched["decode"]["tokens_per_s"] > 0
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path():
    original = build_tiny_model("llama").to("cuda")
    pruned = drop_layer(build_tiny_model("llama"), 2).to("cuda")
    results = benchmark_models(
        {"original": (original, None, None), "pruned": (pruned, None, None)},
        FAST,
        baseline="original",
        progress=False,
    )
    assert "max_memory_allocated" in results["memory_metric"] and "cuda" in format_bench_table(results, None)
    for res in results["models"].values():
        assert res["device"].startswith("cuda") and res["prefill"]["16"]["peak_memory_mib"] > 0
        assert res["decode"]["tokens_per_s"] > 0
    assert results["models"]["pruned"]["ratios"]["flops"]["16"]["decode_flops_per_token"] < 1
    assert "pruned/original" in format_bench_table(results, "original")


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3_moe", "olmoe"])
def test_prompt_pruned_and_nonuniform_types_count_like_their_stock_family(model_type):
    """hf_prune_<family> checkpoints keep the family's attention (Qwen2's q/k/v bias, Qwen3-MoE's and OLMoE's q/k
    norms): read under the hf_prune_ type, the analytic count is the stock one."""
    model = build_tiny_model(model_type)
    config = copy.deepcopy(model.config)
    config.model_type = f"hf_prune_{model_type}"
    stock = analytic_flops_per_token(model.config, 8)
    assert analytic_flops_per_token(config, 8) == stock
    if model_type == "qwen2":  # dense: every parameter is active
        assert stock["params_active"] == count_parameters(model)


def test_olmo2_full_qk_norms_are_counted():
    config = transformers.Olmo2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert analytic_flops_per_token(model.config, 8)["params_active"] == count_parameters(model)
