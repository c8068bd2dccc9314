"""A trajectory record -> its sample plan: the ordered items (text / ViT image / VAE image) the packer lays out.

This is docs/format.md section 3 as code. For a record `prompt | turn_1 ... turn_n`:

  prompt            text, no loss, CFG-droppable (an empty prompt is left out)
  text turn         text, CE per its `loss` flag (overridable per subset/role: `data.loss_roles`); when supervised,
                    the <|im_end|> position is labelled with what comes next (`next_after_text`):
                    <|vision_start|> before a generated image, <|im_start|> before another text turn,
                    <|endoftext|> at the end of the record (official `special_token_loss`)
  generated image   noisy VAE target (MSE, no CFG) + its clean VAE copy + its ViT tokens (context, CFG-droppable);
                    the record's last turn gets the noisy target only (nothing follows that could read the context)
  given image       clean VAE + ViT (context, CFG-droppable)

Images are resized like the official `ImageTransform` (`MaxLongEdgeMinShortEdgeResize`): long side <= max,
short side >= min, pixels <= max_pixels, both sides snapped to the stride (VAE: vae downsample * latent patch;
ViT: patch size), bicubic; then mapped to [-1, 1]. An image already within bounds at stride-aligned sizes is
left untouched.

Plans are deterministic functions of the record (no randomness here): CFG dropout and timesteps are drawn by
the packer, so a plan can be rebuilt from its record on resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bagel_ft.trajectory import NEXT_DRAW, NEXT_END, NEXT_TEXT, Trajectory, next_after_text
from bagel_ft.transforms import ImageGeometry as ImageBounds
from bagel_ft.transforms import prepare_image

TEXT, VIT, VAE = "text", "vit_image", "vae_image"  # official sequence_plan item types


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens (docs/format.md table): Qwen2.5 151644.. or the byte tokenizer's 300.."""

    bos: int  # <|im_start|>, opens every text segment
    eos: int  # <|im_end|>, closes every text segment
    vision_start: int  # <|vision_start|>, opens every image block
    vision_end: int  # <|vision_end|>, closes every image block
    endoftext: int  # <|endoftext|>, label at the <|im_end|> of the record's last text turn

    @classmethod
    def from_tokenizer(cls, tok: Any) -> SpecialTokens:
        """From a `bagel_ft.tokenizer` tokenizer (ByteTokenizer / QwenTokenizer)."""
        return cls(tok.bos_id, tok.eos_id, tok.vision_start_id, tok.vision_end_id, tok.end_of_text_id)


@dataclass
class ImageGeometry:
    """Resize bounds (`bagel_ft.transforms.ImageGeometry`, shared with inference) plus the model's strides."""

    vae_stride: int  # pixels per latent token side = vae downsample * latent patch size
    vit_stride: int  # ViT patch size
    vae_max_size: int
    vae_min_size: int
    vit_max_size: int
    vit_min_size: int
    max_pixels: int

    @classmethod
    def from_bounds(cls, bounds: ImageBounds, vae_stride: int, vit_stride: int) -> ImageGeometry:
        b = bounds
        return cls(vae_stride, vit_stride, b.vae_max_size, b.vae_min_size, b.vit_max_size, b.vit_min_size, b.max_pixels)

    @property
    def bounds(self) -> ImageBounds:
        return ImageBounds(self.vae_max_size, self.vae_min_size, self.vit_max_size, self.vit_min_size, self.max_pixels)


@dataclass
class PlanItem:
    """One segment of a sample: a text, a ViT image or a VAE image (official `sequence_plan` entry + its data)."""

    type: str  # TEXT, VIT or VAE
    loss: bool = False  # text: CE on it; VAE: noisy flow-matching target
    enable_cfg: bool = False  # may be dropped by CFG dropout (context items only)
    text_ids: list[int] | None = None  # TEXT: token ids without bos/eos
    image: torch.Tensor | None = None  # VIT / VAE: [3, H, W] in [-1, 1], H, W multiples of the stride
    special_token_label: int | None = None  # TEXT: label of the <|im_end|> position (None = no loss there)
    num_tokens: int = 0  # sequence positions incl. bos/eos or <|vision_start|>/<|vision_end|>


@dataclass
class SamplePlan:
    items: list[PlanItem]
    record_id: str = ""
    subset: str = ""
    ref: tuple[int, int] | None = None  # (source index, row index): rebuilds the plan on resume
    num_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_tokens = sum(item.num_tokens for item in self.items)


# ---- items ----------------------------------------------------------------------------------------


def text_item(ids: list[int], loss: bool, enable_cfg: bool, special_token_label: int | None = None) -> PlanItem:
    return PlanItem(
        TEXT,
        loss=loss,
        enable_cfg=enable_cfg,
        text_ids=list(ids),
        special_token_label=special_token_label,
        num_tokens=len(ids) + 2,
    )


def image_item(kind: str, image: torch.Tensor, stride: int, loss: bool = False, enable_cfg: bool = False) -> PlanItem:
    _, h, w = image.shape
    if h % stride or w % stride:
        raise ValueError(f"{kind} image {h}x{w} is not a multiple of its stride {stride}")
    return PlanItem(kind, loss=loss, enable_cfg=enable_cfg, image=image, num_tokens=(h // stride) * (w // stride) + 2)


# ---- images -----------------------------------------------------------------------------------------


# ---- record -> plan -------------------------------------------------------------------------------------


def turn_loss(traj: Trajectory, role: str, default: bool, loss_roles: dict[str, dict[str, bool]]) -> bool:
    """The effective loss flag: subset-specific override, else '*' override, else the record's own flag."""
    for key in (traj.subset, "*"):
        if role in loss_roles.get(key, {}):
            return bool(loss_roles[key][role])
    return default


def build_sample_plan(
    traj: Trajectory,
    encode: Any,
    special: SpecialTokens,
    geometry: ImageGeometry,
    loss_roles: dict[str, dict[str, bool]] | None = None,
    special_token_loss: bool = True,
    ref: tuple[int, int] | None = None,
) -> SamplePlan:
    """docs/format.md section 3: the record's stream as plan items. `encode(text) -> list[int]` (no specials)."""
    loss_roles = loss_roles or {}
    g = geometry
    images: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # image index -> (VAE tensor, ViT tensor)

    def tensors(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in images:
            im = traj.images[index]
            images[index] = (
                prepare_image(im, g.vae_max_size, g.vae_min_size, g.vae_stride, g.max_pixels),
                prepare_image(im, g.vit_max_size, g.vit_min_size, g.vit_stride, g.max_pixels),
            )
        return images[index]

    losses = [turn_loss(traj, t.role, t.loss, loss_roles) for t in traj.turns]
    # an empty prompt is no segment: an edit record starts with its image, like the official editing plan
    items = [text_item(encode(traj.prompt), loss=False, enable_cfg=True)] if traj.prompt else []
    for i, turn in enumerate(traj.turns):
        if turn.is_image:
            vae, vit = tensors(turn.image)
            if losses[i]:  # generated: noisy target, then its clean copy and ViT as context for what follows
                items.append(image_item(VAE, vae, g.vae_stride, loss=True, enable_cfg=False))
                if i == len(traj.turns) - 1:  # nothing follows: no context to give (official need_vae/vit=False)
                    continue
            items.append(image_item(VAE, vae.clone(), g.vae_stride, loss=False, enable_cfg=True))
            items.append(image_item(VIT, vit, g.vit_stride, loss=False, enable_cfg=True))
            continue
        label = None
        if losses[i] and special_token_loss:
            nxt = next_after_text(traj.turns, i)
            if nxt == NEXT_DRAW and losses[i + 1]:
                label = special.vision_start
            elif nxt == NEXT_TEXT:
                label = special.bos
            elif nxt == NEXT_END:
                label = special.endoftext
        # supervised text is never dropped; unsupervised text is context and may be (CFG)
        items.append(text_item(encode(turn.text), loss=losses[i], enable_cfg=not losses[i], special_token_label=label))
    return SamplePlan(items, record_id=traj.id, subset=traj.subset, ref=ref)
