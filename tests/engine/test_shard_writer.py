"""The streaming shard writer against safetensors' own reader: several shards with an index, every dtype a
checkpoint holds, tensors split at the size limit, one tensor in memory at a time."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hf_prune.engine.writer import ShardWriter


def tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(16, 8, generator=generator),  # 512 bytes
        "b.weight": torch.randn(8, 8, generator=generator).to(torch.bfloat16),  # 128
        "c.mask": torch.rand(5, 3, generator=generator) > 0.5,  # 15: the data is not 8-byte aligned
        "d.index": torch.arange(7, dtype=torch.int64),  # 56
        "e.half": torch.randn(3, generator=generator).half(),  # 6
        "f.scalar": torch.tensor(2.5),  # 0-d
        "g.strided": torch.randn(6, 4, generator=generator).T,  # not contiguous
    }


def test_shards_index_and_values(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=600)
    expected = tensors()
    for name, tensor in expected.items():
        writer.add(name, tensor)
    names = writer.finish()
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    # a (512 bytes) fills the first shard: b would take it past 600
    assert {k for k, v in index["weight_map"].items() if v == names[0]} == {"a.weight"}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    loaded = {}
    for name in names:
        loaded.update(load_file(str(tmp_path / name)))
        with safe_open(str(tmp_path / name), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}  # what transformers checks
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "model.safetensors.index.json"])


def test_one_shard_is_model_safetensors(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add("x", torch.ones(3))
    assert writer.finish() == ["model.safetensors"]
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["x"], torch.ones(3))
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_non_finite_weights_are_refused(tmp_path):
    writer = ShardWriter(tmp_path)
    with pytest.raises(Exception, match="x holds 1 NaN/inf values"):
        writer.add("x", torch.tensor([1.0, float("nan")]))


def test_reader_reads_what_safetensors_wrote(tmp_path):
    from safetensors.torch import save_file

    from hf_prune.engine.checkpoint_files import SafetensorsReader

    expected = {**tensors(), "empty": torch.zeros(0, 4)}
    expected["g.strided"] = expected["g.strided"].contiguous()
    save_file(expected, str(tmp_path / "x.safetensors"))
    reader = SafetensorsReader()
    for name, tensor in expected.items():
        read = reader.read(str(tmp_path / "x.safetensors"), name)
        assert read.dtype == tensor.dtype and read.shape == tensor.shape and torch.equal(read, tensor), name
    data = (tmp_path / "x.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    (tmp_path / "cut.safetensors").write_bytes(data[:-4])
    with pytest.raises(OSError, match=f"{last} is cut short"):
        SafetensorsReader().read(str(tmp_path / "cut.safetensors"), last)
