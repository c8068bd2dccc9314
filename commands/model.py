"""Build the tiny model (or load a checkpoint), save it in the official layout, reload it strictly,
and run a packed forward pass on a synthetic interleaved batch.

  bagel-ft model --out runs/tiny-model                 # tiny preset, random init (CPU, ~1 s)
  bagel-ft model --ckpt path/to/checkpoint --out DIR   # any checkpoint in the official layout

The batch holds two samples: [text (CE), clean VAE image, ViT image, text, noisy VAE image (MSE), text (CE)]
and [text, noisy VAE image (MSE)], built from solid and random-noise images (no data needed) and laid out by
the training packer. For brevity a noisy target is not followed by its clean copy (a trajectory record's plan
adds one); this only shows the forward runs.
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


# ---- a synthetic batch, laid out by the training packer ----------------------------------------------


def build_demo_batch(config: BagelConfig, generator: torch.Generator) -> PackedBatch:
    """Two samples of solid / random images in [-1, 1], sized in whole latent tokens and ViT patches, packed by
    `training.packing.pack_samples` (timesteps and flow noise drawn from `generator`)."""
    from bagel_ft.tokenizer import ByteTokenizer, SpecialTokens
    from training.packing import PackingGeometry, pack_samples
    from training.sequence import TEXT, VAE, VIT, SamplePlan, image_item, text_item

    ds, p, tok = config.latent_downsample, config.vit.patch_size, ByteTokenizer()

    def solid(h, w, rgb):
        return torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, h, w).clone()

    def noise_image(h, w):
        return torch.rand(3, h, w, generator=generator) * 2 - 1

    def text(t: str, loss: bool):
        return text_item(tok.encode(t), loss=loss, enable_cfg=False)

    first = SamplePlan([
        text("a red square", True),
        image_item(VAE, solid(2 * ds, 3 * ds, (1.0, -1.0, -1.0)), ds),
        image_item(VIT, noise_image(2 * p, 3 * p), p),
        text("make it blue", False),
        image_item(VAE, solid(3 * ds, 2 * ds, (-1.0, -1.0, 1.0)), ds, loss=True),
        text("done", True),
    ])  # fmt: skip
    second = SamplePlan([text("noise", False), image_item(VAE, noise_image(2 * ds, 2 * ds), ds, loss=True)])
    assert {i.type for i in first.items} == {TEXT, VAE, VIT}
    batch = pack_samples([first, second], SpecialTokens.of(tok), PackingGeometry.from_model_config(config), generator)
    batch.validate()
    return batch
