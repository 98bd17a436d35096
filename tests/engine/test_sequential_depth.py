"""``engine: sequential`` against the in-memory path: the same pruned weights and config for ReplaceMe and
layer_drop on tiny models of every supported family, with activations in memory or spilled to disk; the
one-pass cut choice by residual against a brute-force least-squares fit of every candidate."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tiny_models import (
    HIDDEN,
    TEXT_TYPES,
    build_tokenizer,
    damp_layer_,
    randomize_,
    save_tiny_model,
    write_calibration_file,
)

from hf_prune import prune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIBRATION = {"num_samples": 8, "seq_len": 32, "batch_size": 4}


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return write_calibration_file(tmp_path_factory.mktemp("data") / "calib.txt")


def run(model, output, calibration, stage, engine, **extra):
    recipe = {
        "model": str(model),
        "output": str(output),
        "engine": engine,
        "calibration": {"data": str(calibration), **CALIBRATION},
        "stages": [stage],
        **extra,
    }
    return prune(recipe, progress=False)


def saved(folder, vision=False):
    auto = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(folder).eval()
    return model, json.loads((folder / "config.json").read_text())


def assert_same_checkpoints(a, b, vision=False):
    model_a, config_a = saved(a, vision)
    model_b, config_b = saved(b, vision)
    for key in ("transformers_version", "dtype"):
        config_a.pop(key, None), config_b.pop(key, None)
    assert config_a == config_b
    files_a, files_b = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert files_a.keys() == files_b.keys()  # the layout save_pretrained writes (per-expert MoE keys)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=0, atol=1e-6, msg=name)
    return model_b


@pytest.mark.parametrize("model_type", [*TEXT_TYPES, "llava", "llava_next"])
def test_replaceme_sequential_equals_in_memory(model_type, calibration, tmp_path):
    source = save_tiny_model(model_type, tmp_path / "source")
    stage = {"method": "replaceme", "num_layers": 1}
    memory = run(source, tmp_path / "memory", calibration, stage, "in_memory")
    # activation_memory_gb 0: every activation goes through the checksummed files on disk
    sequential = run(
        source, tmp_path / "sequential", calibration, stage, "sequential", activation_memory_gb=0
    )
    report = sequential.report
    assert report["engine"]["name"] == "sequential" and report["stages"][0]["engine"] == "sequential"
    assert memory.report["stages"][0]["engine"] == "in_memory"
    assert report["stages"][0]["activations"]["spilled_bytes"] > 0
    assert report["stages"][0]["removed_layers"] == memory.report["stages"][0]["removed_layers"]
    assert report["params_after"] == memory.report["params_after"]
    model = assert_same_checkpoints(
        tmp_path / "memory", tmp_path / "sequential", vision=model_type.startswith("llava")
    )
    assert not (tmp_path / ".sequential.activations").exists()  # the cache goes after a successful run
    if not model_type.startswith("llava"):
        ids = torch.tensor([[1, 5, 9, 4]])
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


@pytest.mark.parametrize(
    "stage",
    [
        {"method": "layer_drop", "num_layers": 2},
        {"method": "layer_drop", "layers": [1, 2]},
        {"method": "replaceme", "layers": [1, 2], "estimator": "cosine", "epochs": 2},
        {"method": "replaceme", "num_layers": 2, "distance_tokens": "all", "ridge": 1e-3},
    ],
    ids=["drop", "drop-explicit", "cosine-explicit", "all-tokens"],
)
def test_other_depth_settings_match(stage, calibration, tmp_path):
    source = save_tiny_model("qwen2_moe", tmp_path / "source")  # mixed dense / MoE layers, layer_types
    run(source, tmp_path / "memory", calibration, stage, "in_memory")
    run(source, tmp_path / "sequential", calibration, stage, "sequential")
    assert_same_checkpoints(tmp_path / "memory", tmp_path / "sequential")


@pytest.fixture(scope="module")
def eight_layer_llama(tmp_path_factory):
    """Layers 2 and 5 nearly the identity: two cuts of one layer that do not touch, so the second map is
    fitted on the model the first cut left (the layers between them run again)."""
    tokenizer = build_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = randomize_(transformers.LlamaForCausalLM(config))
    for index in (2, 5):
        damp_layer_(model.model.layers[index])
    folder = tmp_path_factory.mktemp("llama8") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_two_separate_cuts_match(eight_layer_llama, calibration, tmp_path):
    stage = {"method": "replaceme", "num_layers": 2, "num_cuts": 2}
    memory = run(eight_layer_llama, tmp_path / "memory", calibration, stage, "in_memory")
    sequential = run(eight_layer_llama, tmp_path / "sequential", calibration, stage, "sequential")
    cuts = sequential.report["stages"][0]["cuts"]
    assert [c["removed_layers"] for c in cuts] == [[2], [5]]
    assert cuts == memory.report["stages"][0]["cuts"]
    assert_same_checkpoints(tmp_path / "memory", tmp_path / "sequential")


def _layer_activations(model, batches):
    """Per layer: outputs h and MLP outputs M of the stock model on the real tokens, by forward hooks."""
    layers = model.model.layers
    h = [[] for _ in layers]
    m = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(lambda mod, a, out, i=i: h[i].append(out)))
        hooks.append(layer.mlp.register_forward_hook(lambda mod, a, out, i=i: m[i].append(out)))
    with torch.no_grad():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    return h, m


def test_residual_cut_selection_picks_the_lowest_held_out_residual(eight_layer_llama, calibration, tmp_path):
    stage = {"method": "replaceme", "num_layers": 1, "cut_selection": "residual"}
    result = run(eight_layer_llama, tmp_path / "out", calibration, stage, "sequential")
    stage_report = result.report["stages"][0]
    # Brute force: every candidate start l, T by torch.linalg.lstsq on 4 of 5 real tokens, residual on the fifth.
    from hf_prune.calibration import build_calibration
    from hf_prune.recipe import CalibrationConfig

    tokenizer = transformers.AutoTokenizer.from_pretrained(eight_layer_llama)
    batches = build_calibration(CalibrationConfig(data=str(calibration), **CALIBRATION), tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(eight_layer_llama).eval()
    h, m = _layer_activations(model, [(b.input_ids, b.attention_mask) for b in batches])
    expected = []
    for start in range(7):
        rows = {"fit": ([], []), "held": ([], [])}
        for b, batch in enumerate(batches):
            mask = batch.attention_mask.bool()
            mlp, out, target = (
                m[start][b][mask].double(),
                h[start][b][mask].double(),
                h[start + 1][b][mask].double(),
            )
            residual = target - (out - mlp)
            held = torch.arange(mlp.shape[0]) % 5 == 4
            rows["fit"][0].append(mlp[~held]), rows["fit"][1].append(residual[~held])
            rows["held"][0].append(mlp[held]), rows["held"][1].append(residual[held])
        x, y = (torch.cat(v) for v in rows["fit"])
        transform = torch.linalg.lstsq(x, y).solution
        hx, hy = (torch.cat(v) for v in rows["held"])
        expected.append(float(((hx @ transform - hy) ** 2).sum() / (hy**2).sum()))
    assert stage_report["candidate_residuals"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    best = min(range(7), key=expected.__getitem__)
    assert stage_report["removed_layers"] == [best + 1]
    # The in-memory engine picks the same cut and the same folded weights.
    run(eight_layer_llama, tmp_path / "memory", calibration, stage, "in_memory")
    assert_same_checkpoints(tmp_path / "memory", tmp_path / "out")


def test_auto_goes_sequential_only_when_the_weights_do_not_fit(calibration, tmp_path, monkeypatch, capsys):
    from hf_prune.cli import main

    source = save_tiny_model("llama", tmp_path / "source")
    stage = {"method": "layer_drop", "num_layers": 1}
    roomy = run(source, tmp_path / "roomy", calibration, stage, "auto")
    assert roomy.report["engine"]["name"] == "in_memory" and "fit in" in roomy.report["engine"]["why"]
    weights = (source / "model.safetensors").stat().st_size
    # Available memory below 2.5 × the weight files: the layer-by-layer engine, said so by the CLI.
    monkeypatch.setattr("hf_prune.engine.sequential.available_memory", lambda: 2 * weights)
    recipe = tmp_path / "recipe.json"
    settings = {"model": str(source), "output": str(tmp_path / "tight"), "stages": [stage]}
    settings["calibration"] = {"data": str(calibration), **CALIBRATION}
    recipe.write_text(json.dumps(settings))
    assert main(["prune", str(recipe), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert (
        f"engine: sequential (weights {weights / 1000:.1f} kB × 2.5 > {2 * weights / 1000:.1f} kB available)"
        in printed
    )
    assert json.loads((tmp_path / "tight/hf_prune.json").read_text())["engine"]["name"] == "sequential"
    assert_same_checkpoints(tmp_path / "roomy", tmp_path / "tight")


def test_loss_cut_selection_against_each_cut_made_by_hand(eight_layer_llama, calibration, tmp_path):
    """``cut_selection: loss``: for every candidate, T by torch.linalg.lstsq on the batches kept for fitting,
    folded into a copy of the stock model by hand, the block deleted, the stock forward's loss on every
    5th batch; the engines must report those losses and remove the block with the lowest."""
    import copy

    from hf_prune.calibration import build_calibration
    from hf_prune.recipe import CalibrationConfig

    settings = {"num_samples": 10, "seq_len": 32, "batch_size": 1}  # batches 4 and 9 are held out
    stage = {"method": "replaceme", "num_layers": 1, "cut_selection": "loss"}
    recipe = {
        "model": str(eight_layer_llama),
        "output": str(tmp_path / "seq"),
        "engine": "sequential",
        "calibration": {"data": str(calibration), **settings},
        "stages": [stage],
    }
    report = prune(recipe, progress=False).report["stages"][0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(eight_layer_llama)
    batches = build_calibration(CalibrationConfig(data=str(calibration), **settings), tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(eight_layer_llama).eval()
    h, m = _layer_activations(model, [(b.input_ids, b.attention_mask) for b in batches])
    held = [4, 9]
    expected = []
    for start in range(7):
        x, y = [], []
        for b, batch in enumerate(batches):
            if b in held:
                continue
            mask = batch.attention_mask.bool()
            mlp, out, target = (
                m[start][b][mask].double(),
                h[start][b][mask].double(),
                h[start + 1][b][mask].double(),
            )
            x.append(mlp), y.append(target - (out - mlp))
        transform = torch.linalg.lstsq(torch.cat(x), torch.cat(y)).solution
        pruned = copy.deepcopy(model)
        with torch.no_grad():
            down = pruned.model.layers[start].mlp.down_proj.weight
            down.copy_((transform.T @ down.double()).float())
        pruned.model.layers = torch.nn.ModuleList(
            [x for i, x in enumerate(pruned.model.layers) if i != start + 1]
        )
        pruned.config.num_hidden_layers = 7
        loss, tokens = 0.0, 0
        with torch.no_grad():
            for b in held:
                ids, mask = batches[b].input_ids, batches[b].attention_mask
                labels = ids.masked_fill(mask == 0, -100)
                out = pruned(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
                scored = int(mask[:, 1:].sum())
                loss, tokens = loss + float(out.loss) * scored, tokens + scored
        expected.append(loss / tokens)
    assert report["candidate_losses"] == pytest.approx(expected, rel=1e-4)
    assert report["removed_layers"] == [min(range(7), key=expected.__getitem__) + 1]
    memory = prune({**recipe, "engine": "in_memory", "output": str(tmp_path / "mem")}, progress=False)
    assert memory.report["stages"][0]["candidate_losses"] == report["candidate_losses"]
    assert_same_checkpoints(tmp_path / "mem", tmp_path / "seq")


def test_loss_cut_selection_needs_a_held_out_batch(eight_layer_llama, calibration, tmp_path):
    stage = {"method": "replaceme", "num_layers": 1, "cut_selection": "loss"}
    with pytest.raises(Exception, match="holds out every 5th calibration batch, and there are 2"):
        run(eight_layer_llama, tmp_path / "out", calibration, stage, "sequential")


def test_two_stages_run_in_turn_like_in_memory(calibration, tmp_path):
    """ReplaceMe, then expert pruning with per-layer counts on what it left: the second stage opens the
    checkpoint the first wrote into the cache folder, and nothing of the cache is left after."""
    source = save_tiny_model("qwen2_moe", tmp_path / "source")
    stages = [
        {"method": "replaceme", "num_layers": 1},
        {"method": "expert_pruning", "algorithm": "frequency", "keep_ratio": 0.75, "uniform": False},
    ]
    recipe = {
        "model": str(source),
        "calibration": {"data": str(calibration), **CALIBRATION},
        "stages": stages,
    }
    memory = prune({**recipe, "output": str(tmp_path / "memory"), "engine": "in_memory"}, progress=False)
    sequential = prune({**recipe, "output": str(tmp_path / "seq"), "engine": "sequential"}, progress=False)
    one, two = memory.report["stages"], sequential.report["stages"]
    assert [s["method"] for s in two] == ["replaceme", "expert_pruning"]
    assert two[0]["removed_layers"] == one[0]["removed_layers"]
    assert [x["kept"] for x in two[1]["layers"]] == [x["kept"] for x in one[1]["layers"]]
    assert sequential.report["params_after"] == memory.report["params_after"] == two[1]["params_after"]
    assert_same_checkpoints(tmp_path / "memory", tmp_path / "seq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "seq", "source"]  # no cache left
