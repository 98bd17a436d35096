"""Token pruning stages on ``engine: sequential``: training-free token pruning (visual: every algorithm;
causal-LM prompts: attention, random) needs no calibration, so the engine copies the weights shard by
shard under the token-pruning class; the checkpoint equals the in-memory one (files, config, remote code)
and follows a depth stage in the same recipe. What needs the whole model is refused before loading."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import shared_asset
from engine_recipes import PROMPT_RETAINER
from safetensors.torch import load_file
from tiny_models import save_tiny_model, write_calibration_file

from hf_prune import RecipeError, prune
from hf_prune.engine.layers import OffloadedModel
from hf_prune.methods.tokens.prompt_retainer_training import add_retainer_gradients
from hf_prune.methods.tokens.text_tokens import TextTokenPruningConfig, apply_prompt_token_pruning

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VISUAL = {"method": "visual_token_pruning", "algorithm": "cdpruner", "keep_ratio": 0.25}
PROMPT = {"method": "text_token_pruning", "algorithm": "attention", "layer": 1, "keep_ratio": 0.5}


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return write_calibration_file(tmp_path_factory.mktemp("data") / "calib.txt")


def recipe(model, output, stages, engine, calibration=None):
    settings = {"model": str(model), "output": str(output), "engine": engine, "stages": stages}
    if calibration is not None:
        settings["calibration"] = {
            "data": str(calibration),
            "num_samples": 8,
            "seq_len": 32,
            "batch_size": 4,
            "packing": True,
        }
    return settings


def assert_same_checkpoint(a, b):
    config_a, config_b = (json.loads((f / "config.json").read_text()) for f in (a, b))
    config_a.pop("transformers_version", None)
    config_b.pop("transformers_version", None)
    assert config_a == config_b
    assert sorted(p.name for p in a.glob("*.py")) == sorted(p.name for p in b.glob("*.py"))
    for name in (p.name for p in a.glob("*.py")):
        assert (a / name).read_text() == (b / name).read_text()
    tensors_a, tensors_b = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)


@pytest.mark.parametrize(
    ("model_type", "stages", "with_calibration"),
    [
        ("llava", [VISUAL], False),
        ("llava_next", [{**VISUAL, "algorithm": "fastv", "fastv_layer": 1}], False),
        ("llama", [PROMPT], False),
        ("llama", [{"method": "replaceme", "num_layers": 1}, PROMPT], True),
    ],
    ids=["llava-cdpruner", "llava_next-fastv", "llama-prompt", "llama-replaceme-then-prompt"],
)
def test_sequential_token_pruning_equals_in_memory(
    model_type, stages, with_calibration, calibration, tmp_path
):
    source = save_tiny_model(model_type, tmp_path / "source")
    data = calibration if with_calibration else None
    memory = prune(recipe(source, tmp_path / "memory", stages, "in_memory", data), progress=False)
    sequential = prune(recipe(source, tmp_path / "seq", stages, "sequential", data), progress=False)
    assert sequential.report["engine"]["name"] == "sequential"
    assert sequential.report["stages"][-1]["token_pruning"] == memory.report["stages"][-1]["token_pruning"]
    assert json.loads((tmp_path / "seq/config.json").read_text())["model_type"].startswith("hf_prune_")
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "seq")


def test_sequential_prompt_pruning_generates_like_in_memory(tmp_path):
    source = save_tiny_model("llama", tmp_path / "source")
    prune(recipe(source, tmp_path / "seq", [PROMPT], "sequential"), progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "seq", trust_remote_code=True).eval()
    ids = torch.tensor([[1, 7, 9, 11, 13, 17, 19, 23]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
        )
    assert out.shape == (1, 12)
    assert model.config.token_pruning["keep_ratio"] == 0.5


def test_clip_text_tower_needs_the_whole_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip").mkdir()
    source = save_tiny_model("llava", tmp_path / "source")
    stage = {**VISUAL, "text_tower": "clip"}
    with pytest.raises(
        RecipeError,
        match=r"stages\[0\].method: visual_token_pruning \(algorithm cdpruner\) has no layer-by-layer variant",
    ):
        prune(recipe(source, tmp_path / "out", [stage], "sequential"), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("algorithm", ["adtp", "fixed"])
def test_sequential_retainer_training_equals_in_memory(algorithm, calibration, tmp_path):
    """adtp / fixed train their retainer through a copy of the model read from disk module by module (a
    zero memory budget: every module), layers under activation checkpointing: the same trained retainer,
    the same copied weights, config and remote code as in memory; the report says what training did."""
    source = save_tiny_model("llama", tmp_path / "source")
    stage = {**PROMPT_RETAINER, "algorithm": algorithm, "train_data": str(calibration)}
    if algorithm == "fixed":
        stage["keep_ratio"] = 0.5
    memory = prune(recipe(source, tmp_path / "memory", [stage], "in_memory"), progress=False)
    settings = {**recipe(source, tmp_path / "seq", [stage], "sequential"), "activation_memory_gb": 0}
    sequential = prune(settings, progress=False)
    trained = sequential.report["stages"][0]["training"]
    assert trained["steps"] == 3 and trained["windows"] == memory.report["stages"][0]["training"]["windows"]
    assert trained.get("chosen_ratios") == memory.report["stages"][0]["training"].get("chosen_ratios")
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("memory", "seq"))
    assert a.keys() == b.keys() and any(k.startswith("retainer.") for k in a)
    for name in a:
        if name.startswith("retainer."):
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(a[name], b[name]), name
    a_config, b_config = (json.loads((tmp_path / n / "config.json").read_text()) for n in ("memory", "seq"))
    assert a_config == b_config and a_config["token_pruning"]["algorithm"] == algorithm
    assert a_config["use_cache"] is json.loads((source / "config.json").read_text())["use_cache"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "seq", trust_remote_code=True)
    for name, tensor in model.retainer.state_dict().items():  # the trained one, not a fresh one
        assert torch.equal(tensor, b[f"retainer.{name}"]), name


def test_checkpointed_training_reads_each_weight_only_while_it_runs(tmp_path):
    """After a training step on a model dispatched from disk, every backbone weight is back on the meta
    device (a recomputation stopped early would leave the last module of each layer holding its weight),
    the retainer has its gradient, and the source model is untouched."""
    source = save_tiny_model("llama", tmp_path / "source")
    offloaded = OffloadedModel(source, transformers.AutoModelForCausalLM, offload_folder=tmp_path / "offload")
    fields = {k: v for k, v in PROMPT_RETAINER.items() if k != "method"}
    stage = TextTokenPruningConfig(**fields, train_data="x.txt")
    with offloaded.dispatched() as model:
        apply_prompt_token_pruning(model, stage)
        ids = torch.randint(3, 60, (2, stage.max_length), generator=torch.Generator().manual_seed(0))
        runs = []
        model.model.layers[0].register_forward_pre_hook(lambda module, args: runs.append(1))
        terms = add_retainer_gradients(model, ids, stage, 0.5, checkpointed=True)
        # each forward (the student's, then ig_steps teacher ones) runs each layer again in its backward
        assert len(runs) == 2 * (1 + stage.ig_steps)
        assert torch.isfinite(terms["loss"])
        read = [
            n
            for n, p in model.named_parameters()
            if not n.startswith("retainer.") and p.device.type != "meta"
        ]
        assert read == []
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.retainer.ratio.parameters())
    assert type(offloaded.model) is transformers.LlamaForCausalLM and not hasattr(offloaded.model, "retainer")
    assert all(p.device.type == "meta" for p in offloaded.model.parameters())


def test_sequential_retainer_on_a_real_model_with_tied_embeddings(tmp_path):
    """stories260K ties its head to its embeddings (the hooks of the copy read from disk untie them): the
    sequential engine trains the retainer as in memory, and its `evaluate:` section (the pruned model
    through accelerate's disk offload) reports the in-memory perplexities."""
    model = shared_asset("models/stories260K")
    text = shared_asset("text/tinystories/sample.txt")
    assert json.loads((model / "config.json").read_text()).get("tie_word_embeddings", True)
    stage = {
        **PROMPT_RETAINER,
        "layer": 2,
        "max_length": 64,
        "continuation_length": 16,
        "train_data": str(text),
    }
    settings = {"stages": [stage], "evaluate": [{"task": "perplexity", "data": str(text), "seq_len": 128}]}
    memory = prune({**recipe(model, tmp_path / "memory", [stage], "in_memory"), **settings}, progress=False)
    sequential = prune(
        {**recipe(model, tmp_path / "seq", [stage], "sequential"), **settings, "activation_memory_gb": 0},
        progress=False,
    )
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("memory", "seq"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    for before, after in zip(memory.report["evaluation"], sequential.report["evaluation"], strict=True):
        for side in ("original", "pruned"):
            assert after[side]["perplexity"] == pytest.approx(before[side]["perplexity"], rel=1e-4)
    assert sequential.report["evaluation"][0]["pruned"]["perplexity"] > 0
