"""Weight files (safetensors): lazy slice reads, streamed writes, one file or shards with an index.

A state dict lives in one file `STEM.safetensors`, or in shards `STEM-00001-of-00003.safetensors` listed by
`STEM.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {key: shard file}}: the
Hugging Face layout that accelerate's `load_checkpoint_and_dispatch` and transformers read).

Reading never loads a whole file: `WeightFiles` parses the headers only (names, shapes, dtypes), and
`read(key, index)` returns one tensor, or just `tensor[index]`, as safetensors hands it out: a view of its memory
map of the file, so bytes are read from disk only where they are used (copied into a rank's shard, cast) and
the mapping lives as long as the tensor. A process thus holds what it keeps, never a whole state dict.

Writing streams: `write_weights` plans the files from the tensors' shapes and dtypes, writes each header
first, then appends each tensor's bytes as it arrives from an iterator, so the writer never holds more than the
tensor it is writing (`safetensors.torch.save_file` needs the whole state dict at once). The bytes are the
format `save_file` writes (8-byte little-endian header length, JSON header padded to 8 bytes, raw
little-endian data in header order), read back with `safe_open`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

INDEX_SUFFIX = ".safetensors.index.json"
ALIGNMENT = 8  # header padding (bytes), as safetensors writes it

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not match the model; the message says where."""


@dataclass(frozen=True)
class TensorSpec:
    """What a file's header says about one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# ---- reading ------------------------------------------------------------------------------------------


class WeightFiles:
    """The tensors of one state dict stored in a safetensors file or in shards listed by an index."""

    def __init__(self, source: Path, specs: dict[str, TensorSpec], file_of: dict[str, Path]):
        self.source = source  # the file, or the index of the shards (named in errors)
        self.specs = specs
        self.file_of = file_of

    @classmethod
    def find(cls, directory: str | Path, stems: tuple[str, ...]) -> WeightFiles | None:
        """The first of `STEM.safetensors` / `STEM.safetensors.index.json` present in `directory`, by stem."""
        directory = Path(directory)
        for stem in stems:
            for name in (f"{stem}.safetensors", stem + INDEX_SUFFIX):
                if (directory / name).is_file():
                    return cls.open(directory / name)
        return None

    @classmethod
    def open(cls, path: str | Path) -> WeightFiles:
        """A safetensors file, or an index of shards (`*.safetensors.index.json`)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if not path.name.endswith(INDEX_SUFFIX):
            specs = _read_header(path)
            return cls(path, specs, {name: path for name in specs})
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a safetensors index (expected JSON with a 'weight_map'): {e}") from e
        specs, file_of = {}, {}
        for shard in sorted(set(weight_map.values())):
            shard_specs = _read_header(path.parent / shard)
            listed = {key for key, file in weight_map.items() if file == shard}
            if listed != set(shard_specs):
                raise CheckpointError(
                    f"{path}: the index lists {sorted(listed - set(shard_specs))[:5]} in {shard}, which holds "
                    f"{sorted(set(shard_specs) - listed)[:5]} instead (index and shards do not match)"
                )
            specs.update(shard_specs)
            file_of.update(dict.fromkeys(shard_specs, path.parent / shard))
        return cls(path, {key: specs[key] for key in weight_map}, file_of)

    @property
    def files(self) -> list[Path]:
        """Every file of this state dict (the index last)."""
        shards = sorted(set(self.file_of.values()))
        return shards + ([self.source] if self.source not in shards else [])

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: spec.shape for name, spec in self.specs.items()}

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs.values())

    def dtype(self) -> torch.dtype:
        """The dtype holding most of the floating-point bytes (bf16 for the release)."""
        by_dtype: dict[torch.dtype, int] = {}
        for spec in self.specs.values():
            if spec.dtype.is_floating_point:
                by_dtype[spec.dtype] = by_dtype.get(spec.dtype, 0) + spec.nbytes
        return max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> Tensor:
        """Tensor `name` (in its file dtype), or just `tensor[index]`, backed by the memory-mapped file."""
        from safetensors import safe_open

        file = self.file_of[name]
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(name) if index is None else f.get_slice(name)[index]
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: cannot read tensor {name}: {e}") from e


def _read_header(file: Path) -> dict[str, TensorSpec]:
    from safetensors import safe_open

    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        with safe_open(str(file), framework="pt") as f:
            specs = {}
            for name in f.keys():
                sl = f.get_slice(name)
                specs[name] = TensorSpec(name, tuple(sl.get_shape()), DTYPES_BY_NAME[sl.get_dtype()])
            return specs
    except Exception as e:  # bad headers / short files raise safetensors' own error types
        raise CheckpointError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from e


# ---- writing ------------------------------------------------------------------------------------------


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most `max_shard_bytes` (0 = one file); a larger tensor gets a shard alone."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if max_shard_bytes > 0 and shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(stem: str, count: int) -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_weights(
    directory: str | Path,
    stem: str,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, Tensor]],
    max_shard_bytes: int = 0,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write `tensors` (name, tensor), which must arrive in `specs` order with the specs' shapes and dtypes,
    as `STEM.safetensors` or as shards + `STEM.safetensors.index.json`; each file is fsynced. Returns the files."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; this writer runs on little-endian hosts only")
    directory = Path(directory)
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(stem, len(shards))
    stream: Iterator[tuple[str, Tensor]] = iter(tensors)
    written = []
    for name, shard in zip(names, shards, strict=True):
        with open(directory / name, "wb") as f:
            f.write(_header(shard, {"format": "pt", **(metadata or {})}))
            for spec in shard:
                got_name, tensor = next(stream, (None, None))
                _check_arrival(spec, got_name, tensor)
                f.write(_raw_bytes(tensor))
            f.flush()
            os.fsync(f.fileno())
        written.append(directory / name)
    extra = next(stream, None)
    if extra is not None:
        raise ValueError(f"write_weights: got tensor {extra[0]!r} after the last planned one")
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {spec.name: name for name, shard in zip(names, shards, strict=True) for spec in shard},
        }
        (directory / (stem + INDEX_SUFFIX)).write_text(json.dumps(index, indent=2) + "\n")
        written.append(directory / (stem + INDEX_SUFFIX))
    return written


def _header(shard: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for spec in shard:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % ALIGNMENT)
    return len(text).to_bytes(8, "little") + text


def _check_arrival(spec: TensorSpec, name: str | None, tensor: Tensor | None) -> None:
    if name is None:
        raise ValueError(f"write_weights: the tensors ended before {spec.name!r}")
    if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        got = f"{name!r} {list(tensor.shape)} {tensor.dtype}"
        raise ValueError(f"write_weights: expected {spec.name!r} {list(spec.shape)} {spec.dtype}, got {got}")


def _raw_bytes(tensor: Tensor):
    """The tensor's bytes as a buffer (a view, no copy, for a contiguous CPU tensor)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""
