"""Expert removal (``hf_prune.methods.experts.removal``) and checkpoints that reload, on the four MoE families.

- Removal equals masking: the pruned model's logits equal the ORIGINAL model's with the removed experts'
  router logits set to -inf (so top-k runs over the remaining experts only), for a uniform keep (stock
  class, count key rewritten) and a non-uniform one (``hf_prune_<family>`` class).
- Validation refuses bad keeps before touching anything.
- Saved checkpoints reload in fresh processes (two scripts, all folders each, run side by side): without
  hf_prune (uniform: plain ``from_pretrained``; non-uniform: ``trust_remote_code=True``) and after
  ``import hf_prune`` (non-uniform: plain ``from_pretrained``), with the same logits and greedy tokens.
- A checkpoint whose weights disagree with its config is refused (never ``ignore_mismatched_sizes``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from tiny_models import MOE_TYPES, NUM_EXPERTS, TOP_K, build_tiny_model, build_tokenizer

from hf_prune.adapters import get_adapter
from hf_prune.checkpoint import save_pruned_model
from hf_prune.errors import ConfigFieldError
from hf_prune.methods.experts.removal import kept_expert_indices_report, nonuniform_moe, remove_experts

PROMPT = "def area(r):\n    return 3.14 * r * r  # the radius of a circle"
MAX_NEW_TOKENS = 6
LOGITS_ATOL = 1e-5
#: Kept experts per MoE layer, cycled over the MoE layers (deliberately unsorted in places).
UNIFORM_KEEP = [[3, 0, 1], [1, 2, 3], [0, 2, 3], [2, 0, 1]]
NONUNIFORM_KEEP = [[0, 1, 3], [2, 1], [1, 2, 3], [3, 0]]
MODES = ("uniform", "nonuniform")


# Tiny models: one intra-op thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Case:
    family: str
    mode: str
    original: Any
    pruned: Any
    keep: dict[int, list[int]]
    report: dict[str, Any]


def _keep_for(model: Any, mode: str) -> dict[int, list[int]]:
    table = UNIFORM_KEEP if mode == "uniform" else NONUNIFORM_KEEP
    moe = get_adapter(model.config).moe_layer_indices(model)
    return {layer: list(table[j % len(table)]) for j, layer in enumerate(moe)}


@pytest.fixture(scope="module")
def cases() -> dict[tuple[str, str], Case]:
    out = {}
    for family in MOE_TYPES:
        original = build_tiny_model(family)
        for mode in MODES:
            pruned = copy.deepcopy(original)
            keep = _keep_for(original, mode)
            report = remove_experts(pruned, get_adapter(pruned.config), keep)
            out[family, mode] = Case(family, mode, original, pruned.eval(), keep, report)
    return out


@pytest.fixture(scope="module")
def token_ids() -> list[int]:
    return build_tokenizer()(PROMPT)["input_ids"]


def _mask_removed_experts(model: Any, keep: dict[int, list[int]]) -> None:
    """Reference: each router computes its full logits, sets the removed experts' to -inf, then routes as
    the stock router does (softmax, top-k, renormalise when the family does)."""
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    for index, kept in keep.items():
        router = adapter.router(layers[index])
        removed = torch.ones(router.weight.shape[0], dtype=torch.bool)
        removed[kept] = False

        def forward(hidden_states, router=router, removed=removed):
            hidden_states = hidden_states.reshape(-1, router.hidden_dim)
            logits = F.linear(hidden_states, router.weight).masked_fill(removed, float("-inf"))
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            top_value, top_index = torch.topk(probs, router.top_k, dim=-1)
            if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
                top_value = top_value / top_value.sum(dim=-1, keepdim=True)
            return logits, top_value.to(logits.dtype), top_index

        router.forward = forward


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


# ---- removal equals masking ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", MOE_TYPES)
def test_removal_equals_masking(cases, token_ids, family, mode):
    case = cases[family, mode]
    reference = copy.deepcopy(case.original)
    _mask_removed_experts(reference, case.keep)
    ids = torch.tensor([token_ids, token_ids[::-1]])
    expected = _logits(reference, ids)
    torch.testing.assert_close(_logits(case.pruned, ids), expected, atol=LOGITS_ATOL, rtol=0)
    # The mask matters: the original routes some tokens to removed experts.
    assert (_logits(case.original, ids) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", MOE_TYPES)
def test_structure_config_and_report(cases, family, mode):
    case = cases[family, mode]
    model, original, report = case.pruned, case.original, case.report
    adapter = get_adapter(original.config)
    moe = adapter.moe_layer_indices(original)
    counts = [len(case.keep[i]) if i in case.keep else 0 for i in range(len(adapter.layers(original)))]
    layers, original_layers = model.model.layers, adapter.layers(original)
    for i in moe:
        experts, router = layers[i].mlp.experts, layers[i].mlp.gate
        kept = sorted(case.keep[i])
        assert experts.num_experts == router.num_experts == len(kept)
        want = adapter.experts(original_layers[i])
        torch.testing.assert_close(experts.gate_up_proj, want.gate_up_proj[kept], atol=0, rtol=0)
        torch.testing.assert_close(experts.down_proj, want.down_proj[kept], atol=0, rtol=0)
        torch.testing.assert_close(
            router.weight, adapter.router(original_layers[i]).weight[kept], atol=0, rtol=0
        )
        if adapter.spec.shared_expert_attr:  # never touched
            for name in ("shared_expert", "shared_expert_gate"):
                before, after = getattr(original_layers[i].mlp, name), getattr(layers[i].mlp, name)
                for (n, p), (_, q) in zip(before.named_parameters(), after.named_parameters(), strict=True):
                    assert torch.equal(p, q), n
    key = adapter.spec.num_experts_key
    if mode == "uniform":
        assert type(model) is type(original) and model.config.model_type == family
        assert getattr(model.config, key) == model.num_experts == 3
        assert not hasattr(model.config, "experts_per_layer")
    else:
        config_class, model_class = nonuniform_moe.nonuniform_classes(family)
        assert type(model) is model_class and isinstance(model, type(original))
        assert type(model.config) is config_class and model.config.model_type == f"hf_prune_{family}"
        assert model.config.experts_per_layer == counts
        assert getattr(model.config, key) == model.num_experts == max(counts)
        # Every module that held the config now holds the new one (experts read their implementation there).
        assert all(m.config is model.config for m in model.modules() if "config" in m.__dict__)
    assert report["uniform"] is (mode == "uniform")
    assert report["experts_per_layer"] == counts
    assert report["experts_per_layer_before"] == [NUM_EXPERTS if i in moe else 0 for i in range(len(counts))]
    assert report["experts_after"] == sum(counts) and report["experts_before"] == NUM_EXPERTS * len(moe)
    assert report["params_after"] < report["params_before"]
    assert report["params_after"] == sum(p.numel() for p in model.parameters())
    assert [e["layer"] for e in report["layers"]] == moe
    for entry in report["layers"]:
        assert entry["kept"] == sorted(case.keep[entry["layer"]])
        assert sorted(entry["kept"] + entry["removed"]) == list(range(NUM_EXPERTS))
    assert kept_expert_indices_report(report)[0].startswith(f"layer {moe[0]}: kept experts")
    json.dumps(report)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_second_removal_switches_class(cases, token_ids, family):
    """Pruning a non-uniform model again: to other per-layer counts (stays hf_prune_), then to one count
    (back to the stock class); indices are the current ones, the result still equals masking the original."""
    case = cases[family, "nonuniform"]
    model = copy.deepcopy(case.pruned)
    counts = case.report["experts_per_layer"]
    widest = counts.index(3)  # keeps its 3 experts (reordered), every other MoE layer keeps 2
    first = {i: [2, 0, 1] if i == widest else [n - 1, 0] for i, n in enumerate(counts) if n}
    report = remove_experts(model, get_adapter(model.config), first)
    assert report["uniform"] is False and model.config.model_type == f"hf_prune_{family}"
    assert model.config.experts_per_layer == [len(first[i]) if i in first else 0 for i in range(len(counts))]
    again = {i: [1, 0] for i in first}
    remove_experts(model, get_adapter(model.config), again)
    stock = type(case.original)
    assert type(model) is stock and type(model.config) is type(case.original.config)
    assert model.config.model_type == family and "experts_per_layer" not in model.config.to_dict()
    assert getattr(model.config, get_adapter(model.config).spec.num_experts_key) == 2
    original_kept = {i: [sorted(case.keep[i])[j] for j in sorted(first[i])[:2]] for i in first}
    reference = copy.deepcopy(case.original)
    _mask_removed_experts(reference, original_kept)
    ids = torch.tensor([token_ids])
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=LOGITS_ATOL, rtol=0)


def test_nonuniform_router_logits_and_aux_loss(cases, token_ids):
    """The stock load-balancing loss needs one expert count; the hf_prune class averages it per layer."""
    model = cases["mixtral", "nonuniform"].pruned
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        plain = model(input_ids=ids, labels=ids)
    assert [r.shape[-1] for r in out.router_logits] == model.config.experts_per_layer
    assert torch.isfinite(out.aux_loss)
    torch.testing.assert_close(out.logits, plain.logits)
    torch.testing.assert_close(out.loss, plain.loss + model.router_aux_loss_coef * out.aux_loss)


# ---- validation ----------------------------------------------------------------------------------


def _snapshot(model: Any) -> tuple[Any, ...]:
    return (
        type(model),
        model.config.to_json_string(),
        {k: v.clone() for k, v in model.state_dict().items()},
        [(getattr(m, "num_experts", None)) for m in model.modules()],
    )


@pytest.mark.parametrize("family", MOE_TYPES)
def test_validation_errors_leave_model_untouched(family):
    model = build_tiny_model(family)
    adapter = get_adapter(model.config)
    moe = adapter.moe_layer_indices(model)
    good = {i: [0, 1, 2] for i in moe}
    before = _snapshot(model)
    last = moe[-1]
    bad = [
        (
            {**good, last: [0, NUM_EXPERTS]},
            rf"layer {last}: expert index {NUM_EXPERTS} does not exist "
            rf"\(valid range 0\.\.{NUM_EXPERTS - 1}",
        ),
        ({**good, last: [0, -1, 2]}, rf"layer {last}: expert index -1 does not exist"),
        ({**good, last: [2]}, rf"layer {last}: keeps 1 experts, fewer than the {TOP_K}"),
        ({i: v for i, v in good.items() if i != last}, rf"MoE layers \[{last}\] are missing"),
        ({**good, last: [1, 2, 1]}, rf"layer {last}: expert indices \[1\] are listed more than once"),
        ({**good, 7: [0, 1]}, r"layer 7 does not exist"),
        ({**good, "x": [0, 1]}, r"layer index 'x' is not an integer"),
        ({**good, str(last): [0, 1]}, rf"layer {last} is given more than once"),
    ]
    dense = [i for i in range(len(adapter.layers(model))) if i not in moe]
    if dense:  # Qwen2-MoE's tiny model mixes dense and MoE layers
        bad.append(({**good, dense[0]: [0, 1]}, rf"layer {dense[0]} is a dense layer"))
    for keep, message in bad:
        with pytest.raises(ConfigFieldError, match=message) as info:
            remove_experts(model, adapter, keep)
        assert info.value.field == "keep_experts"
        assert isinstance(info.value, ValueError)
    after = _snapshot(model)
    assert before[0] is after[0] and before[1] == after[1] and before[3] == after[3]
    assert before[2].keys() == after[2].keys() and all(
        torch.equal(before[2][k], after[2][k]) for k in before[2]
    )


# ---- save and reload in fresh processes ---------------------------------------------------------------

RELOAD_SCRIPT = textwrap.dedent(r"""
    import json, sys, traceback
    spec = json.load(open(sys.argv[1]))
    results = {}
    if spec["import_hf_prune"]:
        import hf_prune
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        results["_registered"] = "hf_prune_mixtral" in CONFIG_MAPPING
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    ids = torch.tensor([spec["token_ids"]])
    for name, case in spec["cases"].items():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(case["folder"], output_loading_info=True,
                                                               **case["kwargs"])
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
                generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=spec["max_new_tokens"], use_cache=True)[0]
            results[name] = {
                "class": type(model).__name__, "module": type(model).__module__,
                "model_type": model.config.model_type,
                "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
                "experts": [int(l.mlp.experts.num_experts) if hasattr(l.mlp, "experts") else 0
                            for l in model.model.layers],
                "logits": logits.tolist(), "generated": generated.tolist(),
            }
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    results["_hf_prune_imported"] = "hf_prune" in sys.modules
    json.dump(results, open(sys.argv[2], "w"))
""")


def _save(case: Case, folder: Path) -> Path:
    report = {
        "recipe": {"model": None, "output": str(folder)},
        "stages": [{"method": "expert_pruning", "removal": case.report}],
        "params_before": case.report["params_before"],
        "params_after": case.report["params_after"],
        "evaluation": [],
    }
    return save_pruned_model(case.pruned, build_tokenizer(), folder, report)


@pytest.fixture(scope="module")
def saved(cases, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("expert-removal")
    return {key: _save(case, root / f"{key[0]}-{key[1]}") for key, case in cases.items()}


@pytest.fixture(scope="module")
def reloaded(saved, token_ids, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Two fresh processes, side by side: without hf_prune (every folder) and after ``import hf_prune``
    (the non-uniform folders)."""
    work = tmp_path_factory.mktemp("reload")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "HF_MODULES_CACHE": str(work / "modules"),
    }
    runs = {}
    for variant, with_hf_prune in (("plain", False), ("hf_prune", True)):
        spec = {
            "import_hf_prune": with_hf_prune,
            "token_ids": token_ids,
            "max_new_tokens": MAX_NEW_TOKENS,
            "cases": {},
        }
        for (family, mode), folder in saved.items():
            if with_hf_prune and mode == "uniform":
                continue
            kwargs = {"trust_remote_code": True} if mode == "nonuniform" and not with_hf_prune else {}
            spec["cases"][f"{family}-{mode}"] = {"folder": str(folder), "kwargs": kwargs}
        (work / f"{variant}.json").write_text(json.dumps(spec))
        runs[variant] = subprocess.Popen(
            [
                sys.executable,
                "-c",
                RELOAD_SCRIPT,
                str(work / f"{variant}.json"),
                str(work / f"{variant}-out.json"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=work,
        )
    results = {}
    for variant, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{variant} reload process failed:\n{stdout[-3000:]}\n{stderr[-5000:]}"
        results[variant] = json.loads((work / f"{variant}-out.json").read_text())
    return results


def test_saved_folders(saved, cases):
    for (family, mode), folder in saved.items():
        for file in ("config.json", "model.safetensors", "hf_prune.json", "README.md", "tokenizer.json"):
            assert (folder / file).is_file(), f"{file} missing from {folder}"
        config = json.loads((folder / "config.json").read_text())
        with safe_open(folder / "model.safetensors", "pt") as f:
            keys = list(f.keys())
        if mode == "uniform":
            assert config["model_type"] == family and "auto_map" not in config
            assert not (folder / "nonuniform_moe.py").exists()
        else:
            assert config["model_type"] == f"hf_prune_{family}"
            assert config["experts_per_layer"] == cases[family, mode].report["experts_per_layer"]
            assert config["auto_map"]["AutoModelForCausalLM"].startswith("nonuniform_moe.HfPrune")
            assert (folder / "nonuniform_moe.py").read_text() == Path(nonuniform_moe.__file__).read_text()
            # Fused expert tensors, one per layer (the legacy per-expert conversion is keyed by stock types).
            assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys)
            assert not any(".experts.0." in k for k in keys)


#: Uniform checkpoints are stock models: only the process without hf_prune loads them.
RELOADS = [
    (f, m, v)
    for f in MOE_TYPES
    for m in MODES
    for v in ("plain", "hf_prune")
    if (m, v) != ("uniform", "hf_prune")
]


@pytest.mark.parametrize(("family", "mode", "variant"), RELOADS)
def test_reload_matches_in_memory(cases, reloaded, token_ids, family, mode, variant):
    results = reloaded[variant]
    assert results["_hf_prune_imported"] is (variant == "hf_prune")
    if variant == "hf_prune":
        assert results["_registered"], "import hf_prune did not register the hf_prune_* MoE classes"
    again = results[f"{family}-{mode}"]
    assert "error" not in again, again.get("error")
    model = cases[family, mode].pruned
    assert again["class"] == type(model).__name__
    if mode == "uniform":
        assert again["module"].startswith("transformers.models.")
    elif variant == "plain":
        assert again["module"].startswith(
            "transformers_modules."
        )  # the remote code copied next to the weights
    else:
        assert again["module"] == nonuniform_moe.__name__
    assert again["model_type"] == model.config.model_type
    assert not any(again["loading_info"].values()), f"keys not loaded cleanly: {again['loading_info']}"
    assert again["experts"] == cases[family, mode].report["experts_per_layer"]
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            use_cache=True,
        )[0]
    torch.testing.assert_close(
        torch.tensor(again["logits"]), _logits(model, ids)[0], atol=LOGITS_ATOL, rtol=0
    )
    assert again["generated"] == generated.tolist()
    assert len(generated) == len(token_ids) + MAX_NEW_TOKENS


# ---- mismatched checkpoints are refused -----------------------------------------------------------------


def _edited_copy(folder: Path, target: Path, edit) -> Path:
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_mismatched_checkpoint_is_refused(saved, tmp_path, family):
    """Shapes that disagree with the config raise (transformers would otherwise re-initialise them only with
    ``ignore_mismatched_sizes=True``, which hf_prune never passes)."""
    nonuniform = saved[family, "nonuniform"]
    counts = json.loads((nonuniform / "config.json").read_text())["experts_per_layer"]
    layer = next(i for i, n in enumerate(counts) if n == TOP_K)

    def one_more(config):
        config["experts_per_layer"][layer] += 1

    with pytest.raises(RuntimeError, match="mismatch"):
        transformers.AutoModelForCausalLM.from_pretrained(
            _edited_copy(nonuniform, tmp_path / "more", one_more)
        )

    def too_few(config):
        config["experts_per_layer"][layer] = TOP_K - 1

    with pytest.raises(ValueError, match=rf"experts_per_layer\[{layer}\] = {TOP_K - 1}"):
        transformers.AutoModelForCausalLM.from_pretrained(_edited_copy(nonuniform, tmp_path / "few", too_few))

    key = get_adapter(transformers.AutoConfig.from_pretrained(saved[family, "uniform"])).spec.num_experts_key

    def stock_count(config):
        config[key] = NUM_EXPERTS

    with pytest.raises(RuntimeError, match="mismatch"):
        transformers.AutoModelForCausalLM.from_pretrained(
            _edited_copy(saved[family, "uniform"], tmp_path / "uniform", stock_count)
        )
