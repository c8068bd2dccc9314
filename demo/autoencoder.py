"""Train the tiny FLUX-style autoencoder of the shapes base model on shapes-world renders, and measure it.

    python -m demo.autoencoder --out runs/ae                       # the shipped AE (defaults below), ~11 min
    python -m demo.autoencoder --out runs/ae-f2 --ch-mult 1 2 --steps 300   # a CPU-minute smoke run

The model is `bagel_ft.autoencoder.AutoEncoder` (our FLUX AE, unchanged) at a tiny `VAEConfig`. Training data
are renders of `generate_prompts` scenes (all ten categories, `--pool` of them, prompt seed `--seed`, render
seed = index) at `--canvas` px; each step reads `--crop` px crops that each hold a random foreground pixel (the AE is convolutional except
its one mid-level attention block, so crops cost a quarter of full canvases; uniform crops of a sparse scene
are mostly background and train a decoder that paints gray blobs, see docs/results.md).
Loss: L1 + MSE on pixels in [-1, 1] + `--kl-weight` x KL of the diagonal posterior (the KL only keeps the latent
scale bounded; the decoder is trained on posterior samples like FLUX). AdamW, cosine schedule.

After training, the latent normalisation BAGEL applies (`latent = scale * (z - shift)`) is fitted so the
model's latents have mean 0 and std 1 over the training pool: shift = mean, scale = 1 / std of the posterior
means — the rule FLUX's 0.3611 / 0.1159 come from. They are written into `vae_config.json`.

Measured on the fixed ShapesEval prompts rendered at `--canvas` (never seen in training): pixel MSE / PSNR,
the judge's verdict on the reconstructions (`eval.shapes_eval.score_images`: the originals score 1.0), and detection
agreement (the judge finds the same sorted (shape, color, size) list in reconstruction and original).
Output: OUT/ae.safetensors, OUT/vae_config.json, OUT/metrics.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from bagel_ft.autoencoder import AutoEncoder
from bagel_ft.config import VAEConfig
from eval.shapes_eval import score_images
from scene_graphs.shapes import detect, generate_prompts, render, shapes_eval_prompts
from scene_graphs.shapes.vocab import BACKGROUND


@dataclasses.dataclass
class AETrainConfig:
    """How the AE is built and trained (every field is a CLI flag)."""

    canvas: int = 64  # render side, px
    ch: int = 32  # base channels (GroupNorm(32) needs a multiple of 32)
    ch_mult: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 2])  # downsample 2**(len-1)
    num_res_blocks: int = 1  # resnet blocks per level (decoder: +1)
    z_channels: int = 16  # latent channels; a latent token holds p*p*z features (p = 2)
    steps: int = 1500  # optimizer steps (the judge-on-reconstruction curve is flat after ~1000)
    batch: int = 16  # crops per step
    crop: int = 32  # training crop side, px (multiple of the downsample)
    lr: float = 1e-3  # peak AdamW lr (linear warmup 100 steps, cosine to 1%)
    kl_weight: float = 1e-6  # weight of the KL (summed over latent elements) relative to the summed L1
    pool: int = 4000  # training renders
    seed: int = 0  # prompt seed of the pool, init and crop order
    threads: int = 1  # torch threads (the shared 2-core machine: keep 1)
    latent_noise: float = 0.0  # decoder input noise in latent-std units: learns to snap near-misses to clean shapes
    edge_weight: float = 0.0  # extra loss weight on pixels within 1 px of a color edge (corners, thin arms)
    eval_every: int = 0  # log the judge on 100 ShapesEval reconstructions every this many steps (0 = off)

    @property
    def vae_config(self) -> VAEConfig:
        return VAEConfig(
            resolution=self.canvas,
            downsample=2 ** (len(self.ch_mult) - 1),
            ch=self.ch,
            ch_mult=list(self.ch_mult),
            num_res_blocks=self.num_res_blocks,
            z_channels=self.z_channels,
            scale_factor=1.0,
            shift_factor=0.0,
        )


# ---- data -------------------------------------------------------------------------------------------


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> [n, 3, H, W] float32 in [-1, 1]."""
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    return x.float().div(127.5).sub(1)


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """[n, 3, H, W] ~[-1, 1] -> PIL (the official decode rounding: (x/2 + 1/2).clamp * 255, truncated)."""
    arr = ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arr]


def render_pool(n: int, canvas: int, seed: int) -> torch.Tensor:
    """`n` renders of `generate_prompts(n, seed)` scenes (render seed = index) as uint8 [n, 3, c, c]."""
    prompts = generate_prompts(n, seed)
    arr = np.stack([np.asarray(render(p.graph, canvas, seed=i)[0]) for i, p in enumerate(prompts)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# ---- training -----------------------------------------------------------------------------------------


def foreground_pixels(pool: torch.Tensor) -> list[torch.Tensor]:
    """Per image, the (y, x) of every pixel that is not the background (an object, or its anti-aliased edge)."""
    background = torch.tensor(BACKGROUND, dtype=torch.int16)[:, None, None]
    mask = (pool.to(torch.int16) - background).abs().amax(1) > 24  # [n, H, W]
    return [m.nonzero() for m in mask]


def edge_mask(x: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 1, H, W] float: 1 within one pixel of a color change, else 0."""
    gx = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(1, keepdim=True) > threshold
    gy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(1, keepdim=True) > threshold
    edges = torch.zeros_like(x[:, :1])
    edges[..., :, 1:] += gx
    edges[..., 1:, :] += gy
    return torch.nn.functional.max_pool2d((edges > 0).float(), 3, stride=1, padding=1)


def kl_divergence(moments: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(N(mean, exp(logvar)) || N(0, 1)), summed over latent elements."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    logvar = logvar.clamp(-30, 20)
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()


def lr_at(step: int, cfg: AETrainConfig) -> float:
    if step < 100:
        return cfg.lr * (step + 1) / 100
    progress = (step - 100) / max(1, cfg.steps - 100)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_autoencoder(cfg: AETrainConfig, log=print) -> AutoEncoder:
    """Train an AE per `cfg` and fit its latent normalisation (module doc)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pool = render_pool(cfg.pool, cfg.canvas, cfg.seed)
    ae = AutoEncoder(cfg.vae_config)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    n, side = pool.shape[0], cfg.canvas - cfg.crop + 1
    foreground = foreground_pixels(pool)
    t0 = time.time()
    for step in range(cfg.steps):
        idx = torch.randint(n, (cfg.batch,), generator=gen).tolist()
        crops = []
        for i in idx:  # a crop that holds a random foreground pixel at a random offset
            fy, fx = foreground[i][int(torch.randint(len(foreground[i]), (1,), generator=gen))].tolist()
            dy, dx = torch.randint(cfg.crop, (2,), generator=gen).tolist()
            y, x = min(max(fy - dy, 0), side - 1), min(max(fx - dx, 0), side - 1)
            crops.append(pool[i, :, y : y + cfg.crop, x : x + cfg.crop])
        x = torch.stack(crops).float().div(127.5).sub(1)
        moments = ae.encoder(x)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=gen)
        if cfg.latent_noise:
            z = z + cfg.latent_noise * mean.detach().std() * torch.randn(mean.shape, generator=gen)
        recon = ae.decoder(z)
        err = (recon - x).abs() + (recon - x).pow(2)  # [B, 3, h, w]
        weight = 1 + cfg.edge_weight * edge_mask(x) if cfg.edge_weight else torch.ones_like(x[:, :1])
        rec = (err * weight).mean() / weight.mean()
        kl = kl_divergence(moments) / x[0].numel()  # per pixel element, like the L1 (the SD / FLUX weighting)
        loss = rec + cfg.kl_weight * kl
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"ae step {step:5d}  l1+mse {rec.item():.4f}  kl/elem {kl.item():.3f}  {time.time() - t0:.0f}s")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            fit_latent_normalisation(ae, pool)
            m = evaluate_autoencoder(ae, cfg.canvas, limit=10)
            log(
                f"ae eval {step + 1:5d}  psnr {m['psnr_db']}  judge {m['judge_on_recon']['overall']:.3f}  "
                f"agreement {m['detection_agreement']:.3f}"
            )
            ae.train()
    fit_latent_normalisation(ae, pool)
    return ae.eval()


@torch.no_grad()
def fit_latent_normalisation(ae: AutoEncoder, pool: torch.Tensor, n: int = 512) -> None:
    """shift = mean, scale = 1 / std of the posterior means over (up to) n pool images (module doc)."""
    ae.eval()
    z = torch.cat(
        [
            torch.chunk(ae.encoder(pool[i : i + 64].float().div(127.5).sub(1)), 2, dim=1)[0]
            for i in range(0, min(n, pool.shape[0]), 64)
        ]
    )
    ae.shift_factor = ae.config.shift_factor = round(float(z.mean()), 4)
    ae.scale_factor = ae.config.scale_factor = round(1.0 / float(z.std()), 4)


# ---- measuring ----------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(ae: AutoEncoder, images: list[Image.Image], batch: int = 50) -> list[Image.Image]:
    out = []
    for i in range(0, len(images), batch):
        out += to_images(ae.decode(ae.encode(to_tensor(images[i : i + batch]))))
    return out


def _signature(image: Image.Image) -> list[tuple[str, str, str]]:
    return sorted((d.shape, d.color, d.size) for d in detect(image.convert("RGB")))


def evaluate_autoencoder(ae: AutoEncoder, canvas: int, limit: int | None = None) -> dict:
    """Reconstruction error and judge agreement on the ShapesEval prompts rendered at `canvas` (module doc);
    `limit`: only the first `limit` prompts of each category."""
    prompts = shapes_eval_prompts()
    if limit is not None:
        prompts = [p for i, p in enumerate(prompts) if sum(q.tag == p.tag for q in prompts[:i]) < limit]
    originals = [render(p.graph, canvas, seed=i)[0] for i, p in enumerate(prompts)]
    recons = reconstruct(ae, originals)
    x, y = to_tensor(originals), to_tensor(recons)
    mse = float((x - y).pow(2).mean() / 4)  # in [0, 1] pixel units
    agree = [_signature(a) == _signature(b) for a, b in zip(originals, recons, strict=True)]
    judged = score_images(prompts, recons)
    return {"mse": round(mse, 6), "psnr_db": round(-10 * math.log10(max(mse, 1e-12)), 2),
            "detection_agreement": round(sum(agree) / len(agree), 4), "judge_on_recon": judged,
            "judge_on_original": score_images(prompts, originals)["overall"]}  # fmt: skip


def save_autoencoder(ae: AutoEncoder, out: str | Path) -> None:
    """OUT/ae.safetensors (FLUX key names) + OUT/vae_config.json (the VAEConfig, normalisation included)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(out / "ae.safetensors"))
    (out / "vae_config.json").write_text(json.dumps(dataclasses.asdict(ae.config), indent=1) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="output dir: ae.safetensors, vae_config.json, metrics.json")
    for f in dataclasses.fields(AETrainConfig):
        default = getattr(AETrainConfig(), f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, list):
            ap.add_argument(flag, type=int, nargs="+", default=default, help=f"(default {default})")
        else:
            ap.add_argument(flag, type=type(default), default=default, help=f"(default {default})")
    args = ap.parse_args(argv)
    cfg = AETrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AETrainConfig)})
    t0 = time.time()
    ae = train_autoencoder(cfg)
    train_s = time.time() - t0
    save_autoencoder(ae, args.out)
    metrics = {
        "config": dataclasses.asdict(cfg),
        "train_seconds": round(train_s),
        **evaluate_autoencoder(ae, cfg.canvas),
        "params": sum(p.numel() for p in ae.parameters()),
    }
    (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=1))
    return metrics


if __name__ == "__main__":
    main()
