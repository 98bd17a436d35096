"""``heal``: LoRA fine-tune merged back into the weights. References: held-out perplexity computed by hand
from the saved checkpoint loaded with stock transformers, the source weights read from the source folder,
zero positions compared element by element, and the real stories260K after ReplaceMe."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import build_tiny_model, build_tokenizer, save_tiny_model, write_calibration_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_prune
from hf_prune.adapters import get_adapter
from hf_prune.errors import ConfigFieldError, HfPruneError, RecipeError, UnsupportedModelError
from hf_prune.methods.healing.lora_heal import HealConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEAL = {"method": "heal", "seq_len": 32, "batch_size": 8, "steps": 30, "learning_rate": 5e-3, "rank": 4}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("heal") / "llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_calibration_file(tmp_path_factory.mktemp("heal-text") / "train.txt", num_chars=16_000)


def heldout_windows_by_hand(text_path, tokenizer, seq_len, fraction=0.1):
    """The documented held-out split: paragraphs tokenized with special tokens, packed, cut into whole
    windows; the last round(fraction × count) windows."""
    windows = _windows(text_path, tokenizer, seq_len)
    count = max(1, round(len(windows) * fraction))
    return windows[-count:]


def perplexity_by_hand(model, windows):
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])
            logits = model(input_ids=ids).logits[0, :-1]
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            tokens += len(window) - 1
    return math.exp(nll / tokens)


@pytest.fixture(scope="module")
def healed(llama_folder, text_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("heal-out") / "healed"
    recipe = {
        "model": str(llama_folder),
        "output": str(output),
        "stages": [{**HEAL, "train_data": str(text_file)}],
    }
    return hf_prune.prune(recipe, progress=False)


def test_reported_perplexities_are_the_models_on_held_out_windows(healed, llama_folder, text_file):
    stage = healed.stages[0]
    tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    windows = heldout_windows_by_hand(text_file, tokenizer, HEAL["seq_len"])
    source = AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    saved = AutoModelForCausalLM.from_pretrained(healed.output).eval()
    assert stage["eval_tokens"] == sum(len(w) for w in windows)
    assert stage["perplexity_before"] == pytest.approx(perplexity_by_hand(source, windows), rel=1e-4)
    assert stage["perplexity_after"] == pytest.approx(perplexity_by_hand(saved, windows), rel=1e-4)
    assert stage["perplexity_after"] < 0.8 * stage["perplexity_before"]  # it healed something
    assert stage["train_loss_last"] < stage["train_loss_first"]


def test_output_is_a_stock_checkpoint_with_only_the_projections_changed(healed, llama_folder):
    before = load_file(llama_folder / "model.safetensors")
    after = load_file(healed.output / "model.safetensors")
    assert sorted(after) == sorted(before)  # no lora_A / base_layer keys, nothing dropped
    config = json.loads((healed.output / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "peft" not in json.dumps(config).lower()
    assert config["use_cache"] == json.loads((llama_folder / "config.json").read_text())["use_cache"] is True
    assert not (healed.output / "adapter_config.json").exists()
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == any(f".{p}." in key for p in projections), key
    reloaded = AutoModelForCausalLM.from_pretrained(healed.output).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([[1, 5, 9, 13]])
    out = reloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    torch.testing.assert_close(reloaded(ids).logits, healed.model(ids).logits, rtol=0, atol=1e-5)


def test_report_and_card_say_what_healing_did(healed):
    report = json.loads((healed.output / "hf_prune.json").read_text())
    stage = report["stages"][0]
    layers = healed.model.config.num_hidden_layers
    assert stage["method"] == "heal" and stage["adapted_modules"] == 7 * layers  # 7 projections a layer
    windows = round((stage["train_windows"] + stage["eval_tokens"] // HEAL["seq_len"]) * 0.1)
    assert stage["eval_data"] == f"train.txt (last {windows} windows, held out)"  # a name, not a path
    card = (healed.output / "README.md").read_text()
    assert f"{stage['perplexity_before']:.4g} before healing → {stage['perplexity_after']:.4g} after" in card


def test_targets_narrow_the_adapted_projections(llama_folder, text_file):
    model = AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = {"stages": [{**HEAL, "steps": 3, "train_data": str(text_file), "targets": ["q_proj"]}]}
    result = hf_prune.prune(
        model, recipe, tokenizer=AutoTokenizer.from_pretrained(llama_folder), progress=False
    )
    assert result.stages[0]["adapted_modules"] == model.config.num_hidden_layers
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, before[key]) != key.endswith("q_proj.weight"), key
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # source untouched


def sparsify_(model, sparsity=0.5):
    """Zero the smallest-magnitude half of every projection (and fused expert tensor) in the decoder
    layers, by hand."""
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if ".layers." in name and (name.endswith("proj.weight") or weight.dim() == 3):
                threshold = weight.abs().flatten().kthvalue(int(sparsity * weight.numel())).values
                weight[weight.abs() <= threshold] = 0.0
    return model


FILLED_BY_MERGE: dict[str, int] = {}


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
@pytest.mark.parametrize("keep_zeros", [True, False])
def test_sparse_weights_stay_sparse_after_merging(text_file, model_type, keep_zeros):
    tokenizer = build_tokenizer()
    model = sparsify_(build_tiny_model(model_type, tokenizer))
    zeros = {k: v == 0 for k, v in model.state_dict().items() if ".layers." in k and "proj" in k}
    assert any(k.endswith("experts.gate_up_proj") for k in zeros) == (model_type == "mixtral")
    recipe = {"stages": [{**HEAL, "steps": 3, "train_data": str(text_file), "keep_zeros": keep_zeros}]}
    result = hf_prune.prune(model, recipe, tokenizer=tokenizer, progress=False)
    after = result.model.state_dict()
    filled = sum(int((after[k] != 0)[mask].sum()) for k, mask in zeros.items())
    if keep_zeros:
        assert filled == 0
        assert all(torch.equal(after[k] == 0, mask) for k, mask in zeros.items())  # no new zeros either
        assert result.stages[0]["sparse_weights_kept"] == len(zeros)
        FILLED_BY_MERGE[model_type] = result.stages[0]["zeros_restored"]
    else:
        for key, mask in zeros.items():  # the dense delta fills every sparse tensor, fused experts too
            assert int((after[key] != 0)[mask].sum()) > 0.4 * int(mask.sum()), key
        if model_type in FILLED_BY_MERGE:  # same seed: what keep_zeros reported putting back
            assert filled == FILLED_BY_MERGE[model_type]


def test_fused_moe_experts_are_adapted_and_the_router_left_alone(text_file):
    tokenizer = build_tokenizer()
    model = build_tiny_model("mixtral", tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = {"stages": [{**HEAL, "steps": 3, "train_data": str(text_file)}]}
    result = hf_prune.prune(model, recipe, tokenizer=tokenizer, progress=False)
    after = result.model.state_dict()
    assert result.stages[0]["adapted_expert_parameters"] == 2 * len(get_adapter(model.config).layers(model))
    for key in before:
        moved = not torch.equal(before[key], after[key])
        assert moved == (key.endswith(("proj", "proj.weight")) and "gate.weight" not in key), key
    assert type(result.model).__name__ == "MixtralForCausalLM"


def test_fused_experts_refuse_lora_dropout(text_file):
    tokenizer = build_tokenizer()
    recipe = {"stages": [{**HEAL, "steps": 1, "train_data": str(text_file), "dropout": 0.1}]}
    with pytest.raises(RecipeError, match=r"heal.dropout: must be 0 when fused expert parameters"):
        hf_prune.prune(build_tiny_model("mixtral", tokenizer), recipe, tokenizer=tokenizer, progress=False)


def test_targets_matching_nothing_name_the_available_projections(text_file):
    tokenizer = build_tokenizer()
    recipe = {"stages": [{**HEAL, "steps": 1, "train_data": str(text_file), "targets": ["qkv"]}]}
    with pytest.raises(RecipeError) as err:
        hf_prune.prune(build_tiny_model("llama", tokenizer), recipe, tokenizer=tokenizer, progress=False)
    assert "heal.targets: ['qkv'] match no projection" in str(err.value)
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in str(err.value)


@pytest.mark.parametrize(
    "fields, field, words",
    [
        ({"steps": 0}, "steps", "must be a positive integer, got 0"),
        ({"rank": -1}, "rank", "must be a positive integer, got -1"),
        ({"seq_len": 1}, "seq_len", "must be at least 2, got 1"),
        ({"eval_fraction": 1.0}, "eval_fraction", "must be in (0, 1), got 1.0"),
        ({"learning_rate": 0.0}, "learning_rate", "must be positive, got 0.0"),
        ({"dropout": 1.0}, "dropout", "must be in [0, 1), got 1.0"),
        ({"targets": []}, "targets", "must be a non-empty list of names, or left out for all"),
        ({"train_data": ""}, "train_data", "must name a file or a dataset id"),
    ],
)
def test_bad_fields_are_named(fields, field, words):
    with pytest.raises(ConfigFieldError) as err:
        HealConfig(**{"train_data": "t.txt", **fields})
    assert (err.value.field, err.value.message) == (field, words)


def test_missing_training_file_is_refused_before_weights_load(llama_folder, tmp_path, monkeypatch):
    import hf_prune.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    recipe = {
        "model": str(llama_folder),
        "output": str(tmp_path / "out"),
        "stages": [{**HEAL, "train_data": str(tmp_path / "missing.txt")}],
    }
    with pytest.raises(RecipeError, match=r"stages\[0\]\.train_data: file not found: .*missing.txt"):
        hf_prune.prune(recipe, progress=False)
    assert not (tmp_path / "out").exists()


def test_encoders_and_prompt_pruned_models_are_refused():
    from transformers import BertConfig, LlamaConfig

    with pytest.raises(UnsupportedModelError, match="heal fine-tunes causal language models"):
        HealConfig(train_data="t.txt").check_model(BertConfig(), get_adapter(BertConfig()))
    config = LlamaConfig(max_position_embeddings=64)
    with pytest.raises(ConfigFieldError, match="seq_len: must be at most the model's 64 positions, got 128"):
        HealConfig(train_data="org/dataset", seq_len=128).check_model(config, get_adapter(config))
    config.token_pruning = {"algorithm": "fastv"}
    with pytest.raises(ConfigFieldError, match="heal cannot follow prompt token pruning"):
        HealConfig(train_data="t.txt").check_model(config, get_adapter(config))


def test_too_little_text_is_a_clear_error(tmp_path):
    tokenizer = build_tokenizer()
    short = tmp_path / "short.txt"
    short.write_text("a few words\n")
    recipe = {"stages": [{**HEAL, "train_data": str(short)}]}
    with pytest.raises(HfPruneError, match="too little text for one training window of seq_len=32"):
        hf_prune.prune(build_tiny_model("llama", tokenizer), recipe, tokenizer=tokenizer, progress=False)


@pytest.mark.slow
def test_non_uniform_moe_heals_and_reloads_as_remote_code(text_file, tmp_path):
    """Expert pruning leaves per-layer expert counts (``hf_prune_mixtral``, remote code); healing keeps
    that class, and the checkpoint generates the same tokens after ``import hf_prune`` and, in a process
    without hf_prune, through its remote code."""
    from fresh_process import generate_after_reload

    source = save_tiny_model("mixtral", tmp_path / "mixtral")
    recipe = {
        "model": str(source),
        "output": str(tmp_path / "healed"),
        "calibration": {"data": str(text_file), "num_samples": 8, "seq_len": 32, "packing": True},
        "stages": [
            {"method": "expert_pruning", "algorithm": "router_weight", "keep_ratio": 0.75, "uniform": False},
            {**HEAL, "steps": 3, "train_data": str(text_file)},
        ],
    }
    result = hf_prune.prune(recipe, progress=False)
    assert json.loads((result.output / "config.json").read_text())["model_type"] == "hf_prune_mixtral"
    assert type(result.model).__name__ == "HfPruneMixtralForCausalLM"
    assert result.stages[1]["adapted_expert_parameters"] == 2 * result.model.config.num_hidden_layers
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        expected = result.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )
    runs = generate_after_reload(result.output, {"input_ids": ids}, cwd=tmp_path)
    for mode in ("hf_prune", "remote"):
        assert runs[mode]["tokens"] == expected.tolist(), mode
        assert runs[mode]["class"] == "HfPruneMixtralForCausalLM"
    assert runs["remote"]["hf_prune"] is False


def test_stories260k_after_replaceme_heals_on_text_it_never_saw(shared_assets, tmp_path):
    """The real model: ReplaceMe removes 2 of 5 layers; healing on stories the unpruned model samples lowers
    the perplexity of the real TinyStories sample (never trained on), computed by hand from the saved
    checkpoint, well below the unhealed one."""
    from hf_prune.calibration import self_generated_texts

    stories = shared_assets / "models" / "stories260K"
    sample = shared_assets / "text" / "tinystories" / "sample.txt"
    tokenizer = AutoTokenizer.from_pretrained(stories)
    source = AutoModelForCausalLM.from_pretrained(stories).eval()
    texts = self_generated_texts(source, tokenizer, num_samples=64, max_new_tokens=128, seed=1, batch_size=64)
    train = tmp_path / "stories.txt"
    train.write_text("\n\n".join(t.strip().replace("\n\n", "\n") for t in texts))
    calibration = {"data": str(train), "num_samples": 32, "seq_len": 64}
    replaceme = {"method": "replaceme", "num_layers": 2}
    heal = {**HEAL, "train_data": str(train), "eval_data": str(sample), "seq_len": 64, "steps": 60}
    pruned = hf_prune.prune(
        {
            "model": str(stories),
            "output": str(tmp_path / "pruned"),
            "calibration": calibration,
            "stages": [replaceme],
        },
        progress=False,
    )
    healed = hf_prune.prune(
        {
            "model": str(stories),
            "output": str(tmp_path / "healed"),
            "calibration": calibration,
            "stages": [replaceme, heal],
        },
        progress=False,
    )
    windows = _windows(sample, tokenizer, 64)
    unhealed = perplexity_by_hand(AutoModelForCausalLM.from_pretrained(pruned.output).eval(), windows)
    after = perplexity_by_hand(AutoModelForCausalLM.from_pretrained(healed.output).eval(), windows)
    assert healed.stages[1]["perplexity_before"] == pytest.approx(unhealed, rel=1e-4)
    assert healed.stages[1]["perplexity_after"] == pytest.approx(after, rel=1e-4)
    assert after < 0.75 * unhealed
    assert after > perplexity_by_hand(source, windows)  # healing does not make up for two whole layers


def _windows(path, tokenizer, seq_len):
    paragraphs = [p for p in path.read_text().split("\n\n") if p.strip()]
    ids = [i for p in paragraphs for i in tokenizer(p, add_special_tokens=True)["input_ids"]]
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def test_held_out_split_and_counts_by_hand(healed, llama_folder, text_file):
    stage = healed.stages[0]
    tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    total = len(_windows(text_file, tokenizer, HEAL["seq_len"]))
    held_out = round(total * 0.1)
    assert (stage["train_windows"], stage["eval_tokens"]) == (total - held_out, held_out * HEAL["seq_len"])
    # LoRA on every projection: r·(in + out) parameters each, counted from the stock model's shapes.
    source = AutoModelForCausalLM.from_pretrained(llama_folder)
    expected = sum(
        HEAL["rank"] * (m.in_features + m.out_features)
        for name, m in source.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in name
    )
    assert stage["lora_parameters"] == expected
    assert stage["sparse_weights_kept"] == 0 and stage["zeros_restored"] == 0  # a dense model
    assert 0 < stage["training_seconds"] <= stage["seconds"]


def test_eval_data_file_is_scored_and_named_without_its_path(text_file, tmp_path):
    tokenizer = build_tokenizer()
    heldout = tmp_path / "sub" / "heldout.jsonl"
    heldout.parent.mkdir()
    lines = [json.dumps({"body": p}) for p in text_file.read_text().split("\n\n")[:6] if p.strip()]
    heldout.write_text("\n".join(lines) + "\n")
    recipe = {
        "stages": [
            {
                **HEAL,
                "steps": 2,
                "train_data": str(text_file),
                "eval_data": str(heldout),
                "text_field": "body",
                "max_eval_windows": 3,
            }
        ]
    }
    with pytest.raises(HfPruneError, match="no text field 'body'"):  # text_field reads both files
        hf_prune.prune(build_tiny_model("llama", tokenizer), recipe, tokenizer=tokenizer, progress=False)
    train = tmp_path / "train.jsonl"
    train.write_text(
        "\n".join(json.dumps({"body": p}) for p in text_file.read_text().split("\n\n") if p.strip())
    )
    recipe["stages"][0]["train_data"] = str(train)
    result = hf_prune.prune(build_tiny_model("llama", tokenizer), recipe, tokenizer=tokenizer, progress=False)
    stage = result.stages[0]
    ids = [
        i for line in lines for i in tokenizer(json.loads(line)["body"], add_special_tokens=True)["input_ids"]
    ]
    assert stage["eval_data"] == "heldout.jsonl"
    assert stage["eval_tokens"] == min(3, len(ids) // HEAL["seq_len"]) * HEAL["seq_len"]


def test_one_window_is_held_out_at_least(tmp_path):
    tokenizer = build_tokenizer()
    short = tmp_path / "short.txt"
    for repeats in range(1, 40):  # 2 to 4 windows: 10% of them rounds to 0, one is held out all the same
        text = " ".join(["the quick brown fox jumps over the lazy dog"] * repeats)
        if 2 <= len(tokenizer(text)["input_ids"]) // 16 <= 4:
            break
    short.write_text(text)
    recipe = {"stages": [{**HEAL, "steps": 1, "train_data": str(short), "seq_len": 16}]}
    result = hf_prune.prune(build_tiny_model("llama", tokenizer), recipe, tokenizer=tokenizer, progress=False)
    stage = result.stages[0]
    assert stage["eval_tokens"] == 16 and stage["train_windows"] >= 1
    assert stage["eval_data"] == "short.txt (last 1 windows, held out)"


def test_boundary_values_are_accepted_and_a_missing_tokenizer_named(text_file):
    HealConfig(train_data="t.txt", seq_len=2, eval_fraction=0.01)  # the smallest allowed
    with pytest.raises(ConfigFieldError, match="eval_fraction"):
        HealConfig(train_data="t.txt", eval_fraction=0.0)
    from transformers import LlamaConfig

    config = LlamaConfig(max_position_embeddings=64)
    HealConfig(train_data="org/data", seq_len=64).check_model(config, get_adapter(config))
    recipe = {"stages": [{**HEAL, "steps": 1, "train_data": str(text_file)}]}
    with pytest.raises(HfPruneError, match="heal needs a tokenizer, and none was found with the model"):
        hf_prune.prune(build_tiny_model("llama", build_tokenizer()), recipe, progress=False)
