"""Images -> model inputs: the official `ImageTransform` resize rule and the per-checkpoint image geometry.

Training's packer and the inference engine both call `prepare_image`, so an image fed back into the
context at inference looks exactly like the images the model was trained on. `ImageGeometry` holds the
resize bounds and travels with a checkpoint as `image_geometry.json` (absent = the official values).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class ImageGeometry:
    """Resize bounds per encoder (official `ImageTransform` arguments, BAGEL's data config)."""

    vae_max_size: int = 1024  # longest side (px) of a VAE image; sides snap to multiples of latent_downsample
    vae_min_size: int = 512  # shortest side (px) of a VAE image
    vit_max_size: int = 980  # longest side (px) of a ViT image; sides snap to multiples of the ViT patch
    vit_min_size: int = 224  # shortest side (px) of a ViT image
    max_pixels: int = 14 * 14 * 9 * 1024  # pixel budget per image

    FILE = "image_geometry.json"

    @classmethod
    def from_dir(cls, ckpt: str | Path) -> ImageGeometry:
        """`ckpt/image_geometry.json` if present (unknown keys ignored), else the official values."""
        path = Path(ckpt) / cls.FILE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(**{k: int(v) for k, v in data.items() if k in {f.name for f in fields(cls)}})

    def save_dir(self, ckpt: str | Path) -> None:
        (Path(ckpt) / self.FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    def within(self, config) -> ImageGeometry:
        """These bounds clamped to what a model of `config` (BagelConfig) can take: VAE sides to its latent
        table (latent_downsample x max_latent_size), ViT sides to its patch table."""
        vit = config.vit
        vit_side = vit.patch_size * min(config.arch.vit_max_num_patch_per_side, vit.image_size // vit.patch_size)
        vae_side = config.latent_downsample * config.arch.max_latent_size
        return ImageGeometry(
            vae_max_size=min(self.vae_max_size, vae_side),
            vae_min_size=min(self.vae_min_size, vae_side),
            vit_max_size=min(self.vit_max_size, vit_side),
            vit_min_size=min(self.vit_min_size, vit_side),
            max_pixels=self.max_pixels,
        )


def resized_size(
    width: int, height: int, max_size: int, min_size: int, stride: int, max_pixels: int
) -> tuple[int, int]:
    """(width, height) of the official `MaxLongEdgeMinShortEdgeResize`, rounding included: long side <= max,
    short side >= min, pixels <= max_pixels, both sides snapped to multiples of `stride`."""

    def snap(value: float) -> int:
        return max(stride, int(round(value / stride) * stride))

    def apply(w: float, h: float, scale: float) -> tuple[int, int]:
        return snap(round(w * scale)), snap(round(h * scale))

    scale = max(min(max_size / max(width, height), 1.0), min_size / min(width, height))
    new_w, new_h = apply(width, height, scale)
    if new_w * new_h > max_pixels:
        new_w, new_h = apply(new_w, new_h, max_pixels / (new_w * new_h))
    if max(new_w, new_h) > max_size:
        new_w, new_h = apply(new_w, new_h, max_size / max(new_w, new_h))
    return new_w, new_h


def prepare_image(image: Image.Image, max_size: int, min_size: int, stride: int, max_pixels: int):
    """PIL -> [3, H, W] float32 tensor in [-1, 1] at a stride-aligned size (bicubic resize, ToTensor,
    Normalize(0.5)). torch is imported here so that config-only users (CLI --help) never load it."""
    import torch

    image = image.convert("RGB")
    size = resized_size(*image.size, max_size, min_size, stride, max_pixels)
    if size != image.size:
        image = image.resize(size, resample=Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return (x - 0.5) / 0.5
