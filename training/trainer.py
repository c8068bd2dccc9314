"""The training loop, top to bottom: setup, resume, steps, checkpoints, export.

    bagel-ft train configs/train/tiny_cpu.yaml                                   # one process (CPU ok)
    bagel-ft train configs/train/tiny_cpu.yaml optim.lr=1e-3 train.steps=20      # dotted overrides
    bagel-ft train configs/train/psir_bagel7b_8xh100.yaml --dry-run             # memory estimate only
    torchrun --nproc_per_node 8 -m training.cli configs/train/psir_bagel7b_8xh100.yaml

One optimizer step: every rank takes `grad_accum` packs (its data streams, training.data), counts the
supervised CE / MSE positions over all packs of all ranks, runs forward + backward per pack with the loss
normalised by those global counts (training.losses), clips the global gradient norm, and (if loss and norm
are finite) steps AdamW, the schedule and the EMA. A non-finite loss or norm skips the update and is counted;
`train.max_nonfinite_steps` in a row stop the run with the step and the records it saw, leaving the last good
checkpoint as the resume point.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bagel_ft.config import BagelConfig, ConfigError
from bagel_ft.modeling import Bagel
from bagel_ft.tokenizer import load_tokenizer
from bagel_ft.transforms import ImageGeometry
from training import checkpoint as ckpt
from training.config import Config, resolve_grad_accum, save_config, to_dict
from training.data import DataStream, Prefetcher, RecordTable, StreamSpec
from training.loading import build_model, model_config
from training.losses import TokenCounts, ce_sum, mse_sum, step_loss
from training.memory import check_fit, estimate_for_config
from training.metrics import MetricsLogger, peak_tflops, training_flops
from training.optim import EMA, build_optimizer, build_scheduler, trainable_parameters
from training.packing import CFGDropout, PackingGeometry
from training.parallelize import (
    DEEPSPEED_STAGES,
    DistEnv,
    all_reduce_,
    all_reduce_gradients,
    apply_deepspeed,
    barrier,
    compute_dtype,
    init_distributed,
    prepare_model,
)
from training.sequence import ImageGeometry as PlanGeometry
from training.sequence import SpecialTokens
from training.uniform import Padding, pad_unused_modules, strip_dummy


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. non-finite losses in a row); the message says where and why."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    data: list[dict] = field(default_factory=list)  # per data stream: state after its last consumed pack


# ---- setup pieces ------------------------------------------------------------------------------------------


def build_tokenizer(cfg: Config):
    name = cfg.model.tokenizer or cfg.model.path
    if not name:
        raise ConfigError(
            "model.tokenizer: expected a tokenizer ('byte' for the tiny model, 'qwen2.5', or a dir) "
            "when model.init is 'random', got ''"
        )
    return load_tokenizer(name)


def check_geometry(cfg: Config, mcfg: BagelConfig) -> None:
    """Image sizes the config allows must fit the model's position tables."""
    vae_cap = mcfg.arch.max_latent_size * mcfg.latent_downsample
    vit_cap = mcfg.arch.vit_max_num_patch_per_side * mcfg.vit.patch_size
    errors = []
    if cfg.data.vae_max_size > vae_cap:
        errors.append(
            f"data.vae_max_size: expected <= {vae_cap} (max_latent_size {mcfg.arch.max_latent_size} x "
            f"{mcfg.latent_downsample} px), got {cfg.data.vae_max_size}"
        )
    if cfg.data.vit_max_size > vit_cap:
        errors.append(
            f"data.vit_max_size: expected <= {vit_cap} (vit_max_num_patch_per_side x patch), got "
            f"{cfg.data.vit_max_size}"
        )
    for key, value, stride in [
        ("vae_min_size", cfg.data.vae_min_size, mcfg.latent_downsample),
        ("vit_min_size", cfg.data.vit_min_size, mcfg.vit.patch_size),
    ]:
        if value < stride:
            errors.append(f"data.{key}: expected >= the stride {stride}, got {value}")
    if errors:
        raise ConfigError("config does not fit the model:\n  " + "\n  ".join(errors))


def attention_backend(cfg: Config, env: DistEnv) -> str:
    """'auto': flex attention (compiled block masks) on GPU, dense per-sample masks (sdpa) on CPU."""
    if cfg.train.attn_backend != "auto":
        return cfg.train.attn_backend
    return "flex" if env.device.type == "cuda" else "sdpa"


def image_bounds(cfg: Config) -> ImageGeometry:
    d = cfg.data
    return ImageGeometry(d.vae_max_size, d.vae_min_size, d.vit_max_size, d.vit_min_size, d.max_pixels)


def stream_spec(cfg: Config, mcfg: BagelConfig, tokenizer) -> StreamSpec:
    """How the config's records become packs for this model and tokenizer (shared by every stream)."""
    d = cfg.data
    return StreamSpec(
        encode=tokenizer.encode,
        special=SpecialTokens.from_tokenizer(tokenizer),
        images=PlanGeometry.from_bounds(image_bounds(cfg), mcfg.latent_downsample, mcfg.vit.patch_size),
        packing=PackingGeometry.from_model_config(mcfg),
        dropout=CFGDropout(d.text_cond_dropout_prob, d.vit_cond_dropout_prob, d.vae_cond_dropout_prob),
        loss_roles=d.loss_roles,
        special_token_loss=d.special_token_loss,
        expected_num_tokens=d.expected_num_tokens,
        max_num_tokens=d.max_num_tokens,
        max_num_tokens_per_sample=d.max_num_tokens_per_sample,
        prefer_buffer_before=d.prefer_buffer_before,
        max_buffer_size=d.max_buffer_size,
    )


def build_streams(cfg: Config, mcfg: BagelConfig, tokenizer, env: DistEnv) -> list[Prefetcher]:
    d = cfg.data
    tables = [RecordTable(s.path, s.subsets) for s in d.sources]
    spec = stream_spec(cfg, mcfg, tokenizer)
    accum = resolve_grad_accum(cfg, env.world_size)
    num_streams = env.world_size * accum  # = the global batch: streams depend on it, not on the node count
    weights = [s.weight for s in d.sources]
    return [
        Prefetcher(DataStream(tables, weights, spec, cfg.run.seed, env.rank * accum + m, num_streams), d.prefetch)
        for m in range(accum)
    ]


# ---- the trainer -------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        self.env = init_distributed(cfg.train.device)
        self.grad_accum = resolve_grad_accum(cfg, self.env.world_size)  # packs per rank per step
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.state = TrainState()

    # ---- setup ----------------------------------------------------------------------------------------
    def setup(self) -> Trainer:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        barrier(env)
        self.mcfg = model_config(cfg)
        check_geometry(cfg, self.mcfg)
        self.tokenizer = build_tokenizer(cfg)
        if self.tokenizer.vocab_size > self.mcfg.llm.vocab_size:
            raise ConfigError(
                f"model.tokenizer: vocab {self.tokenizer.vocab_size} exceeds the model's "
                f"{self.mcfg.llm.vocab_size} embedding rows"
            )
        self.estimate = estimate_for_config(cfg, self.mcfg, env.world_size, env.device.type)
        check_fit(self.estimate, cfg, env.device)  # refuses to start when it cannot fit

        self.dtype = compute_dtype(cfg, env)
        # FSDP + pretrained: a meta skeleton, filled after sharding; DeepSpeed bf16: loaded in bf16 (it casts anyway)
        deepspeed_bf16 = cfg.train.sharding in DEEPSPEED_STAGES and self.dtype == torch.bfloat16
        base = build_model(cfg, env.device, torch.bfloat16 if deepspeed_bf16 else torch.float32)
        if cfg.model.init == "random" and env.is_main and base.vae is not None:  # exports need this VAE
            from safetensors.torch import save_file

            from training.export import RANDOM_INIT_AE

            save_file({k: v.contiguous() for k, v in base.vae.state_dict().items()}, str(self.run_dir / RANDOM_INIT_AE))
        self.prepare(base)
        self.streams = build_streams(cfg, self.mcfg, self.tokenizer, env)
        resumed = self._resume()  # before the logger: it continues the run's event files / W&B run at this step
        self.log = MetricsLogger(
            self.run_dir, env.is_main, cfg.train.tensorboard, cfg.train.wandb_project, to_dict(cfg), self.state.step
        )
        if resumed is not None:
            self.log.message(f"resumed from {resumed} at step {self.state.step}")
        self.peak = peak_tflops(env.device, cfg.train.peak_tflops)
        return self

    def prepare(self, base: Bagel) -> Trainer:
        """Make `base` trainable as configured: attention backend, freezing / LoRA / checkpointing / sharding
        (training.parallelize), optimizer, schedule, EMA. `setup` calls it with the configured model; after it,
        `train_step` runs (benchmarks/gpu_check.py calls it with a model of its own and feeds packs itself)."""
        cfg, env = self.cfg, self.env
        self.mcfg = base.config
        self.dtype = compute_dtype(cfg, env)
        base.set_attn_backend(attention_backend(cfg, env))
        self.vae = base.vae
        self.model = prepare_model(base, cfg, env)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)  # on the torch AdamW
        self.engine = None
        if cfg.train.sharding in DEEPSPEED_STAGES:
            if cfg.train.export_ema:  # fail now, not after the last step
                raise ConfigError(
                    f"train.export_ema=true is not supported with train.sharding={cfg.train.sharding}: EMA export "
                    "reads FSDP / single-process checkpoints; set train.export_ema=false (DeepSpeed checkpoints "
                    "convert with DeepSpeed's zero_to_fp32.py)"
                )
            self.engine, self.optimizer = apply_deepspeed(self.model, self.optimizer, cfg, self.dtype, self.grad_accum)
        self.ema = EMA(self._module(), cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        return self

    def _module(self):
        """The model whose parameters are trained (DeepSpeed wraps it)."""
        return self.engine.module if self.engine is not None else self.model

    def _resume(self) -> Path | None:
        """Load the checkpoint `run.resume` names (auto: the latest complete one); returns its path, if any."""
        cfg = self.cfg
        if cfg.run.resume == "never":
            return None
        path = ckpt.latest_checkpoint(self.ckpt_root) if cfg.run.resume == "auto" else Path(cfg.run.resume)
        if path is None:
            return None
        if not (path / ckpt.COMPLETE).is_file():
            raise ConfigError(f"run.resume: {path} is not a complete checkpoint (no {ckpt.COMPLETE} marker)")
        extra = ckpt.load_checkpoint(path, self.model, self.optimizer, self.ema, self.env, self.engine)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.state = TrainState(extra["step"], extra["nonfinite_total"], extra["nonfinite_in_a_row"], extra["data"])
        for prefetcher, data_state in zip(self.streams, extra["data"], strict=True):
            prefetcher.stream.load_state_dict(data_state)
        return path

    # ---- one step -------------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype == torch.float32 or self.cfg.train.sharding != "none":
            return nullcontext()  # FSDP / DeepSpeed handle bf16 themselves
        return torch.autocast(self.env.device.type, dtype=self.dtype)

    def _encode_images(self, batch, seed: int) -> None:
        """VAE latents with the posterior sampled (official training), seeded per pack for reproducibility."""
        if batch.padded_images is None or self.vae is None:
            return
        gen = torch.Generator(self.env.device).manual_seed(seed)
        with torch.no_grad():
            images = batch.padded_images.to(self.env.device)
            batch.padded_latent = self.vae.encode(images, sample=self.cfg.train.vae_sample, generator=gen)

    def train_step(self, packs) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        batches = [p.batch.to(env.device) for p in packs]
        counts = TokenCounts.of(batches).all_reduce(env.device)
        sums = torch.zeros(2, dtype=torch.float64, device=env.device)  # local CE, MSE sums
        for m, (pack, batch) in enumerate(zip(packs, batches, strict=True)):
            self._encode_images(batch, pack.seed)
            last = m == len(batches) - 1
            if cfg.train.sharding == "fsdp":
                self.model.set_requires_gradient_sync(last)
            padding = Padding()
            if cfg.train.sharding in DEEPSPEED_STAGES:  # every rank runs every module, in one order (training.uniform)
                batch, padding = pad_unused_modules(batch, self.mcfg)
            with self._autocast():
                out = (self.engine or self.model)(batch)
            out, zero = strip_dummy(out, padding)
            ce, mse = ce_sum(out.ce_logits, batch.packed_label_ids), mse_sum(out.mse_pred, out.mse_target)
            loss = step_loss(ce, mse, counts, cfg.optim.ce_weight, cfg.optim.mse_weight, env.world_size)
            # nothing supervised in this pack: still join the gradient collectives
            loss = zero if loss is None else loss + zero
            if self.engine is not None:
                self.engine.backward(loss * len(batches))  # DeepSpeed divides by its accumulation steps
                self.engine.step()  # called per micro-batch; DeepSpeed updates at the accumulation boundary
            else:
                loss.backward()
            sums += torch.stack(
                [
                    ce.detach() if ce is not None else sums.new_zeros(()),
                    mse.detach() if mse is not None else sums.new_zeros(()),
                ]
            ).double()
        all_reduce_(sums, env)
        ce_mean = sums[0].item() / max(counts.ce, 1)
        mse_mean = sums[1].item() / max(counts.mse, 1)
        loss_value = cfg.optim.ce_weight * ce_mean + cfg.optim.mse_weight * mse_mean
        grad_norm = self._clip_and_step(loss_value)
        return {
            "loss": loss_value,
            "ce": ce_mean,
            "mse": mse_mean,
            "grad_norm": grad_norm,
            "ce_tokens": counts.ce,
            "mse_tokens": counts.mse,
        }

    def _clip_and_step(self, loss_value: float) -> float:
        """Clip, and step optimizer + EMA when loss and grad norm are finite; returns the grad norm."""
        cfg = self.cfg
        if self.engine is not None:  # DeepSpeed clipped and stepped already; it cannot skip a bf16/fp32 update
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
            finite = math.isfinite(loss_value) and math.isfinite(norm)
        else:
            params = [p for _, p in trainable_parameters(self.model)]
            for p in params:  # a parameter no pack used gets a zero gradient (as with FSDP / DeepSpeed flat buffers):
                if p.grad is None:  # AdamW then still applies its momentum, identically in every mode
                    p.grad = torch.zeros_like(p)
            if cfg.train.sharding == "none":
                all_reduce_gradients(self.model, self.env)
            max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
            norm_t = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norm = float(norm_t.full_tensor() if hasattr(norm_t, "full_tensor") else norm_t)
            finite = math.isfinite(loss_value) and math.isfinite(norm)
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if finite and self.ema is not None:
            self.ema.update(self._module())
        self.scheduler.step()
        self._finite = finite
        return norm

    # ---- the loop -------------------------------------------------------------------------------------
    def train(self) -> TrainState:
        cfg, env, state = self.cfg, self.env, self.state
        progress = None
        if env.is_main and cfg.train.progress_bar:
            from tqdm import tqdm

            progress = tqdm(total=cfg.train.steps, initial=state.step, desc="train", dynamic_ncols=True)
        self._module().train()
        try:
            while state.step < cfg.train.steps:
                t0 = time.perf_counter()
                fetched = [prefetcher.next() for prefetcher in self.streams]
                packs = [pack for pack, _ in fetched]
                lr = self.optimizer.param_groups[0]["lr"]
                metrics = self.train_step(packs)
                state.data = [data_state for _, data_state in fetched]
                self._count_nonfinite(metrics, packs)
                state.step += 1
                metrics.update(
                    self._throughput(packs, time.perf_counter() - t0), lr=lr, nonfinite_total=state.nonfinite_total
                )
                self.log.log(state.step, metrics, console=state.step % cfg.train.log_every == 0 or state.step == 1)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(ce=f"{metrics['ce']:.3f}", mse=f"{metrics['mse']:.3f}")
                if state.step % cfg.train.save_every == 0 or state.step == cfg.train.steps:
                    self.save(metrics)
            if cfg.train.export_ema:
                self.export(self.run_dir / "export")
        finally:
            if progress is not None:
                progress.close()
            for prefetcher in self.streams:
                prefetcher.close()
            self.log.close()
        return state

    def _count_nonfinite(self, metrics: dict, packs) -> None:
        state = self.state
        if self._finite:
            state.nonfinite_in_a_row = 0
            self._nonfinite_records = []
            return
        state.nonfinite_total += 1
        state.nonfinite_in_a_row += 1
        step = state.step + 1
        ids = [rid for p in packs for rid in p.record_ids]
        self._nonfinite_records = getattr(self, "_nonfinite_records", []) + [(step, ids)]
        self.log.message(
            f"step {step}: non-finite loss {metrics['loss']} / grad norm {metrics['grad_norm']}; "
            f"update skipped ({state.nonfinite_in_a_row} in a row); records {ids}"
        )
        if state.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
            last = ckpt.latest_checkpoint(self.ckpt_root)
            seen = "; ".join(f"step {s}: {r}" for s, r in self._nonfinite_records)
            keep = (
                f"the last good checkpoint {last} is kept: resume from it" if last else "no checkpoint was written yet"
            )
            raise TrainingStopped(
                f"stopped at step {step}: {state.nonfinite_in_a_row} non-finite steps in a row (loss {metrics['loss']}, "
                f"grad norm {metrics['grad_norm']}); records in this rank's packs: {seen}. No update was applied at "
                f"these steps; {keep} after fixing the data or lowering optim.lr."
            )

    def _throughput(self, packs, seconds: float) -> dict[str, float]:
        totals = [
            sum(p.batch.sequence_length for p in packs),
            sum(training_flops(p.batch, self.mcfg) for p in packs),
            sum(p.stats.efficiency for p in packs) / len(packs),
        ]
        tokens, flops, eff = all_reduce_(
            torch.tensor(totals, dtype=torch.float64, device=self.env.device), self.env
        ).tolist()
        out = {
            "tokens": int(tokens),
            "tokens_per_s": tokens / seconds,
            "packing_efficiency": eff / self.env.world_size,
            "step_time_s": seconds,
        }
        if self.peak > 0:
            out["mfu"] = flops / seconds / (self.peak * 1e12 * self.env.world_size)
        return out

    # ---- checkpoints and export --------------------------------------------------------------------------
    def save(self, metrics: dict | None = None) -> Path:
        state = self.state
        extra = {
            "step": state.step,
            "scheduler": self.scheduler.state_dict(),
            "data": state.data,
            "nonfinite_total": state.nonfinite_total,
            "nonfinite_in_a_row": state.nonfinite_in_a_row,
        }
        meta = {
            "grad_accum": self.grad_accum,
            "sharding": self.cfg.train.sharding,
            "ema_keys": sorted(self.ema.shadow) if self.ema is not None else [],
            "metrics": metrics or {},
        }
        return ckpt.save_checkpoint(
            self.ckpt_root,
            state.step,
            self.model,
            self.optimizer,
            self.ema,
            extra,
            meta,
            self.env,
            self.cfg.train.keep_last,
            self.engine,
        )

    def export(self, out_dir: Path) -> Path | None:
        """The latest checkpoint as a drop-in model directory (training.export), written by rank 0 alone, tensor
        by tensor from the checkpoint files; the other ranks are done (no collective waits on a long export)."""
        from training.export import export_ema

        last = ckpt.latest_checkpoint(self.ckpt_root)
        barrier(self.env)  # every rank sees the same latest checkpoint
        if self.env.is_main and last is not None:
            export_ema(self.cfg, last, out_dir, self.tokenizer)
            self.log.message(f"exported EMA weights of {last.name} to {out_dir}")
        return out_dir if last is not None else None


def train(cfg: Config) -> TrainState:
    return Trainer(cfg).setup().train()
