"""Per-device memory estimate of a training run (`bagel-ft train CONFIG --dry-run`), and the fit check.

Parameter counts are exact: the model is built on the meta device with the run's freezing / LoRA applied.
Bytes per parameter by sharding (W = processes; P = all Bagel parameters, Pt = trainable ones):

                      none            fsdp (FSDP2 full shard)          zero2 (DeepSpeed)
  weights             4 P             4 P / W  (fp32 master)           2|4 P (bf16|fp32, replicated)
  working params      -               (root unit + 2 layers) x b       -   (all-gathered in compute dtype)
  grads               4 Pt            4 Pt / W                         4 Pt / W
  optimizer (AdamW)   8 Pt            8 Pt / W                         8|12 Pt / W (+fp32 master with bf16)
  EMA (fp32)          4 Pt            4 Pt / W                         4 Pt      (0 with optim.ema_decay=0)
  VAE (frozen)        4 P_vae everywhere (replicated, never sharded)
zero3 (DeepSpeed) is zero2 with the weights and the EMA divided by W too, and fsdp's working params (an upper
bound: ZeRO-3 gathers per submodule, finer than the root unit).

Activations of one packed sequence of T = data.max_num_tokens tokens, b bytes per element of the compute dtype,
per decoder layer and token (saved for backward, counted from bagel_ft.qwen2: norms keep input + output, every
MoT `apply_experts` keeps its row-gathered input, RoPE keeps q/k and their rotations, SwiGLU keeps 4 I-wide
tensors):  A_layer = (14 H + 6 KV + 4 I) b.  Attention on CPU (sdpa with dense masks) also keeps the
probabilities, heads x sum(sample_len^2) x 4 bytes per layer; flash / flex on GPU do not.
  no activation checkpointing:   L x T x A_layer (+ attention)
  activation checkpointing:      L x T x H x b (layer inputs) + T x A_layer (+ attention) of the layer recomputed
Plus the lm_head at the CE positions (fp32 logits, log-softmax and their grad: 3 x 4 x Nce x V, Nce assumed
`ce_fraction` T), embeddings / sequence buffers (4 T H b) and the SigLIP layers on `vit_fraction` T tokens
(same rule with its H, I). The VAE encode (no grad) runs before the LLM and frees its maps; its transient peak
(3 x ch x pixels x 4 bytes) counts only if it exceeds the training peak.

The estimate is checked against measured numbers in tests/test_training_memory.py (tiny model, CPU: exact
parameter/grad/optimizer/EMA bytes, and the bytes autograd actually saves for backward).

Host RAM per rank (`host_estimate`, beyond the process itself: Python, torch, CUDA context), f = bytes per
element of the checkpoint file (2 for the release), L = the largest tensor's elements, W = processes:
  loading, FSDP + pretrained    L/W (f + 4): one tensor's rows of this rank's shard, read and cast (training.loading)
                                (+ 4 P / W shards + 4 P_vae when training on CPU)
  loading, other shardings      L (f + 4): from_pretrained onto the device one tensor at a time (+ 4 P + 4 P_vae
                                on CPU); model.init=random builds 4 P + 4 P_vae on every rank
  export (rank 0 only)          L (4 + e): one float32 tensor from the checkpoint and its copy in the export dtype
Measured against benchmarks/load_rss.py (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from bagel_ft.config import BagelConfig
from common.errors import UserError
from training.config import Config

GiB = 1024**3
CE_FRACTION = 0.1  # assumed share of supervised text positions in a pack (dry run only)
VIT_FRACTION = 0.25  # assumed share of ViT tokens
VAE_FRACTION = 0.6  # assumed share of VAE latent tokens (for the VAE encode peak)


@dataclass
class ParamCounts:
    total: int  # Bagel parameters (incl. frozen; excl. the VAE)
    trainable: int
    layer_unit: int  # one FSDP unit (a decoder layer)
    root_unit: int  # the FSDP root unit (everything outside the decoder layers)
    vae: int
    largest: int  # elements of the largest Bagel tensor (the embedding / lm_head at 7B)

    @classmethod
    def of(cls, cfg: Config, mcfg: BagelConfig) -> ParamCounts:
        """Exact counts from a meta-device model with the run's freezing / LoRA."""
        from bagel_ft.autoencoder import AutoEncoder
        from bagel_ft.modeling import Bagel
        from training.lora import apply_lora
        from training.parallelize import apply_freezing, fsdp_units

        with torch.device("meta"):
            model = Bagel(mcfg)
            vae = AutoEncoder(mcfg.vae)
            apply_freezing(model, cfg)
            if cfg.lora.enabled:
                apply_lora(model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
        total = sum(p.numel() for p in model.parameters())
        units = [sum(p.numel() for p in unit.parameters()) for unit in fsdp_units(model)]
        return cls(
            total,
            sum(p.numel() for p in model.parameters() if p.requires_grad),
            max(units),
            total - sum(units),
            sum(p.numel() for p in vae.parameters()),
            max(p.numel() for p in model.parameters()),
        )


@dataclass
class ActivationShape:
    """What one packed sequence holds (assumed from the config for a dry run, or taken from a real batch)."""

    tokens: int
    ce_tokens: int
    vit_tokens: int
    sample_lens: list[int]
    vae_pixels: int

    @classmethod
    def assumed(cls, cfg: Config, mcfg: BagelConfig) -> ActivationShape:
        t = cfg.data.max_num_tokens
        per_sample = min(t, cfg.data.max_num_tokens_per_sample)
        samples = [per_sample] * (t // per_sample) + ([t % per_sample] if t % per_sample else [])
        return cls(
            t, int(CE_FRACTION * t), int(VIT_FRACTION * t), samples, int(VAE_FRACTION * t) * mcfg.latent_downsample**2
        )

    @classmethod
    def of_batch(cls, batch) -> ActivationShape:
        return cls(
            batch.sequence_length,
            0 if batch.ce_loss_indexes is None else batch.ce_loss_indexes.numel(),
            batch.packed_vit_tokens.shape[0] if batch.has_vit else 0,
            list(batch.sample_lens),
            0 if batch.padded_images is None else batch.padded_images[:, 0].numel(),
        )


@dataclass
class MemoryEstimate:
    weights: float
    working_params: float
    grads: float
    optimizer: float
    ema: float
    vae: float
    activations: float
    vae_encode_peak: float

    @property
    def total(self) -> float:
        static = self.weights + self.working_params + self.grads + self.optimizer + self.ema + self.vae
        return static + max(self.activations, self.vae_encode_peak)

    def table(self, title: str = "per-device memory estimate") -> str:
        rows = [f"{title}:"]
        for f in fields(self):
            rows.append(f"  {f.name:<16} {getattr(self, f.name) / GiB:9.3f} GiB")
        rows.append(f"  {'total':<16} {self.total / GiB:9.3f} GiB   (static + max(activations, vae_encode_peak))")
        return "\n".join(rows)


def layer_activation_elems(hidden: int, kv: int, inter: int) -> int:
    """Elements saved for backward per token by one (LLM) decoder layer, see the module doc."""
    return 14 * hidden + 6 * kv + 4 * inter


def vit_layer_activation_elems(hidden: int, inter: int) -> int:
    """SigLIP layer per token: 2 LayerNorms (in + out), q/k/v/out inputs, q/k/v, attention out, MLP (fc1 in/out,
    gelu out, fc2 in)."""
    return 4 * hidden + 4 * hidden + 3 * hidden + hidden + 3 * inter + hidden


def estimate(
    counts: ParamCounts,
    mcfg: BagelConfig,
    shape: ActivationShape,
    sharding: str,
    world: int,
    compute_bytes: int,
    activation_checkpointing: bool,
    device_type: str,
    ema: bool = True,
) -> MemoryEstimate:
    llm, vit = mcfg.llm, mcfg.vit
    w = world if sharding in ("fsdp", "zero3") else 1
    g = world if sharding in ("fsdp", "zero2", "zero3") else 1
    ds_bf16 = sharding in ("zero2", "zero3") and compute_bytes == 2
    weights = (2 if ds_bf16 else 4) * counts.total / w
    # gathered at once: the root unit (whole forward) + the current and the prefetched layer
    gathered = counts.root_unit + 2 * counts.layer_unit
    working = gathered * compute_bytes if sharding in ("fsdp", "zero3") and world > 1 else 0
    grads = 4 * counts.trainable / g
    optimizer = (12 if ds_bf16 else 8) * counts.trainable / g
    ema = 4 * counts.trainable / w if ema else 0
    vae = 4 * counts.vae

    T, b = shape.tokens, compute_bytes
    kv = llm.num_key_value_heads * llm.head_dim
    per_layer = layer_activation_elems(llm.hidden_size, kv, llm.intermediate_size) * b
    attn = llm.num_attention_heads * sum(n * n for n in shape.sample_lens) * 4 if device_type == "cpu" else 0
    vit_layers = vit.num_layers_built
    vit_per_layer = vit_layer_activation_elems(vit.hidden_size, vit.intermediate_size) * b
    if activation_checkpointing:
        llm_act = llm.num_hidden_layers * T * llm.hidden_size * b + T * per_layer + attn
        vit_act = vit_layers * shape.vit_tokens * vit.hidden_size * b + shape.vit_tokens * vit_per_layer
    else:
        llm_act = llm.num_hidden_layers * (T * per_layer + attn)
        vit_act = vit_layers * shape.vit_tokens * vit_per_layer
    head = 3 * 4 * shape.ce_tokens * llm.vocab_size
    buffers = 4 * T * llm.hidden_size * b
    activations = llm_act + vit_act + head + buffers
    vae_peak = 3 * mcfg.vae.ch * shape.vae_pixels * 4
    return MemoryEstimate(weights, working, grads, optimizer, ema, vae, activations, vae_peak)


def estimate_for_config(
    cfg: Config, mcfg: BagelConfig, world: int, device_type: str, shape: ActivationShape | None = None
) -> MemoryEstimate:
    gpu = device_type == "cuda" or (cfg.train.device == "cuda")
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and gpu)
    return estimate(
        ParamCounts.of(cfg, mcfg),
        mcfg,
        shape or ActivationShape.assumed(cfg, mcfg),
        cfg.train.sharding,
        world,
        2 if bf16 else 4,
        cfg.train.activation_checkpointing,
        "cuda" if gpu else device_type,
        ema=cfg.optim.ema_decay > 0,
    )


@dataclass
class HostMemory:
    """Host RAM per rank for loading and for export (bytes, beyond the process itself), and how it loads."""

    loading: float
    export: float
    full_state_dict: float  # a full state dict per rank, cast to float32 (the official trainer's way), for contrast
    how: str

    def table(self, title: str = "host RAM per rank") -> str:
        return "\n".join(
            [
                f"{title}, beyond the process itself (Python, torch, CUDA context):",
                f"  {'loading':<16} {self.loading / GiB:9.3f} GiB   {self.how}",
                f"  {'export':<16} {self.export / GiB:9.3f} GiB   rank 0 only, tensor by tensor (fp32 read + its copy "
                "in the export dtype); the other ranks are done",
                f"  ({'a full state dict per rank, cast to fp32, would take'} {self.full_state_dict / GiB:.1f} GiB)",
            ]
        )


def host_estimate(
    cfg: Config, mcfg: BagelConfig, world: int, device_type: str, file_bytes: int = 2, export_bytes: int = 2
) -> HostMemory:
    """Host RAM per rank (module doc); `file_bytes` / `export_bytes`: bytes per element of the checkpoint file
    and of the export (2 = bf16, the release)."""
    from training.loading import sharded_loading

    counts = ParamCounts.of(cfg, mcfg)
    p, largest, vae, f = counts.total, counts.largest, counts.vae, file_bytes
    on_cpu = device_type == "cpu"
    if cfg.model.init == "random":
        loading, how = 4 * (p + vae), "model.init=random: every rank builds the whole model, then shards it"
    elif sharded_loading(cfg):
        loading = largest / world * (f + 4) + (4 * p / world + 4 * vae if on_cpu else 0)
        how = "FSDP: each rank reads only its shards' rows, one tensor at a time" + (
            " (+ its shards)" if on_cpu else ""
        )
    else:
        loading = largest * (f + 4) + (4 * (p + vae) if on_cpu else 0)
        how = f"{cfg.train.sharding}: every rank loads every weight, one tensor at a time onto {device_type}"
    full = p * f + (4 * p if f != 4 else 0)
    return HostMemory(loading, largest * (4 + export_bytes), full, how)


class MemoryFitError(UserError, RuntimeError):
    """The run cannot fit the device memory; the message shows the estimate and what to change."""


def device_memory_gb(cfg: Config, device: torch.device) -> float:
    if cfg.train.gpu_memory_gb > 0:
        return cfg.train.gpu_memory_gb
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory / GiB
    return 0.0  # CPU (or no GPU to ask): no check


def check_fit(est: MemoryEstimate, cfg: Config, device: torch.device, headroom: float = 0.9) -> None:
    """Refuse to start when the estimate exceeds `headroom` x the device memory (allocator fragmentation etc.)."""
    capacity = device_memory_gb(cfg, device)
    if capacity <= 0:
        return
    need = est.total / GiB
    if need > headroom * capacity:
        raise MemoryFitError(
            f"the run does not fit: estimated {need:.1f} GiB per device > {headroom:.0%} of {capacity:.1f} GiB "
            f"(train.gpu_memory_gb or detected).\n{est.table()}\nTry: train.sharding=fsdp, "
            "train.activation_checkpointing=true, a smaller data.max_num_tokens, freeze.* or lora.enabled=true, "
            "or more processes."
        )
