"""The assembled Bagel model and its training forward on a packed sequence.

Submodules and parameter names are the official ones (`language_model` = Qwen2ForCausalLM with `.model`
and `.lm_head`, `time_embedder`, `vae2llm`, `llm2vae`, `latent_pos_embed`, `vit_model`, `connector`,
`vit_pos_embed`, built in the official order so `state_dict()` order matches the release too).

The training forward (official `Bagel.forward`): text ids -> embed_tokens; ViT patches -> SigLIP ->
connector -> + vit_pos_embed; VAE latents -> patchify -> x_t = (1-t) x0 + t eps (bagel_ft.flow) ->
vae2llm(x_t) + time_embedder(t) + latent_pos_embed; everything scattered into one packed sequence; the
MoT LLM with und = text + ViT positions and gen = VAE latent positions; then lm_head at the CE positions
and llm2vae at the MSE positions.

How we depart from the official code (numerics in float32 are unchanged; tests/test_bagel_reference.py):
  * The FLUX autoencoder is NOT a submodule: it is attached with `attach_vae()` and kept outside
    `state_dict()` / `parameters()` (it ships as a separate `ae.safetensors`, is frozen, and must stay out
    of FSDP wrapping and optimizers). `.to()` / `.float()` etc. still move it along (`_apply`).
  * VAE encoding inside `forward` uses the posterior mean; the official training samples z. Pass
    `padded_latent` (encoded by the data pipeline, sampled or not) to choose otherwise.
  * `forward` builds the attention mask itself from `split_lens` / `attn_modes` (bagel_ft.attention);
    the backend ("sdpa" dense per-sample masks, "flex", "flash") is one switch (`set_attn_backend`);
    official `nested_attention_masks` are not an input (tests prove our masks equal them).
  * `forward` returns predictions and targets (`BagelOutput`), not losses: loss reduction is the training
    loop's. The noise may be given in the batch (`PackedBatch.noise`) for reproducibility.
  * No hard-coded bfloat16 casts: the model's dtype (or autocast) decides. No `freeze_und` detaches:
    freeze with `requires_grad_(False)`. MoT routing lives in one helper (`bagel_ft.qwen2.apply_experts`).
  * Inference methods (KV-cache prefill, `_forward_flow`, TaylorSeer) are not here; the `inference`
    package drives the small helpers below (`embed_text`, `embed_vit`, `embed_vae_latents`,
    `predict_velocity`, `language_model(..., mode=, cache=)`).
  * Only "extrapolate" position ids (`interpolate_pos=False`, the release's setting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagel_ft.attention import ATTN_BACKENDS, AttentionSpec
from bagel_ft.autoencoder import AutoEncoder
from bagel_ft.batch import PackedBatch
from bagel_ft.config import BagelConfig
from bagel_ft.embeddings import MLPconnector, PositionEmbedding, TimestepEmbedder, patchify_latent
from bagel_ft.flow import interpolate, training_timesteps, velocity_target
from bagel_ft.qwen2 import Qwen2ForCausalLM
from bagel_ft.siglip import SiglipVisionModel

# Fixed 2-D sin-cos tables: parameters with requires_grad=False, recomputed at construction.
SINCOS_TABLE_KEYS = ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")


@dataclass
class BagelOutput:
    """What the training forward predicts (shapes: Nce CE positions, Nmse noisy latent tokens, D = p*p*z)."""

    hidden: Tensor  # [L, H] final hidden states (after norm / norm_moe_gen)
    ce_logits: Tensor | None = None  # [Nce, V] lm_head at ce_loss_indexes (labels: batch.packed_label_ids)
    mse_pred: Tensor | None = None  # [Nmse, D] predicted velocity llm2vae(h) at mse_loss_indexes
    mse_target: Tensor | None = None  # [Nmse, D] velocity target (noise - x0) of the tokens with t > 0
    timesteps: Tensor | None = None  # [Nz] t of every VAE token after sigmoid + shift (0 = clean)


class Bagel(nn.Module):
    def __init__(self, config: BagelConfig):
        super().__init__()
        config.validate()
        self.config = config
        llm, arch = config.llm, config.arch
        hidden = llm.hidden_size
        self.language_model = Qwen2ForCausalLM(llm)
        if arch.visual_gen:
            self.time_embedder = TimestepEmbedder(hidden)
            self.vae2llm = nn.Linear(config.patch_latent_dim, hidden)
            self.llm2vae = nn.Linear(hidden, config.patch_latent_dim)
            self.latent_pos_embed = PositionEmbedding(arch.max_latent_size, hidden)
        if arch.visual_und:
            self.vit_model = SiglipVisionModel(config.vit)
            self.connector = MLPconnector(config.vit.hidden_size, hidden, arch.connector_act)
            self.vit_pos_embed = PositionEmbedding(arch.vit_max_num_patch_per_side, hidden)
        self.init_weights()

    # ---- construction ---------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init: LLM N(0, initializer_range) with gen twins copied from und; llm2vae zero."""
        self.language_model.init_weights()
        if self.config.arch.visual_gen:
            self.llm2vae.weight.zero_()
            self.llm2vae.bias.zero_()

    @property
    def vae(self) -> AutoEncoder | None:
        """The FLUX autoencoder (not a submodule: see the module docstring), or None."""
        return self.__dict__.get("_vae")

    def attach_vae(self, vae: AutoEncoder | None) -> Bagel:
        """Use `vae` to encode `padded_images`; it is frozen and kept out of state_dict / parameters."""
        if vae is not None:
            vae.requires_grad_(False).eval()
        self.__dict__["_vae"] = vae  # bypass nn.Module.__setattr__, which would register it
        return self

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half() / to_empty() also reach the VAE
        super()._apply(fn, recurse)
        if self.vae is not None:
            self.vae._apply(fn, recurse)
        return self

    def set_attn_backend(self, backend: str) -> Bagel:
        """Choose the attention backend of the LLM: "sdpa" (default), "flex" or "flash"."""
        if backend not in ATTN_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTN_BACKENDS}")
        self.language_model.model.attn_backend = backend
        return self

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", load_vae: bool = True) -> Bagel:
        """Strictly load a checkpoint directory in the official layout (see bagel_ft.checkpoint)."""
        from bagel_ft.checkpoint import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, load_vae=load_vae)

    def save_pretrained(self, path, dtype: torch.dtype | None = None, max_shard_bytes: int = 0) -> None:
        """Write configs + ema.safetensors (+ ae.safetensors) atomically, the weights cast to `dtype` if given,
        sharded with an index above `max_shard_bytes` if > 0 (see bagel_ft.checkpoint)."""
        from bagel_ft.checkpoint import save_pretrained

        save_pretrained(self, path, dtype, max_shard_bytes)

    # ---- the pieces inference reuses ------------------------------------------------------------
    def embed_text(self, token_ids: Tensor) -> Tensor:
        """[N] token ids -> [N, H]."""
        return self.language_model.model.embed_tokens(token_ids)

    def embed_vit(
        self, packed_vit_tokens: Tensor, packed_vit_position_ids: Tensor, vit_token_seqlens: Tensor
    ) -> Tensor:
        """ViT patches [Nv, p*p*3] of several images (tokens per image [n]) -> LLM inputs [Nv, H]."""
        cu_seqlens = F.pad(torch.cumsum(vit_token_seqlens, dim=0), (1, 0)).to(torch.int32)
        features = self.vit_model(packed_vit_tokens, packed_vit_position_ids, cu_seqlens, int(vit_token_seqlens.max()))
        return self.connector(features) + self.vit_pos_embed(packed_vit_position_ids)

    @torch.no_grad()
    def encode_images(self, padded_images: Tensor) -> Tensor:
        """Images [n, 3, H, W] in [-1, 1] -> normalised VAE latents [n, z, H/f, W/f] (posterior mean)."""
        if self.vae is None:
            raise RuntimeError("Bagel.forward got padded_images but no VAE is attached (attach_vae / from_pretrained)")
        return self.vae.encode(padded_images.to(next(self.vae.parameters()).dtype), sample=False)

    def patchify_latents(self, padded_latent: Tensor, shapes) -> Tensor:
        """Padded latents [n, z, hmax*p, wmax*p] and token grids [(h, w)] -> clean tokens [sum h*w, p*p*z]."""
        p = self.config.arch.latent_patch_size
        return torch.cat(
            [
                patchify_latent(latent[:, : h * p, : w * p], p)
                for latent, (h, w) in zip(padded_latent, shapes, strict=True)
            ]
        )

    def embed_vae_latents(self, x_t: Tensor, t: Tensor, position_ids: Tensor) -> Tensor:
        """Noisy latent tokens x_t [Nz, D] at times t [Nz] (0 = clean) and grid ids [Nz] -> LLM inputs [Nz, H]."""
        x_t = x_t.to(self.vae2llm.weight.dtype)
        return self.vae2llm(x_t) + self.time_embedder(t) + self.latent_pos_embed(position_ids)

    def predict_velocity(self, hidden: Tensor) -> Tensor:
        """Final hidden states [N, H] of latent tokens -> velocity [N, D] (noise - x0 convention)."""
        return self.llm2vae(hidden)

    # ---- training forward -----------------------------------------------------------------------
    def forward(self, batch: PackedBatch) -> BagelOutput:
        text = self.embed_text(batch.packed_text_ids)
        seq = text.new_zeros(batch.sequence_length, self.config.llm.hidden_size)  # [L, H]
        seq[batch.packed_text_indexes] = text

        if batch.has_vit:
            vit = self.embed_vit(batch.packed_vit_tokens, batch.packed_vit_position_ids, batch.vit_token_seqlens)
            seq[batch.packed_vit_token_indexes] = vit.to(seq.dtype)

        t = clean = noise = None
        if batch.has_vae:
            padded = batch.padded_latent if batch.padded_latent is not None else self.encode_images(batch.padded_images)
            clean = self.patchify_latents(padded, batch.patchified_vae_latent_shapes)  # x0 [Nz, D]
            noise = batch.noise if batch.noise is not None else torch.randn_like(clean)
            t = training_timesteps(batch.packed_timesteps, self.config.arch.timestep_shift)  # [Nz]
            x_t = interpolate(clean, noise.to(clean.dtype), t)
            vae = self.embed_vae_latents(x_t, t, batch.packed_latent_position_ids)
            seq[batch.packed_vae_token_indexes] = vae.to(seq.dtype)

        attn = AttentionSpec(batch.sample_lens, batch.split_lens, batch.attn_modes)
        mode = "gen" if batch.has_vae else "und"
        hidden = self.language_model(
            seq, batch.packed_position_ids, attn, mode=mode, gen_indexes=batch.packed_vae_token_indexes
        )

        out = BagelOutput(hidden=hidden, timesteps=t)
        if batch.ce_loss_indexes is not None:
            out.ce_logits = self.language_model.lm_head(hidden[batch.ce_loss_indexes])
        if batch.has_vae and batch.mse_loss_indexes is not None:
            out.mse_pred = self.predict_velocity(hidden[batch.mse_loss_indexes])
            out.mse_target = velocity_target(clean, noise.to(clean.dtype))[t > 0]
        return out
