"""Build the tiny model (or load a checkpoint), save it in the official layout, reload it strictly,
and run a packed forward pass on a synthetic interleaved batch.

  bagel-ft model --out runs/tiny-model                 # tiny preset, random init (CPU, ~1 s)
  bagel-ft model --ckpt path/to/checkpoint --out DIR   # any checkpoint in the official layout

The batch holds two samples: [text (CE), clean VAE image, ViT image, text, noisy VAE image (MSE), text (CE)]
and [text, noisy VAE image (MSE)], built from solid and random-noise images (no data needed). For brevity a
noisy target is not followed by its clean copy (the training packer adds one); this only shows the forward runs.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bagel_ft.batch import PackedBatch
from bagel_ft.config import BagelConfig


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="directory to write the checkpoint into")
    parser.add_argument("--preset", default="tiny", help="model preset when no --ckpt is given (tiny, bagel-7b-mot)")
    parser.add_argument("--ckpt", default=None, help="load this checkpoint directory instead of building a preset")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random init and the synthetic batch")


def run(args) -> int:
    from bagel_ft.autoencoder import AutoEncoder
    from bagel_ft.modeling import Bagel

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.ckpt:
        model = Bagel.from_pretrained(args.ckpt)
    else:
        config = BagelConfig.preset(args.preset)
        model = Bagel(config).attach_vae(AutoEncoder(config.vae))
    model.save_pretrained(args.out)
    model = Bagel.from_pretrained(args.out)  # strict: proves the written checkpoint is complete
    model.eval()

    batch = build_demo_batch(model.config, torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        out = model(batch)
    ce = F.cross_entropy(out.ce_logits, batch.packed_label_ids)
    mse = F.mse_loss(out.mse_pred, out.mse_target)
    n_params = sum(p.numel() for p in model.parameters())
    n_vae = sum(p.numel() for p in model.vae.parameters())
    print(f"checkpoint      {args.out}")
    print(f"parameters      bagel {n_params:,}  + autoencoder {n_vae:,}")
    print(
        f"sequence        {batch.sequence_length} tokens in {len(batch.sample_lens)} samples {batch.sample_lens}; "
        f"{batch.packed_vae_token_indexes.numel()} VAE, {batch.packed_vit_tokens.shape[0]} ViT tokens"
    )
    print(f"ce loss         {ce.item():.4f}  ({out.ce_logits.shape[0]} tokens)")
    print(f"mse loss        {mse.item():.4f}  ({out.mse_pred.shape[0]} tokens)")
    print(f"time            {time.perf_counter() - start:.2f} s")
    return 0


# ---- a minimal packer for the demo (the real one lives in `training/`) --------------------------------


class DemoPacker:
    """BAGEL's packing rules for a few segment kinds, enough for a synthetic batch.

    Text: [bos] ids [eos], causal, CE on bos..last id with labels ids + [eos]. Image blocks: <soi> tokens
    <eoi> sharing one RoPE id; ViT and clean VAE blocks are "full" and advance the id by 1; a noisy VAE
    block is "noise", has MSE on its latent tokens, and does not advance the id."""

    def __init__(self, config: BagelConfig, tokenizer):
        self.cfg, self.tok = config, tokenizer
        self.length, self.rope, self.sample_start = 0, 0, 0
        self.f = {
            k: []
            for k in (
                "sample_lens",
                "split_lens",
                "attn_modes",
                "position_ids",
                "text_ids",
                "text_idx",
                "labels",
                "ce_idx",
                "vit_tokens",
                "vit_pos",
                "vit_idx",
                "vit_lens",
                "vae_images",
                "vae_shapes",
                "latent_pos",
                "vae_idx",
                "timesteps",
                "mse_idx",
            )
        }

    def _put_text(self, ids: list[int]) -> list[int]:
        idx = list(range(self.length, self.length + len(ids)))
        self.f["text_ids"] += ids
        self.f["text_idx"] += idx
        self.length += len(ids)
        return idx

    def _split(self, n: int, mode: str) -> None:
        self.f["split_lens"].append(n)
        self.f["attn_modes"].append(mode)

    def text(self, text: str, loss: bool) -> None:
        ids = [self.tok.bos_id, *self.tok.encode(text), self.tok.eos_id]
        idx = self._put_text(ids)
        self.f["position_ids"] += list(range(self.rope, self.rope + len(ids)))
        self.rope += len(ids)
        if loss:
            self.f["ce_idx"] += idx[:-1]
            self.f["labels"] += ids[1:]
        self._split(len(ids), "causal")

    def _image_block(self, n_tokens: int, put_tokens) -> None:
        self._put_text([self.tok.vision_start_id])
        put_tokens(list(range(self.length, self.length + n_tokens)))
        self.length += n_tokens
        self._put_text([self.tok.vision_end_id])
        self.f["position_ids"] += [self.rope] * (n_tokens + 2)

    def vit_image(self, image: torch.Tensor) -> None:
        from bagel_ft.siglip import patchify_image, vit_position_ids

        p = self.cfg.vit.patch_size
        h, w = image.shape[1] // p, image.shape[2] // p

        def put(idx):
            self.f["vit_tokens"].append(patchify_image(image, p))
            self.f["vit_pos"].append(vit_position_ids(h, w, self.cfg.arch.vit_max_num_patch_per_side))
            self.f["vit_idx"] += idx
            self.f["vit_lens"].append(h * w)

        self._image_block(h * w, put)
        self._split(h * w + 2, "full")
        self.rope += 1

    def vae_image(self, image: torch.Tensor, raw_timestep: float | None) -> None:
        """raw_timestep None: clean conditioning image; else a noisy target with that raw logit."""
        from bagel_ft.embeddings import latent_position_ids

        ds = self.cfg.latent_downsample
        h, w = image.shape[1] // ds, image.shape[2] // ds
        noisy = raw_timestep is not None

        def put(idx):
            self.f["vae_images"].append(image)
            self.f["vae_shapes"].append((h, w))
            self.f["latent_pos"].append(latent_position_ids(h, w, self.cfg.arch.max_latent_size))
            self.f["vae_idx"] += idx
            self.f["timesteps"] += [raw_timestep if noisy else float("-inf")] * len(idx)
            self.f["mse_idx"] += idx if noisy else []

        self._image_block(h * w, put)
        self._split(h * w + 2, "noise" if noisy else "full")
        self.rope += 0 if noisy else 1

    def end_sample(self) -> None:
        self.f["sample_lens"].append(self.length - self.sample_start)
        self.sample_start, self.rope = self.length, 0

    def build(self, noise_generator: torch.Generator | None = None) -> PackedBatch:
        f, long = self.f, torch.long
        images = f["vae_images"]
        height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
        padded = torch.stack([F.pad(i, (0, width - i.shape[2], 0, height - i.shape[1])) for i in images])
        n_vae = len(f["vae_idx"])
        batch = PackedBatch(
            sequence_length=self.length,
            sample_lens=f["sample_lens"],
            split_lens=f["split_lens"],
            attn_modes=f["attn_modes"],
            packed_position_ids=torch.tensor(f["position_ids"], dtype=long),
            packed_text_ids=torch.tensor(f["text_ids"], dtype=long),
            packed_text_indexes=torch.tensor(f["text_idx"], dtype=long),
            packed_label_ids=torch.tensor(f["labels"], dtype=long),
            ce_loss_indexes=torch.tensor(f["ce_idx"], dtype=long),
            ce_loss_weights=torch.ones(len(f["ce_idx"])),
            packed_vit_tokens=torch.cat(f["vit_tokens"]),
            packed_vit_position_ids=torch.cat(f["vit_pos"]),
            packed_vit_token_indexes=torch.tensor(f["vit_idx"], dtype=long),
            vit_token_seqlens=torch.tensor(f["vit_lens"], dtype=long),
            padded_images=padded,
            patchified_vae_latent_shapes=f["vae_shapes"],
            packed_latent_position_ids=torch.cat(f["latent_pos"]),
            packed_vae_token_indexes=torch.tensor(f["vae_idx"], dtype=long),
            packed_timesteps=torch.tensor(f["timesteps"]),
            mse_loss_indexes=torch.tensor(f["mse_idx"], dtype=long),
            noise=torch.randn(n_vae, self.cfg.patch_latent_dim, generator=noise_generator),
        )
        batch.validate()
        return batch


def build_demo_batch(config: BagelConfig, generator: torch.Generator) -> PackedBatch:
    """Two samples of solid / random images in [-1, 1], sized in whole latent tokens and ViT patches."""
    from bagel_ft.tokenizer import ByteTokenizer

    ds, p = config.latent_downsample, config.vit.patch_size

    def solid(h, w, rgb):
        return torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, h, w).clone()

    def noise_image(h, w):
        return torch.rand(3, h, w, generator=generator) * 2 - 1

    packer = DemoPacker(config, ByteTokenizer())
    packer.text("a red square", loss=True)
    packer.vae_image(solid(2 * ds, 3 * ds, (1.0, -1.0, -1.0)), raw_timestep=None)
    packer.vit_image(noise_image(2 * p, 3 * p))
    packer.text("make it blue", loss=False)
    packer.vae_image(solid(3 * ds, 2 * ds, (-1.0, -1.0, 1.0)), raw_timestep=0.3)
    packer.text("done", loss=True)
    packer.end_sample()
    packer.text("noise", loss=False)
    packer.vae_image(noise_image(2 * ds, 2 * ds), raw_timestep=-0.5)
    packer.end_sample()
    return packer.build(generator)
