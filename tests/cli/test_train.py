"""``hf-prune train``: a recipe with a train section fine-tunes with Trainer while a training-time method
prunes, and saves a stock checkpoint whose zeros, report and card agree; bad recipes fail before loading."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tiny_models import pydoc_text, save_tiny_model

from hf_prune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("model") / "llama")


def write_recipe(path, model, output, data, **changes):
    recipe = {
        "model": str(model),
        "output": str(output),
        "train": {
            "data": str(data),
            "max_length": 32,
            "arguments": {"max_steps": 6, "learning_rate": 1e-3, "per_device_train_batch_size": 4, "seed": 0},
        },
        "stages": [
            {"method": "gmp", "final_sparsity": 0.5, "end_step": 4, "frequency": 2, "targets": ["*mlp*"]}
        ],
        "evaluate": [{"task": "perplexity", "data": str(data), "seq_len": 32, "limit": 4}],
    }
    for key, value in changes.items():
        recipe[key] = value
    path.write_text(json.dumps(recipe))
    return path


def test_train_saves_a_sparse_stock_checkpoint(tiny_llama, tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_text(pydoc_text(6_000))
    out = tmp_path / "sparse"
    assert main(["train", str(write_recipe(tmp_path / "r.json", tiny_llama, out, data)), "--quiet"]) == 0
    assert "stage gmp: sparsity 50.0%" in capsys.readouterr().out
    weights = load_file(out / "model.safetensors")
    mlp = {n: w for n, w in weights.items() if ".mlp." in n}
    zeros, total = sum(int((w == 0).sum()) for w in mlp.values()), sum(w.numel() for w in mlp.values())
    assert zeros == round(0.5 * total)  # global magnitude at the final sparsity, in the saved file
    assert all(int((w == 0).sum()) == 0 for n, w in weights.items() if ".self_attn." in n)  # not targeted
    report = json.loads((out / "hf_prune.json").read_text())
    stage = report["stages"][0]
    assert (
        stage["method"] == "gmp" and stage["pruned_weights"] == zeros and stage["targeted_weights"] == total
    )
    assert [h["step"] for h in stage["history"]] == [2, 4]
    entry = report["evaluation"][0]
    assert entry["original"]["perplexity"] > 0 and entry["pruned"]["perplexity"] > 0
    assert "50.0% of the targeted weights are zero" in (out / "README.md").read_text()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)  # the stock class, no hf_prune code
    assert type(model).__name__ == "LlamaForCausalLM"
    source = json.loads((tiny_llama / "config.json").read_text())
    assert (
        source["use_cache"] and json.loads((out / "config.json").read_text())["use_cache"]
    )  # Trainer's False
    ids = torch.tensor([[1, 5, 9]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_train_runs_lottery_rounds(tiny_llama, tmp_path):
    data = tmp_path / "train.txt"
    data.write_text(pydoc_text(4_000))
    out = tmp_path / "ticket"
    recipe = write_recipe(
        tmp_path / "r.json",
        tiny_llama,
        out,
        data,
        evaluate=[],
        stages=[{"method": "lottery", "rounds": 2, "targets": ["*mlp*"]}],
    )
    assert main(["train", str(recipe), "--quiet"]) == 0
    stage = json.loads((out / "hf_prune.json").read_text())["stages"][0]
    assert stage["round"] == 2 and len(stage["rounds_seconds"]) == 3
    weights = load_file(out / "model.safetensors")
    mlp = [w for n, w in weights.items() if ".mlp." in n]
    zeros = sum(int((w == 0).sum()) for w in mlp)
    assert zeros == round((1 - 0.8**2) * sum(w.numel() for w in mlp))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train": None}, "train: missing"),
        (
            {"train": {"data": "x.txt", "arguments": {"max_step": 5}}},
            "train.arguments.max_step: not a transformers",
        ),
        ({"train": {"data": "missing.txt"}}, "train.data: file not found: missing.txt"),
        (
            {"train": {"data": "x.txt", "task": "classification"}},
            "train.task: classification needs a sequence",
        ),
        (
            {"train": {"data": "x.txt", "task": "regression"}},
            "train.task: must be causal_lm | classification",
        ),
        ({"stages": [{"method": "layer_drop", "num_layers": 1}]}, "not a training-time method"),
        ({"stages": [{"method": "gmp", "final_sparsity": 1.2}]}, "final_sparsity: must be in [0, 1)"),
    ],
)
def test_bad_train_recipes_fail_before_loading(tiny_llama, tmp_path, capsys, changes, message):
    (tmp_path / "x.txt").write_text(pydoc_text(2_000))
    if changes.get("train") and changes["train"]["data"] == "x.txt":
        changes["train"]["data"] = str(tmp_path / "x.txt")
    recipe = write_recipe(tmp_path / "r.json", tiny_llama, tmp_path / "out", tmp_path / "x.txt", **changes)
    assert main(["train", str(recipe)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prune_refuses_a_train_recipe(tiny_llama, tmp_path, capsys):
    (tmp_path / "x.txt").write_text(pydoc_text(2_000))
    recipe = write_recipe(tmp_path / "r.json", tiny_llama, tmp_path / "out", tmp_path / "x.txt")
    assert main(["prune", str(recipe)]) == 2
    assert (
        "a prune recipe has no train section; run the recipe with hf-prune train" in capsys.readouterr().err
    )


def test_train_a_classifier_with_granet_neurons(tmp_path):
    words = sorted(set(pydoc_text(8_000).lower().split()))[:300]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    rows = [{"text": " ".join(words[(7 * i + j) % 300] for j in range(6)), "label": i % 2} for i in range(40)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    stage = {
        "method": "granet",
        "pattern": "neurons",
        "scope": "layer",
        "final_sparsity": 0.25,
        "end_step": 4,
        "frequency": 2,
    }
    recipe = write_recipe(tmp_path / "r.json", tmp_path / "bert", out, data, evaluate=[], stages=[stage])
    assert main(["train", str(recipe), "--quiet"]) == 0
    weights = load_file(out / "model.safetensors")
    for layer in range(2):
        rows_in = weights[f"bert.encoder.layer.{layer}.intermediate.dense.weight"]
        cols_out = weights[f"bert.encoder.layer.{layer}.output.dense.weight"]
        dead = (rows_in == 0).all(dim=1)
        assert int(dead.sum()) == 16  # round(0.25 * 64) neurons per layer, whole
        assert torch.all(cols_out[:, dead] == 0)
        assert torch.all(weights[f"bert.encoder.layer.{layer}.intermediate.dense.bias"][dead] == 0)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert loaded(**tokenizer(["a b c"], return_tensors="pt")).logits.shape == (1, 2)
