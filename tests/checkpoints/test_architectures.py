"""ReplaceMe end to end on a tiny random model of every supported architecture.

One module-scoped fixture saves a tiny model of each type, prunes it through ``hf_prune.prune(recipe)``
and keeps the in-memory results; a second one reloads every saved folder in ONE fresh Python process
with plain transformers (hf_prune never imported there) and records logits, greedy generations, layer
structure and, for LLaVA / LLaVA-NeXT, an image forward. The tests compare the two sides.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from tiny_models import (
    ALL_TYPES,
    DAMPED_LAYER,
    IMAGE_SIZE,
    IMAGE_TOKEN,
    MOE_TYPES,
    NUM_LAYERS,
    VISION_TYPES,
    build_preprocessor,
    build_tiny_model,
    build_tokenizer,
    sample_image,
    save_tiny_model,
    tiny_config,
    write_calibration_file,
)

import hf_prune
from hf_prune.adapters import get_adapter
from hf_prune.methods.depth.replaceme import fold_linear_map_into_mlp_output

PROMPT = "def area(r):\n    return 3.14 * r * r  # the radius"
IMAGE_PROMPT = f"{IMAGE_TOKEN}\nWhat is shown here?"
MAX_NEW_TOKENS = 8
LOGITS_ATOL = 1e-5
#: LLaVA-NeXT gets a non-square image so the "anyres" path picks a 2-tile grid plus the base image.
IMAGE_SHAPES = {"llava": (IMAGE_SIZE, IMAGE_SIZE), "llava_next": (IMAGE_SIZE + IMAGE_SIZE // 2, IMAGE_SIZE)}
#: The tiny models make layer DAMPED_LAYER (2) nearly the identity, so ``num_layers: 1`` removes it and
#: keeps layer 1. Qwen2-MoE's layers are [dense, MoE, dense, MoE] (decoder_sparse_step=2): that cut
#: leaves [dense, MoE, MoE], and an extra explicit cut of layer 1 (folding into the dense layer 0) leaves
#: [dense, dense, MoE]; the stock rule would rebuild both as [dense, MoE, dense].
QWEN2_MOE_SHIFT = "qwen2_moe-layer1"
CASES = {**{t: t for t in ALL_TYPES}, QWEN2_MOE_SHIFT: "qwen2_moe"}


@dataclass
class PrunedCase:
    name: str
    model_type: str
    source: Path
    output: Path
    result: Any = None
    error: BaseException | None = None
    original_layer_types: list[str] | None = None
    original_moe_flags: list[bool] = field(default_factory=list)

    def get(self) -> Any:
        if self.error is not None:
            raise AssertionError(f"{self.name}: pruning failed: {self.error!r}") from self.error
        return self.result


def _recipe(case: PrunedCase, calibration: Path) -> dict[str, Any]:
    stage = {"method": "replaceme", "num_layers": 1}
    if case.name == QWEN2_MOE_SHIFT:
        stage = {"method": "replaceme", "layers": [1, 1]}
    return {
        "model": str(case.source),
        "output": str(case.output),
        "stages": [stage],
        "calibration": _calibration(calibration),
    }


def _calibration(path: Path) -> dict[str, Any]:
    return {"data": str(path), "num_samples": 16, "seq_len": 64, "packing": True}


def _text_config(model: Any) -> Any:
    return get_adapter(model.config).text_config(model.config)


# Tiny models: one intra-op thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    return write_calibration_file(tmp_path_factory.mktemp("calibration") / "pydoc.txt", num_chars=6000)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, calibration_file) -> dict[str, PrunedCase]:
    """Every type saved, pruned (replaceme, one layer) and saved again; failures kept per case."""
    sources = tmp_path_factory.mktemp("tiny")
    outputs = tmp_path_factory.mktemp("pruned")
    cases = {}
    for name, model_type in CASES.items():
        case = PrunedCase(name, model_type, sources / model_type, outputs / name)
        try:
            if not case.source.exists():
                save_tiny_model(model_type, case.source)
            original = build_tiny_model(model_type)
            adapter = get_adapter(original.config)
            case.original_layer_types = getattr(adapter.text_config(original.config), "layer_types", None)
            case.original_moe_flags = [adapter.is_moe_layer(layer) for layer in adapter.layers(original)]
            case.result = hf_prune.prune(_recipe(case, calibration_file), progress=False)
        except Exception as exc:  # reported by the tests of this case only
            case.error = exc
        cases[name] = case
    return cases


RELOAD_SCRIPT = textwrap.dedent("""
    import json, os, sys, traceback
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
    import numpy as np
    import torch
    import transformers
    from PIL import Image

    spec = json.load(open(sys.argv[1]))
    results = {}
    for name, case in spec["cases"].items():
        try:
            auto = transformers.AutoModelForImageTextToText if case["vision"] else transformers.AutoModelForCausalLM
            model, info = auto.from_pretrained(case["folder"], output_loading_info=True)
            model.eval()
            text = model.config.get_text_config()
            layers = model.model.language_model.layers if case["vision"] else model.model.layers
            ids = torch.tensor([case["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=spec["max_new_tokens"], use_cache=True)
            out = {
                "class": type(model).__name__,
                "dtype": str(model.dtype),
                "loading_info": {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs"},
                "num_hidden_layers": text.num_hidden_layers,
                "num_layers": len(layers),
                "layer_types": getattr(text, "layer_types", None),
                "moe_flags": [hasattr(layer.mlp, "experts") for layer in layers],
                "logits": logits[0].tolist(),
                "generated": generated[0].tolist(),
            }
            if case["vision"]:
                processor = transformers.AutoProcessor.from_pretrained(case["folder"])
                image = Image.fromarray(np.array(case["image"], dtype=np.uint8))
                inputs = processor(images=image, text=spec["image_prompt"], return_tensors="pt")
                with torch.no_grad():
                    image_logits = model(**inputs).logits
                out["processor"] = type(processor).__name__
                out["image_inputs"] = {k: v.tolist() for k, v in inputs.items()}
                out["image_logits"] = image_logits[0].tolist()
            results[name] = out
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    results["_hf_prune_imported"] = "hf_prune" in sys.modules
    assert "hf_prune" not in sys.modules, "the reload process must not import hf_prune"
    json.dump(results, open(sys.argv[2], "w"))
""")


@pytest.fixture(scope="module")
def token_ids() -> list[int]:
    return build_tokenizer()(PROMPT)["input_ids"]


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    return {t: np.asarray(sample_image(*IMAGE_SHAPES[t])) for t in VISION_TYPES}


@pytest.fixture(scope="module")
def reloaded(pruned, token_ids, images, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Reload every saved output in one fresh process (plain transformers) and return what it saw."""
    work = tmp_path_factory.mktemp("reload")
    spec = {"max_new_tokens": MAX_NEW_TOKENS, "image_prompt": IMAGE_PROMPT, "cases": {}}
    for name, case in pruned.items():
        if case.error is None:
            vision = case.model_type in VISION_TYPES
            spec["cases"][name] = {
                "folder": str(case.output),
                "vision": vision,
                "input_ids": token_ids,
                "image": images[case.model_type].tolist() if vision else None,
            }
    (work / "spec.json").write_text(json.dumps(spec))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(work / "spec.json"), str(work / "out.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=300,
    )
    assert proc.returncode == 0, f"reload process failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    results = json.loads((work / "out.json").read_text())
    assert results.pop("_hf_prune_imported") is False
    return results


def _reload_result(reloaded: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in reloaded, f"{name}: not reloaded (pruning failed)"
    result = reloaded[name]
    assert "error" not in result, f"{name}: reload failed in the fresh process:\n{result.get('error')}"
    return result


# ---- in-memory pruned model ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_model_in_memory(pruned, name):
    case = pruned[name]
    result = case.get()
    model = result.model
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    text = _text_config(model)
    assert len(layers) == NUM_LAYERS - 1
    assert text.num_hidden_layers == NUM_LAYERS - 1
    for index, layer in enumerate(layers):
        indices = {m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")}
        assert indices == {index}, f"layer {index} carries layer_idx {indices}"

    stage = result.report["stages"][0]
    assert stage["method"] == "replaceme"
    assert (stage["layers_before"], stage["layers_after"]) == (NUM_LAYERS, NUM_LAYERS - 1)
    (removed,) = stage["removed_layers"]
    # The damped layer is the one angular distance picks (a middle layer: indices shift after it).
    assert removed == (1 if name == QWEN2_MOE_SHIFT else DAMPED_LAYER)
    kept = removed - 1
    (cut,) = stage["cuts"]
    assert cut["kept_layer"] == kept
    expected_folds = [proj for proj, _, _ in adapter.mlp_output_projections(layers[kept])]
    assert cut["folded_into"] == expected_folds
    assert cut["relative_error_with_map"] <= cut["relative_error_without_map"] + 1e-9

    if case.original_layer_types is not None:
        expected = [t for i, t in enumerate(case.original_layer_types) if i != removed]
        assert list(text.layer_types) == expected
        # Attention modules keep the sliding/full choice made when they were built: it must still agree.
        built = [{m.layer_type for m in layer.modules() if hasattr(m, "layer_type")} for layer in layers]
        assert all(kinds in ({t}, set()) for kinds, t in zip(built, expected, strict=True)), built
    assert [adapter.is_moe_layer(layer) for layer in layers] == [
        f for i, f in enumerate(case.original_moe_flags) if i != removed
    ]

    saved = case.output
    for file in ("config.json", "model.safetensors", "hf_prune.json", "README.md", "tokenizer.json"):
        assert (saved / file).is_file(), f"{file} missing from {saved}"
    if case.model_type in VISION_TYPES:
        assert (saved / "processor_config.json").is_file()
    config = json.loads((saved / "config.json").read_text())
    saved_text = config.get("text_config", config)
    assert saved_text["num_hidden_layers"] == NUM_LAYERS - 1
    assert not list(saved.parent.glob(f".{saved.name}.*")), "temporary folders left beside the output"


# ---- fresh-process reload ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_reload_matches_in_memory(pruned, reloaded, token_ids, name):
    model = pruned[name].get().model
    again = _reload_result(reloaded, name)
    expected_class = type(model).__name__
    assert again["class"] == expected_class
    assert again["dtype"] == "torch.float32"
    assert not any(again["loading_info"].values()), f"keys not loaded cleanly: {again['loading_info']}"
    assert again["num_hidden_layers"] == again["num_layers"] == NUM_LAYERS - 1

    ids = torch.tensor([token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        generated = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            use_cache=True,
        )[0]
    torch.testing.assert_close(torch.tensor(again["logits"]), logits, atol=LOGITS_ATOL, rtol=0)
    assert again["generated"] == generated.tolist()
    assert len(generated) > len(token_ids)


@pytest.mark.parametrize("model_type", VISION_TYPES)
def test_image_forward_matches_after_reload(pruned, reloaded, images, model_type):
    result = pruned[model_type].get()
    again = _reload_result(reloaded, model_type)
    # The processor saved with the pruned model is the one the pipeline handed back.
    assert again["processor"] == type(result.tokenizer).__name__
    inputs = result.tokenizer(images=images[model_type], text=IMAGE_PROMPT, return_tensors="pt")
    assert sorted(inputs) == sorted(again["image_inputs"])
    for key, value in inputs.items():
        torch.testing.assert_close(
            torch.tensor(again["image_inputs"][key], dtype=value.dtype), value, atol=0, rtol=0
        )
    image_token_id = result.model.config.image_token_id
    assert int((inputs["input_ids"] == image_token_id).sum()) > 1  # the processor expanded <image>
    with torch.no_grad():
        logits = result.model(**inputs).logits[0]
    torch.testing.assert_close(torch.tensor(again["image_logits"]), logits, atol=LOGITS_ATOL, rtol=0)


def test_qwen2_moe_reload_keeps_sparse_dense_mix(pruned, reloaded):
    for name in ("qwen2_moe", QWEN2_MOE_SHIFT):
        case = pruned[name]
        model = case.get().model
        adapter = get_adapter(model.config)
        flags = [adapter.is_moe_layer(layer) for layer in adapter.layers(model)]
        assert _reload_result(reloaded, name)["moe_flags"] == flags, name
    # Both cuts leave a mix that the original rule (decoder_sparse_step=2) would rebuild differently, so a
    # missing mlp_only_layers / decoder_sparse_step rewrite shows up here (and as unloaded keys).
    case = pruned[QWEN2_MOE_SHIFT]
    assert case.original_moe_flags == [False, True, False, True]
    config = tiny_config("qwen2_moe", build_tokenizer())
    stock_rule = [
        (i + 1) % config.decoder_sparse_step == 0 and i not in config.mlp_only_layers
        for i in range(NUM_LAYERS - 1)
    ]
    assert stock_rule == [False, True, False]
    assert _reload_result(reloaded, "qwen2_moe")["moe_flags"] == [False, True, True]
    assert _reload_result(reloaded, QWEN2_MOE_SHIFT)["moe_flags"] == [False, False, True]


@pytest.mark.parametrize("model_type", ["qwen2_moe", "llava_next"])
def test_in_memory_prune_matches_folder_prune(pruned, calibration_file, token_ids, model_type):
    """``prune(model, recipe, tokenizer=...)`` prunes a copy, leaves the model alone, and gives the same
    model as pruning the saved folder (same weights, same calibration)."""
    expected = pruned[model_type].get().model
    original = build_tiny_model(model_type)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    recipe = {
        "stages": [{"method": "replaceme", "num_layers": 1}],
        "calibration": _calibration(calibration_file),
    }
    result = hf_prune.prune(original, recipe, tokenizer=build_preprocessor(model_type), progress=False)
    assert result.output is None
    assert result.model is not original
    assert get_adapter(original.config).num_layers(original.config) == NUM_LAYERS
    after = original.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        got, want = (m(input_ids=ids).logits for m in (result.model, expected))
    torch.testing.assert_close(got, want, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_folded_map_realises_the_fit(pruned, calibration_file, name):
    """On the calibration tokens, the pruned model's kept-layer output misses the original output of the
    last removed layer by the error the report claims for the fitted map (not the plain layer drop's)."""
    from hf_prune.calibration import build_calibration
    from hf_prune.recipe import CalibrationConfig

    case = pruned[name]
    result = case.get()
    (cut,) = result.report["stages"][0]["cuts"]
    kept, last = cut["kept_layer"], cut["removed_layers"][-1]
    original = build_tiny_model(case.model_type)
    tokenizer = getattr(result.tokenizer, "tokenizer", result.tokenizer)
    batches = build_calibration(CalibrationConfig(**_calibration(calibration_file)), tokenizer)
    err_map = err_drop = 0.0
    for batch in batches:
        states = []
        for model in (original, result.model):
            decoder = get_adapter(model.config).decoder(model)
            with torch.no_grad():
                out = decoder(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    output_hidden_states=True,
                    use_cache=False,
                )
            states.append(out.hidden_states)  # [i + 1] is layer i's raw output (all but the last layer)
        mask = batch.attention_mask.bool()
        target = states[0][last + 1][mask].double()
        err_drop += float(((states[0][kept + 1][mask].double() - target) ** 2).sum())
        err_map += float(((states[1][kept + 1][mask].double() - target) ** 2).sum())
    claimed = cut["relative_error_with_map"] / cut["relative_error_without_map"]
    assert err_map < err_drop
    assert err_map / err_drop == pytest.approx(claimed, rel=1e-3)


# ---- MoE fold ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_moe_fold_is_exact(model_type):
    model = build_tiny_model(model_type)
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel on CPU
    adapter = get_adapter(model.config)
    layer = next(layer for layer in adapter.layers(model) if adapter.is_moe_layer(layer))
    layer = copy.deepcopy(layer).double()
    folded = copy.deepcopy(layer)
    hidden = model.config.hidden_size
    generator = torch.Generator().manual_seed(7)
    transform = torch.randn(hidden, hidden, generator=generator, dtype=torch.float64) / hidden**0.5
    x = torch.randn(3, 11, hidden, generator=generator, dtype=torch.float64)

    def run(mlp: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        seen = {}
        handle = getattr(mlp, adapter.spec.router_attr).register_forward_hook(
            lambda module, args, output: seen.setdefault("router", output)
        )
        try:
            with torch.no_grad():
                return mlp(x), seen["router"]
        finally:
            handle.remove()

    expected, router_before = run(adapter.mlp(layer))
    names = fold_linear_map_into_mlp_output(adapter, folded, transform)
    assert any("experts" in n for n in names)
    if adapter.spec.shared_expert_attr:
        assert any(adapter.spec.shared_expert_attr in n for n in names)
    actual, router_after = run(adapter.mlp(folded))
    torch.testing.assert_close(actual, expected @ transform, atol=1e-10, rtol=1e-10)

    router, router_folded = (getattr(adapter.mlp(m), adapter.spec.router_attr) for m in (layer, folded))
    torch.testing.assert_close(router_folded.weight, router.weight, atol=0, rtol=0)
    for before, after in zip(router_before, router_after, strict=True):
        torch.testing.assert_close(after, before, atol=0, rtol=0)
    if adapter.spec.shared_expert_gate_attr:
        gates = [
            getattr(adapter.mlp(m), adapter.spec.shared_expert_gate_attr).weight for m in (layer, folded)
        ]
        torch.testing.assert_close(gates[1], gates[0], atol=0, rtol=0)


# ---- refusals ------------------------------------------------------------------------------------


def test_replaceme_refuses_gemma2_before_loading_weights(tmp_path, calibration_file, monkeypatch):
    source = save_tiny_model("gemma2", tmp_path / "gemma2")

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded for a model ReplaceMe cannot prune")

    monkeypatch.setattr("hf_prune.pipeline.load_model", no_loading)
    output = tmp_path / "out" / "gemma2-pruned"
    recipe = {
        "model": str(source),
        "output": str(output),
        "stages": [{"method": "replaceme", "num_layers": 1}],
        "calibration": {"data": str(calibration_file), "num_samples": 4, "seq_len": 32},
    }
    with pytest.raises(hf_prune.UnsupportedModelError, match="post-feed-forward norm"):
        hf_prune.prune(recipe, progress=False)
    assert not output.exists()
    assert not output.parent.exists() or not any(output.parent.iterdir())
    assert isinstance(transformers.AutoConfig.from_pretrained(source), transformers.Gemma2Config)
