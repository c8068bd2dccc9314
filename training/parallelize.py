"""Everything that changes HOW the (single-device) model runs, applied in one place and in this order:

  1. freezing     requires_grad off for the frozen parts (the VAE is never a parameter of Bagel: always frozen)
  2. LoRA         swap target Linears for LoRALinear, freeze the rest (training.lora)
  3. activation checkpointing   wrap every LLM decoder layer and every SigLIP encoder layer (non-reentrant)
  4. sharding     FSDP2 `fully_shard` per decoder layer, then the root (bf16 params, fp32 grad reduce on GPU), or
                  DeepSpeed ZeRO-2 / ZeRO-3 (`deepspeed.initialize`), or none (replicas; gradients all-reduced).
                  Both need every rank to run every module in the same order (ZeRO-3 gathers each submodule's
                  parameters when it runs; ZeRO-2 buckets gradients in hook order), so the trainer pads each
                  pack with a dummy sample that runs the modules the pack would skip (training.uniform)
  5. materialising   a pretrained model under FSDP arrives on the meta device (training.loading): after sharding,
                  each rank allocates its shards and reads only their slices from the checkpoint files

Model code knows nothing of this. Process groups: torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) decides; gloo on
CPU, NCCL on GPU; a plain `python` run is a single process without a process group.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from training.config import Config
from training.loading import load_sharded_
from training.lora import apply_lora

# ---- processes ----------------------------------------------------------------------------------------


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(device_pref: str) -> DistEnv:
    """Join the torchrun process group if there is one; pick the device (cuda:LOCAL_RANK or cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return DistEnv(rank, world, local_rank, device)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_(t: torch.Tensor, env: DistEnv, op=None) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def compute_dtype(cfg: Config, env: DistEnv) -> torch.dtype:
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and env.device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


# ---- 1. freezing ----------------------------------------------------------------------------------------


def apply_freezing(model: nn.Module, cfg: Config) -> None:
    f = cfg.freeze
    for name, p in model.named_parameters():
        if name.endswith("pos_embed.pos_embed"):  # fixed sin-cos tables
            p.requires_grad_(False)
        elif name.startswith("vit_model.") and f.vit:
            p.requires_grad_(False)
        elif name.startswith(("connector.", "vit_pos_embed.")) and f.connector:
            p.requires_grad_(False)
        elif name.startswith(("vae2llm.", "llm2vae.", "time_embedder.", "latent_pos_embed.")) and f.gen_expert:
            p.requires_grad_(False)
        elif name.startswith("language_model."):
            gen = "_moe_gen" in name
            if (gen and f.gen_expert) or (not gen and f.und_expert):
                p.requires_grad_(False)


# ---- 3. activation checkpointing -----------------------------------------------------------------------


def checkpointed_layer_types() -> tuple[type, ...]:
    from bagel_ft.qwen2 import Qwen2DecoderLayer
    from bagel_ft.siglip import SiglipEncoderLayer

    return (Qwen2DecoderLayer, SiglipEncoderLayer)


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply_ac,
    )

    types = checkpointed_layer_types()
    apply_ac(
        model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, types),
    )


# ---- 4. sharding ---------------------------------------------------------------------------------------


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """Modules sharded as their own FSDP unit: the LLM decoder layers (they run in every forward). Everything
    else (embeddings, lm_head, ViT, connector, VAE glue) is the root unit, which is gathered for the whole
    forward: a unit that some rank skips (no ViT image in its pack) would desynchronise the collectives."""
    return list(model.language_model.model.layers)


def apply_fsdp(model: nn.Module, env: DistEnv, dtype: torch.dtype) -> nn.Module:
    """FSDP2 full sharding: one unit per decoder layer, the rest in the root unit (see `fsdp_units`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp = (
        MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if dtype != torch.float32
        else MixedPrecisionPolicy()
    )
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # a pack without VAE tokens leaves the gen expert unused on that rank: reduce zeros so every rank joins
    # the same reduce-scatters
    model.set_reduce_scatter_unused_params(True)
    return model


DEEPSPEED_STAGES = {"zero2": 2, "zero3": 3}


def deepspeed_config(cfg: Config, dtype: torch.dtype, grad_accum: int) -> dict:
    stage = DEEPSPEED_STAGES[cfg.train.sharding]
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.train.zero3_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def apply_deepspeed(
    model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, dtype: torch.dtype, grad_accum: int
):
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError(f"train.sharding={cfg.train.sharding} needs DeepSpeed: pip install -e '.[deepspeed]'") from e
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, dtype, grad_accum)
    )
    return engine, optimizer


# ---- all of it, in order -------------------------------------------------------------------------------


def prepare_model(model: nn.Module, cfg: Config, env: DistEnv) -> nn.Module:
    """Steps 1-5 except DeepSpeed (which needs the optimizer: `apply_deepspeed` after `build_optimizer`)."""
    apply_freezing(model, cfg)  # 1
    if cfg.lora.enabled:  # 2
        apply_lora(model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
    if cfg.train.activation_checkpointing:  # 3
        apply_activation_checkpointing(model)
    dtype = compute_dtype(cfg, env)
    if model.vae is not None:  # frozen, replicated, never sharded
        model.vae.to(env.device)
    if cfg.train.sharding == "fsdp":  # 4
        model = apply_fsdp(model, env, dtype)  # moves each unit's shards to env.device
        if any(p.is_meta for p in model.parameters()):  # 5
            load_sharded_(model, cfg.model.path, env.device, cfg.run.seed)
        return model
    return model.to(env.device)


def all_reduce_gradients(model: nn.Module, env: DistEnv) -> None:
    """Sharding 'none' with several processes: average gradients (like DDP; unused parameters count as zero)."""
    if not env.distributed:
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(env.world_size)
