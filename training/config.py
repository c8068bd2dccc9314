"""Typed training configuration: nested dataclasses merged defaults -> YAML -> dotted CLI overrides.

    cfg = load_config("configs/train/tiny_cpu.yaml", ["optim.lr=1e-3", "train.steps=20"])

Every field carries a one-line doc (`bagel-ft train --help-config` prints them). Values are checked against
the field types and the allowed choices before any work starts; a bad value raises `ConfigError` naming the
dotted key, what was expected and what was given. The resolved config is written into the run folder
(`config.yaml`) so a run can be reproduced from its folder alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import config as config_io
from common.config import ConfigError
from common.config import setting as _f


@dataclass
class RunConfig:
    dir: str = _f("runs/train", "run folder: resolved config.yaml, metrics.jsonl, checkpoints/, export/")
    seed: int = _f(0, "global seed: random init, data order, CFG dropout, timesteps, flow noise")
    resume: str = _f(
        "auto", "'auto' = latest complete checkpoint in run.dir (else start fresh), 'never', or a checkpoint dir"
    )


@dataclass
class ModelConfig:
    init: str = _f(
        "pretrained",
        "'pretrained' = Bagel.from_pretrained(model.path); 'random' = fresh init (must be explicit)",
        ("pretrained", "random"),
    )
    path: str = _f("", "checkpoint dir in the official layout (llm/vit/vae configs, ema.safetensors, ae.safetensors)")
    preset: str = _f("tiny", "architecture for init=random (bagel_ft.config presets: tiny, bagel-7b-mot)")
    tokenizer: str = _f(
        "", "tokenizer for bagel_ft.tokenizer.load_tokenizer; '' = model.path ('byte' = tiny byte tokenizer)"
    )
    timestep_shift: float | None = _f(
        None, "training timestep shift s, t <- s t/(1+(s-1)t); null keeps the checkpoint's value"
    )


@dataclass
class SourceConfig:
    path: str = _f("", "a trajectory table (docs/format.md): dir of parquet shards or a datasets save_to_disk dir")
    weight: float = _f(1.0, "sampling weight of this source among all sources (normalised)")
    subsets: list[str] = _f(
        [], "keep only records of these subsets (t2i, caption, trajectory, critique, alignment); [] = all"
    )


@dataclass
class DataConfig:
    sources: list[SourceConfig] = _f([], "trajectory tables to train on, mixed by weight")
    loss_roles: dict[str, dict[str, bool]] = _f(
        {}, "loss overrides per subset and role, e.g. {critique: {plan: false}}; '*' = any subset"
    )
    special_token_loss: bool = _f(
        True, "supervise <|vision_start|> / <|endoftext|> at a supervised text turn's <|im_end|> (docs/format.md 3)"
    )
    expected_num_tokens: int = _f(32768, "a pack is emitted once it holds at least this many tokens")
    max_num_tokens: int = _f(36864, "hard token limit of one pack (also the budget for packing efficiency)")
    max_num_tokens_per_sample: int = _f(16384, "longer samples are skipped (counted and warned)")
    prefer_buffer_before: int = _f(
        16384, "while a pack is shorter than this, take samples from the leftover buffer first"
    )
    max_buffer_size: int = _f(50, "leftover samples (did not fit a pack) kept for later packs")
    vae_max_size: int = _f(1024, "longest image side (px) for VAE images; sides snap to multiples of latent_downsample")
    vae_min_size: int = _f(512, "shortest image side (px) for VAE images (upscaled if smaller)")
    vit_max_size: int = _f(980, "longest image side (px) for ViT images; sides snap to multiples of the ViT patch")
    vit_min_size: int = _f(224, "shortest image side (px) for ViT images")
    max_pixels: int = _f(14 * 14 * 9 * 1024, "pixel budget per image (official ImageTransform default)")
    text_cond_dropout_prob: float = _f(
        0.1, "CFG: drop a context text (prompt / unsupervised text) with this probability"
    )
    vit_cond_dropout_prob: float = _f(
        0.3, "CFG: drop a context ViT image with this probability (official train default)"
    )
    vae_cond_dropout_prob: float = _f(
        0.3, "CFG: drop a clean context VAE image with this probability (official train default)"
    )
    prefetch: int = _f(2, "packs prepared ahead in a background thread (0 = build in the training loop)")


@dataclass
class OptimConfig:
    lr: float = _f(2e-5, "peak learning rate (AdamW)")
    min_lr: float = _f(1e-7, "final learning rate of the cosine schedule")
    schedule: str = _f("cosine", "learning-rate schedule after linear warmup", ("cosine", "constant"))
    warmup_steps: int = _f(500, "linear warmup steps from 0 to optim.lr")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2 (official BAGEL)")
    eps: float = _f(1e-15, "AdamW epsilon (official BAGEL)")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (official BAGEL: 0)")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this (0 = no clipping)")
    ce_weight: float = _f(1.0, "lambda_CE in loss = lambda_CE * CE + mse_weight * MSE")
    mse_weight: float = _f(1.0, "weight of the flow-matching MSE")
    ema_decay: float = _f(0.9999, "EMA of trainable weights: ema <- decay*ema + (1-decay)*w after each step (0 = off)")


@dataclass
class FreezeConfig:
    vit: bool = _f(False, "freeze the SigLIP encoder (the VAE is always frozen)")
    connector: bool = _f(False, "freeze the ViT->LLM connector and vit_pos_embed")
    und_expert: bool = _f(False, "freeze the LLM's understanding expert (embed_tokens, lm_head, und weights, norm)")
    gen_expert: bool = _f(False, "freeze the generation expert (*_moe_gen weights) and vae2llm/llm2vae/time_embedder")


@dataclass
class LoRAConfig:
    enabled: bool = _f(False, "train low-rank adapters on the target Linears; all base weights frozen")
    rank: int = _f(16, "adapter rank r")
    alpha: float = _f(32.0, "adapter scale alpha (update = alpha/r * B A x)")
    dropout: float = _f(0.0, "dropout on the adapter input")
    targets: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "LLM Linear names to adapt (both experts: q_proj also matches q_proj_moe_gen)",
    )


@dataclass
class TrainConfig:
    steps: int = _f(10000, "optimizer steps")
    grad_accum: int = _f(1, "packs per rank per optimizer step (losses normalised over all of them)")
    global_batch: int = _f(
        0,
        "packs per optimizer step over all processes; 0 = processes x grad_accum. Set, it fixes the run whatever "
        "the node count: grad_accum = global_batch / processes (must divide); data order and losses then match",
    )
    device: str = _f("auto", "'auto' (cuda if available), 'cpu' or 'cuda'", ("auto", "cpu", "cuda"))
    dtype: str = _f("auto", "compute dtype: 'auto' = bf16 on GPU, fp32 on CPU", ("auto", "bf16", "fp32"))
    sharding: str = _f(
        "none",
        "'none' (replicas, gradients all-reduced), 'fsdp' (FSDP2 full shard), 'zero2' / 'zero3' (DeepSpeed "
        "ZeRO stage 2 / 3; packs padded so every rank runs every module: training.uniform)",
        ("none", "fsdp", "zero2", "zero3"),
    )
    zero3_persistence_threshold: int = _f(
        100_000,
        "zero3: parameters with fewer elements stay whole on every rank (DeepSpeed "
        "stage3_param_persistence_threshold; 0 = shard all)",
    )
    attn_backend: str = _f(
        "auto",
        "LLM attention: 'auto' = flex on GPU, sdpa (dense per-sample masks) on CPU",
        ("auto", "sdpa", "flex", "flash"),
    )
    activation_checkpointing: bool = _f(False, "recompute each decoder layer in backward (saves activations)")
    log_every: int = _f(10, "console log interval in steps (metrics.jsonl, TensorBoard and W&B get every step)")
    save_every: int = _f(1000, "checkpoint interval in steps (and always at the last step)")
    keep_last: int = _f(3, "complete checkpoints kept (older ones deleted)")
    max_nonfinite_steps: int = _f(5, "stop after this many non-finite losses/grad norms in a row (each one is skipped)")
    vae_sample: bool = _f(True, "encode VAE images with a posterior sample (official training) instead of the mean")
    num_threads: int = _f(0, "torch CPU threads per process (0 = torch default); fixes CPU numerics across runs")
    gpu_memory_gb: float = _f(0.0, "per-GPU memory for the fit check (0 = detect; CPU runs skip the check)")
    peak_tflops: float = _f(0.0, "per-GPU peak dense bf16 TFLOP/s for MFU (0 = detect by device name)")
    export_ema: bool = _f(True, "at the end, export EMA weights in the official layout to run.dir/export (export.*)")
    progress_bar: bool = _f(True, "tqdm progress bar on rank 0")
    tensorboard: bool = _f(False, "log to TensorBoard in run.dir/tb (needs the tensorboard package)")
    wandb_project: str = _f("", "log to this W&B project ('' = off; needs the wandb package)")


@dataclass
class ExportConfig:
    dtype: str = _f(
        "auto",
        "dtype of the exported weights: 'auto' = the source checkpoint's (bf16 for the release; fp32 after "
        "model.init=random)",
        ("auto", "bf16", "fp16", "fp32"),
    )
    max_shard_gb: float = _f(
        0.0,
        "shard the exported weights into files of at most this many GB (1e9 bytes) with an index; 0 = one "
        "ema.safetensors, the release's layout that the official app loads",
    )


@dataclass
class Config:
    run: RunConfig = _f(RunConfig(), "where and how the run is stored")
    model: ModelConfig = _f(ModelConfig(), "the model to fine-tune")
    data: DataConfig = _f(DataConfig(), "trajectory data, sequences and packing")
    optim: OptimConfig = _f(OptimConfig(), "optimizer, schedule, losses, EMA")
    freeze: FreezeConfig = _f(FreezeConfig(), "which modules are not trained")
    lora: LoRAConfig = _f(LoRAConfig(), "low-rank adapters")
    train: TrainConfig = _f(TrainConfig(), "loop, parallelism, checkpoints, logging")
    export: ExportConfig = _f(ExportConfig(), "the exported model directory (train.export_ema, --export)")


# ---- merging ----------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults -> YAML file -> dotted `a.b=value` overrides (common.config), then validated."""
    cfg = config_io.load(Config, path, overrides or [])
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that need no model; raises ConfigError naming the key."""
    checks = [
        (
            cfg.model.init == "random" or cfg.model.path,
            "model.path",
            "a checkpoint dir (or model.init: random to start from random weights)",
            repr(cfg.model.path),
        ),
        (cfg.train.steps >= 1, "train.steps", ">= 1", cfg.train.steps),
        (cfg.train.grad_accum >= 1, "train.grad_accum", ">= 1", cfg.train.grad_accum),
        (
            cfg.train.global_batch >= 0,
            "train.global_batch",
            ">= 0 (0 = processes x grad_accum)",
            cfg.train.global_batch,
        ),
        (
            cfg.train.global_batch == 0 or cfg.train.grad_accum == 1,
            "train.grad_accum",
            "1 (left to train.global_batch, which sets it) when train.global_batch is set",
            cfg.train.grad_accum,
        ),
        (cfg.export.max_shard_gb >= 0, "export.max_shard_gb", ">= 0 (0 = one file)", cfg.export.max_shard_gb),
        (cfg.train.save_every >= 1, "train.save_every", ">= 1", cfg.train.save_every),
        (cfg.train.log_every >= 1, "train.log_every", ">= 1", cfg.train.log_every),
        (cfg.train.keep_last >= 1, "train.keep_last", ">= 1", cfg.train.keep_last),
        (cfg.train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", ">= 1", cfg.train.max_nonfinite_steps),
        (cfg.optim.lr > 0, "optim.lr", "> 0", cfg.optim.lr),
        (0 <= cfg.optim.min_lr <= cfg.optim.lr, "optim.min_lr", f"in [0, optim.lr={cfg.optim.lr}]", cfg.optim.min_lr),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps", ">= 0", cfg.optim.warmup_steps),
        (0 <= cfg.optim.ema_decay < 1, "optim.ema_decay", "in [0, 1)", cfg.optim.ema_decay),
        (cfg.optim.max_grad_norm >= 0, "optim.max_grad_norm", ">= 0", cfg.optim.max_grad_norm),
        (
            cfg.optim.ce_weight >= 0 and cfg.optim.mse_weight >= 0,
            "optim.ce_weight/mse_weight",
            ">= 0",
            (cfg.optim.ce_weight, cfg.optim.mse_weight),
        ),
        (bool(cfg.data.sources), "data.sources", "at least one {path, weight}", cfg.data.sources),
        (
            all(s.path for s in cfg.data.sources),
            "data.sources[].path",
            "non-empty paths",
            [s.path for s in cfg.data.sources],
        ),
        (
            all(s.weight > 0 for s in cfg.data.sources),
            "data.sources[].weight",
            "> 0",
            [s.weight for s in cfg.data.sources],
        ),
        (
            0 < cfg.data.expected_num_tokens <= cfg.data.max_num_tokens,
            "data.expected_num_tokens",
            f"in (0, data.max_num_tokens={cfg.data.max_num_tokens}]",
            cfg.data.expected_num_tokens,
        ),
        (
            0 < cfg.data.max_num_tokens_per_sample <= cfg.data.max_num_tokens,
            "data.max_num_tokens_per_sample",
            f"in (0, data.max_num_tokens={cfg.data.max_num_tokens}]",
            cfg.data.max_num_tokens_per_sample,
        ),
        (
            0 < cfg.data.vae_min_size <= cfg.data.vae_max_size,
            "data.vae_min_size",
            f"in (0, vae_max_size={cfg.data.vae_max_size}]",
            cfg.data.vae_min_size,
        ),
        (
            0 < cfg.data.vit_min_size <= cfg.data.vit_max_size,
            "data.vit_min_size",
            f"in (0, vit_max_size={cfg.data.vit_max_size}]",
            cfg.data.vit_min_size,
        ),
        (cfg.data.prefetch >= 0, "data.prefetch", ">= 0", cfg.data.prefetch),
        (cfg.lora.rank >= 1, "lora.rank", ">= 1", cfg.lora.rank),
        (0 <= cfg.lora.dropout < 1, "lora.dropout", "in [0, 1)", cfg.lora.dropout),
        (cfg.train.gpu_memory_gb >= 0, "train.gpu_memory_gb", ">= 0", cfg.train.gpu_memory_gb),
        (
            cfg.model.timestep_shift is None or cfg.model.timestep_shift > 0,
            "model.timestep_shift",
            "> 0 or null",
            cfg.model.timestep_shift,
        ),
    ]
    for name in ("text_cond_dropout_prob", "vit_cond_dropout_prob", "vae_cond_dropout_prob"):
        p = getattr(cfg.data, name)
        checks.append((0 <= p <= 1, f"data.{name}", "a probability in [0, 1]", p))
    for subset, roles in cfg.data.loss_roles.items():
        from bagel_ft.trajectory import ROLES, SUBSETS

        checks.append(
            (subset in SUBSETS + ("*",), f"data.loss_roles.{subset}", f"a subset in {SUBSETS} or '*'", subset)
        )
        for role in roles:
            checks.append((role in ROLES, f"data.loss_roles.{subset}.{role}", f"a role in {ROLES}", role))
    errors = [f"{key}: expected {expected}, got {got!r}" for ok, key, expected, got in checks if not ok]
    if errors:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(errors))


def resolve_grad_accum(cfg: Config, world_size: int) -> int:
    """Packs per rank per step: train.global_batch / processes when the global batch is set (it must divide),
    else train.grad_accum. The data streams are a function of (seed, global batch), so a run with a fixed
    global batch sees the same packs in every step on any number of nodes."""
    g = cfg.train.global_batch
    if g == 0:
        return cfg.train.grad_accum
    if g % world_size:
        raise ConfigError(
            f"train.global_batch: expected a multiple of the {world_size} processes (each takes global_batch / "
            f"processes packs per step), got {g}"
        )
    return g // world_size


# ---- output -------------------------------------------------------------------------------------------


def to_dict(cfg: Config) -> dict[str, Any]:
    return config_io.to_dict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    config_io.save_yaml(cfg, path)


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per leaf field: `dotted.key = default  # doc` (for --help-config)."""
    return config_io.describe(cls, prefix)
