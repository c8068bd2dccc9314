"""Make every pack run every trainable submodule, so all ranks issue the same collectives (DeepSpeed ZeRO-3).

ZeRO-3 gathers a submodule's parameters with a collective when the submodule runs, so every rank must run the
same submodules in the same order. A pack without a ViT image skips the ViT + connector; one without a noisy
VAE target skips llm2vae (and, without any VAE image, vae2llm / time_embedder / latent_pos_embed and every
`*_moe_gen` expert of the MoT layers). `pad_unused_modules` appends ONE isolated dummy sample to such a pack,
its image blocks laid out like any other (`bagel_ft.segments.image_segment`: markers, one RoPE id each):

    [ViT block: 1 zero patch, "full"]   if the pack has no ViT tokens
    [VAE block: 1 zero latent token, raw timestep 0, "noise", in mse_loss_indexes]   if it has no noisy VAE target

and empty CE tensors when the pack has none (lm_head then runs on 0 rows). Being its own sample it is
attention-isolated from the real ones (block-diagonal), and being last its noisy token is the LAST row of
`mse_pred` / `mse_target`. `strip_dummy` removes that row from the output and returns `0 * (every hidden
state + every head output)`, which the trainer adds to the loss: every module then takes part in forward AND
backward (ZeRO-3 gathers again in backward) with an exactly zero extra gradient, and the real losses are those
of the unpadded pack.

The model stays single-device and unaware: this is a batch transform applied by the trainer after the VAE
encode (the dummy is given as a latent, so the VAE and its posterior sample see only the real images).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from bagel_ft.batch import PackedBatch
from bagel_ft.config import BagelConfig
from bagel_ft.modeling import BagelOutput
from bagel_ft.segments import image_segment
from bagel_ft.tokenizer import SpecialTokens


@dataclass(frozen=True)
class Padding:
    vit: bool = False  # a dummy ViT patch was appended
    vae: bool = False  # a dummy noisy VAE token was appended (the last mse row)


def _cat(t: torch.Tensor | None, extra: torch.Tensor) -> torch.Tensor:
    return extra if t is None else torch.cat([t, extra.to(t.dtype)])


def pad_unused_modules(batch: PackedBatch, mcfg: BagelConfig, special: SpecialTokens) -> tuple[PackedBatch, Padding]:
    """`batch` (VAE latents already encoded) + the dummy sample its pack needs (module doc); a new batch."""
    has_noisy = batch.mse_loss_indexes is not None and batch.mse_loss_indexes.numel() > 0
    need_vit = mcfg.arch.visual_und and not batch.has_vit
    need_vae = mcfg.arch.visual_gen and not has_noisy
    if batch.has_vae and batch.padded_latent is None:
        raise ValueError("pad_unused_modules: encode the VAE images first (batch.padded_latent is None)")
    dev, long = batch.packed_position_ids.device, torch.long
    idx = lambda *v: torch.tensor(v, dtype=long, device=dev)  # noqa: E731
    b, segments = replace(batch), []
    if need_vit:
        p = mcfg.vit.patch_size
        seg = image_segment(batch.sequence_length, 0, 1)
        b.packed_vit_tokens = _cat(batch.packed_vit_tokens, torch.zeros(1, p * p * 3, device=dev))
        b.packed_vit_position_ids = _cat(batch.packed_vit_position_ids, idx(0))
        b.packed_vit_token_indexes = _cat(batch.packed_vit_token_indexes, idx(*seg.inner))
        b.vit_token_seqlens = _cat(batch.vit_token_seqlens, idx(1))
        segments.append(seg)
    if need_vae:
        p, d = mcfg.arch.latent_patch_size, mcfg.patch_latent_dim
        z = d // (p * p)
        if batch.padded_latent is None:
            latent = torch.zeros(1, z, p, p, device=dev)
        else:  # one more padded image whose (1, 1) token grid reads its top-left p x p corner
            latent = torch.zeros(1, *batch.padded_latent.shape[1:], device=dev, dtype=batch.padded_latent.dtype)
        seg = image_segment(segments[-1].end if segments else batch.sequence_length,
                            segments[-1].next_rope if segments else 0, 1, noisy=True)  # fmt: skip
        b.padded_latent = _cat(batch.padded_latent, latent)
        b.patchified_vae_latent_shapes = [*batch.patchified_vae_latent_shapes, (1, 1)]
        b.packed_latent_position_ids = _cat(batch.packed_latent_position_ids, idx(0))
        b.packed_vae_token_indexes = _cat(batch.packed_vae_token_indexes, idx(*seg.inner))
        b.packed_timesteps = _cat(batch.packed_timesteps, torch.zeros(1, device=dev))  # t = sigmoid(0) > 0: noisy
        b.mse_loss_indexes = _cat(batch.mse_loss_indexes, idx(*seg.inner))
        if batch.noise is not None or not batch.has_vae:  # keep "no fixed noise" (model draws) as it was
            b.noise = _cat(batch.noise, torch.zeros(1, d, device=dev))
        segments.append(seg)
    if batch.ce_loss_indexes is None:  # lm_head runs (on 0 rows) in every pack
        b.ce_loss_indexes, b.packed_label_ids = idx(), idx()
    if segments:
        b.sequence_length = segments[-1].end
        b.sample_lens = [*batch.sample_lens, segments[-1].end - segments[0].start]
        b.split_lens = [*batch.split_lens, *(seg.length for seg in segments)]
        b.attn_modes = [*batch.attn_modes, *(seg.attn_mode for seg in segments)]
        b.packed_position_ids = _cat(batch.packed_position_ids, idx(*(i for seg in segments for i in seg.position_ids)))
        markers = [special.vision_start_id, special.vision_end_id] * len(segments)
        b.packed_text_ids = _cat(batch.packed_text_ids, idx(*markers))
        b.packed_text_indexes = _cat(batch.packed_text_indexes, idx(*(i for seg in segments for i in seg.ends)))
    return b, Padding(need_vit, need_vae)


def strip_dummy(out: BagelOutput, padding: Padding) -> tuple[BagelOutput, torch.Tensor]:
    """The output of the real tokens only, and the zero loss term that reaches every module the dummy ran."""
    # every head output, not just the dummy's: a pack without CE labels must still run lm_head's backward
    zero = sum(t.sum() * 0.0 for t in (out.hidden, out.ce_logits, out.mse_pred) if t is not None)
    if padding.vae:
        out = replace(out, mse_pred=out.mse_pred[:-1], mse_target=out.mse_target[:-1])
    return out, zero
