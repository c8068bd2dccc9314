"""Incremental cached inference == the training forward on the whole stream.

The stream `prompt | clean VAE image | ViT image | text` is run (a) through the engine — segment by
segment, the last text token by token, each step on the KV cache — and (b) as one packed training
forward (`Bagel.forward`, attention rules of bagel_ft.attention). The next-token logits of every text
position and the velocity of a noisy image at the end must agree, as must the decoded text and the
position ids."""

from __future__ import annotations

import math

import pytest
import torch

from bagel_ft.batch import PackedBatch
from bagel_ft.embeddings import latent_position_ids
from bagel_ft.siglip import patchify_image, vit_position_ids
from bagel_ft.tokenizer import ByteTokenizer
from inference.settings import TextSettings

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: 1 thread, ~10x faster for tiny models


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine


def full_forward(engine, prompt_ids, vae_img, vit_img, text_ids, noisy_x, t):
    """The same stream as one packed training batch; returns (logits at every text2 position, velocity)."""
    model, cfg = engine.model, engine.config
    f, patch = cfg.latent_downsample, cfg.vit.patch_size
    tok = ByteTokenizer
    vh, vw = vae_img.shape[1] // f, vae_img.shape[2] // f
    ih, iw = vit_img.shape[1] // patch, vit_img.shape[2] // patch
    nz, nv, n_noisy = vh * vw, ih * iw, noisy_x.shape[0]
    text1 = [tok.bos_id, *prompt_ids, tok.eos_id]
    text2 = [tok.bos_id, *text_ids]
    lens = [len(text1), nz + 2, nv + 2, len(text2), n_noisy + 2]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    r1 = len(text1)  # RoPE: text consecutive, each image one id (+1), noisy image at the current id
    pos = list(range(r1)) + [r1] * (nz + 2) + [r1 + 1] * (nv + 2)
    r2 = r1 + 2
    pos += list(range(r2, r2 + len(text2))) + [r2 + len(text2)] * (n_noisy + 2)
    text_ids_all, text_idx = [], []
    for s, ids in ((starts[0], text1), (starts[3], text2)):
        text_ids_all += ids
        text_idx += list(range(s, s + len(ids)))
    for s, n in ((starts[1], nz), (starts[2], nv), (starts[4], n_noisy)):
        text_ids_all += [tok.vision_start_id, tok.vision_end_id]
        text_idx += [s, s + n + 1]
    latent = model.encode_images(vae_img[None])
    nh, nw = 2, n_noisy // 2  # the noisy image is given as latent tokens (replaced below)
    padded = torch.zeros(2, latent.shape[1], max(latent.shape[2], nh * 2), max(latent.shape[3], nw * 2))
    padded[0, :, : latent.shape[2], : latent.shape[3]] = latent[0]
    batch = PackedBatch(
        sequence_length=sum(lens),
        sample_lens=[sum(lens)],
        packed_position_ids=torch.tensor(pos),
        split_lens=lens,
        attn_modes=["causal", "full", "full", "causal", "noise"],
        packed_text_ids=torch.tensor(text_ids_all),
        packed_text_indexes=torch.tensor(text_idx),
        ce_loss_indexes=torch.arange(starts[3], starts[3] + len(text2)),
        packed_vit_tokens=patchify_image(vit_img, patch),
        packed_vit_position_ids=vit_position_ids(ih, iw, cfg.arch.vit_max_num_patch_per_side),
        packed_vit_token_indexes=torch.arange(starts[2] + 1, starts[2] + 1 + nv),
        vit_token_seqlens=torch.tensor([nv]),
        padded_latent=padded,
        patchified_vae_latent_shapes=[(vh, vw), (nh, nw)],
        packed_latent_position_ids=torch.cat(
            [
                latent_position_ids(vh, vw, cfg.arch.max_latent_size),
                latent_position_ids(nh, nw, cfg.arch.max_latent_size),
            ]
        ),
        packed_vae_token_indexes=torch.cat(
            [torch.arange(starts[1] + 1, starts[1] + 1 + nz), torch.arange(starts[4] + 1, starts[4] + 1 + n_noisy)]
        ),
        packed_timesteps=torch.tensor([-math.inf] * nz + [math.log(t / (1 - t))] * n_noisy),
        mse_loss_indexes=torch.arange(starts[4] + 1, starts[4] + 1 + n_noisy),
    )
    batch.validate()
    # x_t = (1 - t) x0 + t noise: the noisy image's x0 is 0 (padded[1]), so noise = x_t / t gives x_t = noisy_x
    batch.noise = torch.cat([torch.zeros(nz, noisy_x.shape[1]), noisy_x / t])
    with torch.no_grad():
        out = model(batch)
    return out.ce_logits, out.mse_pred


def test_cached_incremental_equals_full_forward(engine, ref_inputs):
    tok = ByteTokenizer()
    prompt, text = tok.encode("a red ball"), tok.encode("<ins>ok</ins>")
    vae_img, vit_img = ref_inputs["image_img_vae_cond"], ref_inputs["image_img_vit"]
    noisy = torch.randn(6, engine.config.patch_latent_dim, generator=torch.Generator().manual_seed(0))
    t = 0.7

    ctx = engine.new_context()
    engine.update_text(ctx, prompt)
    engine.update_image(ctx, vae_img, vit=False)
    engine.update_vit(ctx, vit_img)
    out = engine.decode_text(ctx, TextSettings(max_tokens=len(text)), prefix=text[:3], keep_step_logits=True)
    ids, cached_logits = out.ids, out.step_logits  # forced prefix, then greedy
    v_cached = engine.velocity(ctx, noisy, t, 2, 3)

    full_logits, v_full = full_forward(engine, prompt, vae_img, vit_img, ids, noisy, t)
    assert cached_logits.shape == full_logits.shape
    assert (cached_logits - full_logits).abs().max().item() <= TOL
    assert (v_cached - v_full).abs().max().item() <= TOL
    assert ctx.rope == len(prompt) + 2 + 2 + 1 + len(ids)
    # greedy ids really are the argmax of the previous row (after the forced prefix)
    assert ids[3:] == cached_logits[3:-1].argmax(-1).tolist()
