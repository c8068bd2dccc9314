"""Where the model to train comes from, without a full copy of the weights per process.

  model.init=random            built on every rank from the run seed (tiny models, tests): identical weights
  pretrained, sharding=fsdp    a meta-device skeleton, checked against the file headers; `prepare_model` shards
                               it (FSDP2 on meta) and then `load_sharded_` gives each rank its shards: the rank
                               reads from the safetensors files only the rows its shard of each tensor holds
                               (`WeightFiles.read(key, index)`), one tensor at a time, straight into the shard.
                               Host memory per rank: one slice (+ its shards when training on CPU).
  pretrained, none / zero2     every rank holds every weight anyway: `Bagel.from_pretrained` onto the rank's
  / zero3                      device, one tensor at a time (host memory: one tensor), in bf16 for a DeepSpeed
                               bf16 run (DeepSpeed casts the module to bf16 and keeps fp32 masters of those
                               values anyway: the same numbers, half the memory). ZeRO-3 then partitions it;
                               each GPU holds a whole bf16 copy until then (29 GB at 7B; `deepspeed.zero.Init`
                               would avoid it, not done).

A full state dict is never read: the official trainer's users run out of host memory when 8 ranks each load
the 29 GB release (bf16) and cast it to float32. `benchmarks/load_rss.py` measures the per-rank peak.

Tensors the checkpoint does not hold get their construction values, computed in full on every rank (the same
on every rank) and sliced: the fixed sin-cos tables (recomputed; checked when the file has them) and LoRA
adapters (A kaiming-uniform from a generator seeded by run seed and name, B zero).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from bagel_ft.autoencoder import AutoEncoder
from bagel_ft.checkpoint import (
    AE_FILE,
    CheckpointError,
    check_sincos_table,
    check_state_dict,
    expected_shapes,
    load_autoencoder,
    model_weights,
    sincos_table,
)
from bagel_ft.config import BagelConfig, ConfigError
from bagel_ft.modeling import SINCOS_TABLE_KEYS, Bagel
from training.config import Config
from training.lora import initial_adapter_weight
from training.optim import clean_name


def checkpoint_path(cfg: Config) -> Path:
    path = Path(cfg.model.path)
    if not path.is_dir():
        raise ConfigError(
            f"model.path: expected a checkpoint directory (official layout), got {str(path)!r}, which "
            "does not exist. To start from random weights set model.init: random explicitly."
        )
    return path


def model_config(cfg: Config) -> BagelConfig:
    """The architecture trained: model.path's config files (or model.preset), model.timestep_shift applied."""
    mcfg = (
        BagelConfig.preset(cfg.model.preset)
        if cfg.model.init == "random"
        else BagelConfig.from_dir(checkpoint_path(cfg))
    )
    if cfg.model.timestep_shift is not None:
        mcfg.arch.timestep_shift = cfg.model.timestep_shift
    return mcfg


def sharded_loading(cfg: Config) -> bool:
    """Whether `build_model` returns a meta-device skeleton that each rank fills with its shards only."""
    return cfg.model.init == "pretrained" and cfg.train.sharding == "fsdp"


def build_model(cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32) -> Bagel:
    """The model to train with its VAE attached (see the module doc for where the weights come from); `dtype`:
    the weights' dtype when every rank loads all of them (FSDP shards and random init are float32)."""
    mcfg = model_config(cfg)
    if cfg.model.init == "random":
        torch.manual_seed(cfg.run.seed)  # identical weights on every rank
        return Bagel(mcfg).attach_vae(AutoEncoder(mcfg.vae))
    path = checkpoint_path(cfg)
    if not sharded_loading(cfg):
        model = Bagel.from_pretrained(path, dtype=dtype, device=device, load_vae=False)
        model.config.arch.timestep_shift = mcfg.arch.timestep_shift
        return model.attach_vae(load_autoencoder(path / AE_FILE, mcfg, device=device))  # float32, never trained
    with torch.device("meta"):
        model = Bagel(mcfg)
    weights = model_weights(path)
    check_state_dict(expected_shapes(model), weights.shapes, str(weights.source), optional=SINCOS_TABLE_KEYS)
    return model.attach_vae(load_autoencoder(path / AE_FILE, mcfg, device=device))


# ---- the shards of one rank ---------------------------------------------------------------------------------


def local_view(t: Tensor) -> tuple[Tensor, tuple[slice, ...] | None]:
    """This rank's part of `t` (writable) and the index of the full tensor it holds (None: all of it).

    FSDP2 shards on a 1-D mesh with `Shard(0)`, split like `torch.chunk`: rank r holds rows
    [r c, min((r+1) c, n)) with c = ceil(n / world) (the last ranks fewer, or none)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t, None
    mesh, placements, local = t.device_mesh, t.placements, t.to_local()
    if mesh.ndim != 1 or len(placements) != 1:
        raise NotImplementedError(f"sharded loading supports 1-D meshes, got placements {placements}")
    placement = placements[0]
    if placement.is_replicate():
        return local, None
    if not placement.is_shard():
        raise NotImplementedError(f"sharded loading supports Shard / Replicate placements, got {placement}")
    dim, n = placement.dim, t.shape[placement.dim]
    chunk = -(-n // mesh.size())
    start = min(mesh.get_local_rank() * chunk, n)
    stop = start + local.shape[dim]
    if stop > n:
        raise RuntimeError(f"local shard of {list(t.shape)} on rank {mesh.get_local_rank()} exceeds the tensor")
    return local, (slice(None),) * dim + (slice(start, stop),)


@torch.no_grad()
def load_sharded_(model: nn.Module, path: str | Path, device: torch.device, seed: int) -> nn.Module:
    """Materialise a sharded meta-device model on its device and fill each rank's shards from `path`.

    Call after FSDP's `fully_shard` (so `to_empty` allocates the shards only). The VAE (already loaded) is
    detached meanwhile: `to_empty` would reach it through Bagel._apply."""
    vae = model.vae
    model.attach_vae(None)
    model.to_empty(device=device)  # allocates the local shards; RoPE's table is recomputed
    weights = model_weights(path)
    source = str(weights.source)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        key = clean_name(name)
        local, index = local_view(tensor)
        if local.numel() == 0:
            continue  # a rank past the last chunk of a small tensor
        if key in weights.specs:
            value = weights.read(key, index)
            if key in SINCOS_TABLE_KEYS:
                check_sincos_table(key, value, _part(sincos_table(model, key), index), source)
        elif key in SINCOS_TABLE_KEYS:
            value = _part(sincos_table(model, key), index)
        elif ".lora_" in key:
            value = _part(initial_adapter_weight(key, tuple(tensor.shape), seed), index)
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # non-persistent, recomputed by to_empty
        else:
            raise CheckpointError(f"{source}: has no tensor {key} and nothing else defines its value")
        local.copy_(value)
    model.attach_vae(vae)
    return model


def _part(full: Tensor, index: tuple[slice, ...] | None) -> Tensor:
    return full if index is None else full[index]
