"""Weight files: the streamed writer's files read back with safetensors itself, shards + index, lazy slice reads,
and the errors that name the file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bagel_ft.weights import CheckpointError, TensorSpec, WeightFiles, plan_shards, write_weights


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(3, generator=g),
        "c.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.flag": torch.tensor([True, False, True]),
        "e.empty": torch.zeros(0, 4),
        "f.big": torch.randn(40, 8, generator=g).half(),
    }


def _specs(state):
    return [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()]


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    state = _state()
    files = write_weights(tmp_path, "ema", _specs(state), iter(state.items()), metadata={"note": "x"})
    assert [f.name for f in files] == ["ema.safetensors"]
    back = load_file(str(files[0]))
    assert list(back) == list(state)  # header order = write order
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(files[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    header_len = int.from_bytes(files[0].read_bytes()[:8], "little")
    assert header_len % 8 == 0  # padded like safetensors' own writer


def test_shards_with_an_index(tmp_path):
    state = _state()
    specs = _specs(state)
    limit = 200
    shards = plan_shards(specs, limit)
    assert len(shards) > 1 and [s.name for shard in shards for s in shard] == list(state)
    assert all(sum(s.nbytes for s in shard) <= limit or len(shard) == 1 for shard in shards)
    files = write_weights(tmp_path, "ema", specs, iter(state.items()), max_shard_bytes=limit)
    index = json.loads((tmp_path / "ema.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    assert sorted(set(index["weight_map"].values())) == sorted(f.name for f in files[:-1])
    assert files[0].name == f"ema-00001-of-{len(shards):05d}.safetensors"
    weights = WeightFiles.find(tmp_path, ("ema",))
    assert weights.source.name == "ema.safetensors.index.json" and list(weights.specs) == list(state)
    for k, v in state.items():
        assert torch.equal(weights.read(k), v), k


def test_lazy_slices_and_dtype(tmp_path):
    state = _state()
    save_file(state, str(tmp_path / "model.safetensors"))  # written by safetensors itself
    weights = WeightFiles.find(tmp_path, ("ema", "model"))
    assert weights.shapes["a.weight"] == (7, 5) and weights.specs["f.big"].dtype == torch.float16
    assert torch.equal(weights.read("a.weight", (slice(2, 5),)), state["a.weight"][2:5])
    assert torch.equal(weights.read("f.big", (slice(None), slice(3, 8))), state["f.big"][:, 3:8])
    assert weights.dtype() == torch.float16  # the floating dtype holding most bytes
    assert weights.nbytes == sum(v.numel() * v.element_size() for v in state.values())


def test_the_writer_refuses_what_the_plan_does_not_say(tmp_path):
    state = _state()
    specs = _specs(state)
    wrong_order = iter(reversed(list(state.items())))
    with pytest.raises(ValueError, match="expected 'a.weight'"):
        write_weights(tmp_path, "x", specs, wrong_order)
    with pytest.raises(ValueError, match="ended before 'f.big'"):
        write_weights(tmp_path, "y", specs, iter(list(state.items())[:-1]))
    cast = iter([(k, v.float()) if k == "a.weight" else (k, v) for k, v in state.items()])
    with pytest.raises(ValueError, match=r"torch.bfloat16, got 'a.weight' \[7, 5\] torch.float32"):
        write_weights(tmp_path, "z", specs, cast)


def test_index_and_shard_mismatch_is_named(tmp_path):
    state = _state()
    first = write_weights(tmp_path, "ema", _specs(state), iter(state.items()), max_shard_bytes=200)[0]
    index_file = tmp_path / "ema.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["a.weight"] = index["weight_map"]["f.big"]  # listed in the wrong shard
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index and shards do not match"):
        WeightFiles.open(index_file)
    index_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        WeightFiles.open(index_file)
    first.unlink()
    index_file.write_text(json.dumps({"weight_map": {"a.weight": first.name}}))
    with pytest.raises(CheckpointError, match=f"{first.name}: missing"):
        WeightFiles.open(index_file)
