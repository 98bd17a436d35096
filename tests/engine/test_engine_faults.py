"""Faults of the sequential engine: a run killed midway and restarted gives the uninterrupted result
(reusing the checksummed activations it spilled, recomputing a damaged one); a disk too small for the
activation cache is refused before the run starts; broken checkpoint files are named before loading."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest
import torch
import transformers
from fresh_process import prune_killed
from safetensors.torch import load_file
from tiny_models import HIDDEN, build_tiny_model, build_tokenizer, save_tiny_model, write_calibration_file

from hf_prune import prune
from hf_prune.engine.activation_store import ActivationCacheWarning, DiskSpaceError
from hf_prune.errors import ModelError, RecipeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("source")
    calibration = write_calibration_file(folder / "calib.txt")
    return save_tiny_model("qwen2_moe", folder / "model"), calibration


def recipe(model, calibration, output, **extra):
    return {
        "model": str(model),
        "output": str(output),
        "engine": "sequential",
        "activation_memory_gb": 0,  # every activation goes to disk
        "calibration": {"data": str(calibration), "num_samples": 8, "seq_len": 32, "packing": True},
        "stages": [{"method": "replaceme", "num_layers": 1}],
        **extra,
    }


@pytest.mark.slow  # a fresh process
def test_killed_run_restarts_to_the_same_result(source, tmp_path):
    model, calibration = source
    uninterrupted = prune(recipe(model, calibration, tmp_path / "reference"), progress=False)
    output = tmp_path / "out"
    settings = recipe(model, calibration, output)
    killed = prune_killed(settings, 6)
    assert killed.returncode == 137, killed.stderr.decode()[-2000:]
    assert not output.exists()
    cache = tmp_path / ".out.activations"
    spilled = sorted(p.name for p in cache.glob("*.safetensors"))
    assert spilled and len(spilled) == 6  # h-1, then h0/m0, h1/m1, h2: layer 2's MLP output never came
    # Damage one finished entry: the restart must notice and recompute it, not read it.
    damaged = cache / "h1.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.warns(ActivationCacheWarning, match="h1.safetensors: its checksum does not match"):
        restarted = prune(settings, progress=False)
    assert restarted.report["stages"][0]["activations"]["reused_after_restart"] == ["layer 0"]
    reference, result = (
        load_file(str(tmp_path / "reference/model.safetensors")),
        load_file(str(output / "model.safetensors")),
    )
    assert reference.keys() == result.keys()
    for name in reference:
        assert torch.equal(reference[name], result[name]), name
    assert not cache.exists()
    assert (
        restarted.report["stages"][0]["removed_layers"] == uninterrupted.report["stages"][0]["removed_layers"]
    )


@pytest.mark.slow  # a fresh process
def test_a_changed_recipe_does_not_reuse_the_cache(source, tmp_path):
    model, calibration = source
    settings = recipe(model, calibration, tmp_path / "out")
    assert prune_killed(settings, 4).returncode == 137
    changed = recipe(model, calibration, tmp_path / "out", stages=[{"method": "replaceme", "num_layers": 2}])
    result = prune(changed, progress=False)
    assert result.report["stages"][0]["activations"]["reused_after_restart"] == []


def test_too_small_a_disk_is_refused_before_the_run(source, tmp_path, monkeypatch):
    model, calibration = source
    usage = namedtuple("usage", "total used free")
    small_disk = tmp_path / "small-disk"
    small_disk.mkdir()
    real = shutil.disk_usage

    def disk_usage(path):  # 1000 bytes free on the small disk only
        return usage(10**6, 0, 1000) if str(path).startswith(str(small_disk)) else real(path)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)

    def never(*args, **kwargs):
        raise AssertionError("the model was opened before the disk check")

    monkeypatch.setattr("hf_prune.engine.sequential.OffloadedModel", never)
    # Every layer's output and MLP output plus the embeddings, float32: (2·4 + 1) · 8 sequences · 32 tokens · 32.
    needed = (2 * 4 + 1) * 8 * 32 * HIDDEN * 4
    with pytest.raises(
        DiskSpaceError, match=rf"activations need {needed / 1000:.1f} kB on disk in .*1\.0 kB free"
    ):
        prune(
            recipe(model, calibration, tmp_path / "out", activation_cache=str(small_disk / "cache")),
            progress=False,
        )
    assert not (tmp_path / "out").exists() and not (small_disk / "cache").exists()


@pytest.fixture
def sharded(tmp_path):
    tokenizer = build_tokenizer()
    model = build_tiny_model("llama", tokenizer)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="40KB")
    tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder, write_calibration_file(tmp_path / "calib.txt")


def test_sharded_source_prunes_like_in_memory(sharded, tmp_path):
    folder, calibration = sharded
    prune(recipe(folder, calibration, tmp_path / "seq"), progress=False)
    prune({**recipe(folder, calibration, tmp_path / "mem"), "engine": "in_memory"}, progress=False)
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "seq").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mem").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b) and a.keys() == b.keys()


def test_missing_shard_is_named(sharded, tmp_path):
    folder, calibration = sharded
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(
        ModelError, match=rf"shard {shard.name} is missing \(the index names it for \d+ tensor"
    ):
        prune(recipe(folder, calibration, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_broken_index_is_named(sharded, tmp_path):
    folder, calibration = sharded
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    with pytest.raises(ModelError, match="model.safetensors.index.json: not a valid safetensors index"):
        prune(recipe(folder, calibration, tmp_path / "out"), progress=False)
    first = sorted(folder.glob("model-*.safetensors"))[0].name
    index = {"weight_map": {"model.embed_tokens.weight": first, "ghost": first}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="does not hold, e.g. ghost"):
        prune(recipe(folder, calibration, tmp_path / "out"), progress=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"engine": "fast"}, "engine: must be one of auto, in_memory, sequential, got 'fast'"),
        ({"activation_memory_gb": -1}, "activation_memory_gb: must be a number >= 0, got -1"),
        (
            {
                "stages": [
                    {"method": "replaceme", "num_layers": 1},
                    {"method": "heal", "steps": 1, "train_data": "x.txt"},  # made absolute below
                ]
            },
            r"stages\[1\].method: heal has no layer-by-layer variant",
        ),
    ],
)
def test_what_the_sequential_engine_refuses(change, message, source, tmp_path):
    model, calibration = source
    (tmp_path / "x.txt").write_text("hello world\n")
    settings = {**recipe(model, calibration, tmp_path / "out"), **change}
    for stage in settings["stages"]:
        if "train_data" in stage:
            stage["train_data"] = str(tmp_path / stage["train_data"])
    with pytest.raises((RecipeError, ModelError), match=message):
        prune(settings, progress=False)
