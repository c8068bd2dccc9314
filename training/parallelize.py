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
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from common.config import ConfigError
from training.config import Config
from training.loading import load_sharded_
from training.lora import apply_lora
from training.optim import trainable_parameters

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


class Replicas:
    """train.sharding=none: every process holds the whole model; gradients all-reduced (like DDP) before the
    optimizer step. The interface every sharding shares: the trainer calls only these methods."""

    pads_packs = False  # whether every rank must run every module (the trainer then pads packs: training.uniform)
    engine = None  # DeepSpeed's engine (its checkpoints are its own files: training.checkpoint)

    def __init__(self, cfg: Config, env: DistEnv, dtype: torch.dtype):
        self.cfg, self.env, self.dtype = cfg, env, dtype

    def load_dtype(self) -> torch.dtype:
        """The dtype to build the weights in before sharding."""
        return torch.float32

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int) -> torch.optim.Optimizer:
        """Take the prepared model and its optimizer; returns the optimizer to checkpoint."""
        self.model, self.optimizer = model, optimizer
        return optimizer

    @property
    def module(self) -> nn.Module:
        """The model whose parameters are trained (what the EMA follows)."""
        return self.model

    def forward(self, batch, last_micro_batch: bool):
        context = nullcontext() if self.dtype == torch.float32 else torch.autocast(self.env.device.type, self.dtype)
        with context:
            return self.model(batch)

    def backward(self, loss: torch.Tensor, micro_batches: int) -> None:
        loss.backward()

    def clip_and_step(self, loss_value: float) -> tuple[float, bool]:
        """Clip the gradients and step the optimizer when loss and grad norm are finite -> (grad norm, finite)."""
        params = [p for _, p in trainable_parameters(self.model)]
        for p in params:  # a parameter no pack used gets a zero gradient (as with FSDP / DeepSpeed flat buffers):
            if p.grad is None:  # AdamW then still applies its momentum, identically in every mode
                p.grad = torch.zeros_like(p)
        self.sync_gradients()
        max_norm = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm > 0 else float("inf")
        norm_t = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = float(norm_t.full_tensor() if hasattr(norm_t, "full_tensor") else norm_t)
        finite = math.isfinite(loss_value) and math.isfinite(norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, finite

    def sync_gradients(self) -> None:
        all_reduce_gradients(self.model, self.env)


class FSDP(Replicas):
    """train.sharding=fsdp: FSDP2 (`apply_fsdp`, in `prepare_model`) reduce-scatters gradients itself, on the last
    micro-batch of a step, and casts to bf16 itself."""

    def forward(self, batch, last_micro_batch: bool):
        self.model.set_requires_gradient_sync(last_micro_batch)
        return self.model(batch)

    def sync_gradients(self) -> None:
        pass


class DeepSpeed(Replicas):
    """train.sharding=zero2 / zero3: `deepspeed.initialize` wraps model and optimizer; DeepSpeed accumulates,
    clips and steps itself (it cannot skip a non-finite update); every rank runs every module (ZeRO-3 gathers
    parameters per module, ZeRO-2 buckets gradients in hook order)."""

    pads_packs = True

    def __init__(self, cfg: Config, env: DistEnv, dtype: torch.dtype):
        super().__init__(cfg, env, dtype)
        if cfg.train.export_ema:  # fail now, not after the last step
            raise ConfigError(
                f"train.export_ema=true is not supported with train.sharding={cfg.train.sharding}: EMA export "
                "reads FSDP / single-process checkpoints; set train.export_ema=false (DeepSpeed checkpoints "
                "convert with DeepSpeed's zero_to_fp32.py)"
            )

    def load_dtype(self) -> torch.dtype:
        return self.dtype  # bf16 runs load bf16 weights (DeepSpeed casts anyway)

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int) -> torch.optim.Optimizer:
        try:
            import deepspeed
        except ImportError as e:
            raise RuntimeError(
                f"train.sharding={self.cfg.train.sharding} needs DeepSpeed: pip install -e '.[deepspeed]'"
            ) from e
        config = deepspeed_config(self.cfg, self.dtype, grad_accum)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.model = model
        return self.optimizer

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def forward(self, batch, last_micro_batch: bool):
        return self.engine(batch)

    def backward(self, loss: torch.Tensor, micro_batches: int) -> None:
        self.engine.backward(loss * micro_batches)  # DeepSpeed divides by its accumulation steps
        self.engine.step()  # called per micro-batch; DeepSpeed updates at the accumulation boundary

    def clip_and_step(self, loss_value: float) -> tuple[float, bool]:
        norm = self.engine.get_global_grad_norm()  # clipped and stepped already
        norm = float(norm) if norm is not None else float("nan")
        return norm, math.isfinite(loss_value) and math.isfinite(norm)


SHARDINGS = {"none": Replicas, "fsdp": FSDP, "zero2": DeepSpeed, "zero3": DeepSpeed}


def build_sharding(cfg: Config, env: DistEnv, dtype: torch.dtype) -> Replicas:
    """The strategy of cfg.train.sharding (one class per way the step runs; the trainer knows only its methods)."""
    return SHARDINGS[cfg.train.sharding](cfg, env, dtype)


# ---- all of it, in order -------------------------------------------------------------------------------


def prepare_model(model: nn.Module, cfg: Config, env: DistEnv) -> nn.Module:
    """Steps 1-5 except DeepSpeed (which needs the optimizer: `DeepSpeed.wrap` after `build_optimizer`)."""
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
