"""Checkpoint directories in the official BAGEL layout: strict loading, atomic saving.

A directory holds
  llm_config.json, vit_config.json [, vae_config.json, bagel_config.json]   (BagelConfig.from_dir / save_dir)
  ema.safetensors (or model.safetensors)   the Bagel state dict, official key names; or its shards
                                           ema-00001-of-0000N.safetensors + ema.safetensors.index.json
  ae.safetensors                           the FLUX autoencoder (`encoder.*`, `decoder.*`), not part of Bagel

Loading is strict: every missing / unexpected key and every shape mismatch is collected (from the file
headers, before any data is read) and raised in one `CheckpointError` naming the file, key and shapes. The
exceptions are the two fixed sin-cos tables (`SINCOS_TABLE_KEYS`): recomputed at construction, so a file may
omit them (the official training loader drops them); when present (the release has them) they must equal the
recomputed table up to bf16 rounding and their stored values are used, so save -> load round-trips bit-exactly.

The model is built on the meta device and the file's tensors are read one at a time (bagel_ft.weights), cast to
`dtype` and moved to `device`, so loading the 7B model never initialises 14B random parameters and holds at
most one tensor beyond the loaded model.

An HF `Qwen2ForCausalLM` checkpoint maps trivially: its keys prefixed with `language_model.` are our keys
(dense `Qwen2DecoderLayer`, `qk_norm: false`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from bagel_ft.autoencoder import AutoEncoder
from bagel_ft.config import BagelConfig
from bagel_ft.embeddings import sincos_2d_table
from bagel_ft.modeling import SINCOS_TABLE_KEYS, Bagel
from bagel_ft.weights import INDEX_SUFFIX, CheckpointError, TensorSpec, WeightFiles, write_weights

MODEL_STEMS = ("ema", "model")  # first one present is loaded: STEM.safetensors or STEM.safetensors.index.json
MODEL_FILES = tuple(f"{stem}.safetensors" for stem in MODEL_STEMS)
AE_FILE = "ae.safetensors"
CONFIG_FILES = ("llm_config.json", "vit_config.json", "vae_config.json", "bagel_config.json")
SINCOS_ATOL = 1e-2  # bf16 rounding of values in [-1, 1] is <= 2**-9; a wrong table is off by O(1)


# ---- reading / checking ------------------------------------------------------------------------------


def model_weights(path: str | Path) -> WeightFiles:
    """The Bagel weights of a checkpoint directory: ema (else model) .safetensors, one file or sharded."""
    path = Path(path)
    weights = WeightFiles.find(path, MODEL_STEMS)
    if weights is None:
        raise CheckpointError(
            f"{path / MODEL_FILES[0]}: missing (a checkpoint directory holds ema.safetensors, model.safetensors, "
            f"or their shards with an index {MODEL_STEMS[0]}{INDEX_SUFFIX})"
        )
    return weights


def is_model_weight_file(name: str) -> bool:
    """Whether a file name is (a shard or index of) a Bagel weights file, e.g. when copying a directory."""
    return any(
        name in (f"{stem}.safetensors", stem + INDEX_SUFFIX)
        or (name.startswith(f"{stem}-") and name.endswith(".safetensors") and "-of-" in name)
        for stem in MODEL_STEMS
    )


def check_state_dict(
    expected: dict[str, tuple[int, ...]],
    got: dict[str, tuple[int, ...]],
    source: str,
    optional: tuple[str, ...] = (),
) -> None:
    """Raise one CheckpointError listing every missing / unexpected key and shape mismatch (shapes by key)."""
    problems = []
    for key, shape in expected.items():
        if key not in got:
            if key not in optional:
                problems.append(f"missing key {key} (expected shape {list(shape)})")
        elif tuple(got[key]) != tuple(shape):
            problems.append(f"shape mismatch {key}: expected {list(shape)}, got {list(got[key])}")
    problems += [f"unexpected key {key} (shape {list(got[key])})" for key in got if key not in expected]
    if problems:
        raise CheckpointError(
            f"{source}: does not match the model ({len(problems)} problems):\n  " + "\n  ".join(problems)
        )


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _read_all(weights: WeightFiles, dtype: torch.dtype, device) -> dict[str, Tensor]:
    """Every tensor, read one at a time and cast to dtype on device (integer tensors keep their dtype)."""
    state = {}
    for key in weights.specs:
        t = weights.read(key)
        state[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    return state


def check_sincos_table(key: str, value: Tensor, table: Tensor, source: str) -> None:
    err = (value.float().cpu() - table).abs().max().item()
    if err > SINCOS_ATOL:
        raise CheckpointError(
            f"{source}: {key} is not the 2-D sin-cos table it must be (max abs difference {err:.3g} > {SINCOS_ATOL})"
        )


def sincos_table(model: nn.Module, key: str) -> Tensor:
    """The recomputed fixed table `key` (one of SINCOS_TABLE_KEYS) of `model`'s PositionEmbedding."""
    module = model.get_submodule(key.rsplit(".", 1)[0])
    return sincos_2d_table(module.hidden_size, module.max_num_patch_per_side)


def _sincos_tables(model: Bagel, state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """The two fixed tables: the file's values if present (checked), else recomputed."""
    tables, expected = {}, model.state_dict()
    for key in SINCOS_TABLE_KEYS:
        if key not in expected:
            continue  # visual_gen / visual_und disabled
        table = sincos_table(model, key)
        if key in state:
            check_sincos_table(key, state[key], table, source)
            table = state[key]
        tables[key] = table
    return tables


# ---- public API -------------------------------------------------------------------------------------


def load_pretrained(path, dtype: torch.dtype = torch.float32, device="cpu", load_vae: bool = True) -> Bagel:
    """Build a Bagel from a checkpoint directory, strictly; attach its autoencoder when `load_vae`."""
    path = Path(path)
    config = BagelConfig.from_dir(path)
    with torch.device("meta"):
        model = Bagel(config)
    weights = model_weights(path)
    check_state_dict(expected_shapes(model), weights.shapes, str(weights.source), optional=SINCOS_TABLE_KEYS)
    state = _read_all(weights, dtype, device)
    for key, table in _sincos_tables(model, state, str(weights.source)).items():
        state[key] = table.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)  # requires_grad of the meta parameters is kept
    model.language_model.model.rotary_emb.to_empty(device=device)  # non-persistent: recomputed by its _apply
    if config.llm.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    if load_vae:
        model.attach_vae(load_autoencoder(path / AE_FILE, config, dtype, device))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a construction change that this loader does not know about
        raise CheckpointError(f"{path}: tensors left unloaded: {leftover}")
    return model


def load_autoencoder(file: Path, config: BagelConfig, dtype: torch.dtype = torch.float32, device="cpu") -> AutoEncoder:
    with torch.device("meta"):
        vae = AutoEncoder(config.vae)
    weights = WeightFiles.open(file)
    check_state_dict(expected_shapes(vae), weights.shapes, str(file))
    vae.load_state_dict(_read_all(weights, dtype, device), strict=True, assign=True)
    return vae


def save_pretrained(model: Bagel, path, dtype: torch.dtype | None = None, max_shard_bytes: int = 0) -> None:
    """Write configs + ema.safetensors (incl. the sin-cos tables, like the release) + ae.safetensors.

    `dtype` casts the Bagel weights (default: as they are); `max_shard_bytes` > 0 shards them with an index.
    Atomic (see `replacing_directory`): a crash leaves either the previous checkpoint or the new one. Other files
    of an existing `path` (e.g. tokenizer files) are carried over; stale Bagel weight files are dropped."""
    path = Path(path)
    with replacing_directory(path) as tmp:
        model.config.save_dir(tmp)
        _write_state(model.state_dict(), tmp, MODEL_STEMS[0], dtype, max_shard_bytes)
        if model.vae is not None:
            _write_state(model.vae.state_dict(), tmp, AE_FILE.removesuffix(".safetensors"))
        if path.exists():
            for item in path.iterdir():
                if item.name not in CONFIG_FILES and item.name != AE_FILE and not is_model_weight_file(item.name):
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)


def _write_state(
    state: dict[str, Tensor], directory: Path, stem: str, dtype: torch.dtype | None = None, max_shard_bytes: int = 0
) -> None:
    """Stream a state dict into STEM.safetensors (or shards), casting floating tensors to `dtype` one at a time."""

    def cast(t: Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    specs = [TensorSpec(k, tuple(t.shape), cast(t)) for k, t in state.items()]
    write_weights(directory, stem, specs, ((k, t.to(cast(t))) for k, t in state.items()), max_shard_bytes)


@contextmanager
def replacing_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `path` (renames, so a crash at any
    point leaves either the previous directory or the new one, never a mix); on error it is removed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous directory (if any) is untouched
        raise
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
