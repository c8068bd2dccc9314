"""The packed sequence that `Bagel.forward` consumes: the one contract between packing and the model.

Field names are the official `Bagel.forward` argument names (ByteDance-Seed/Bagel, `modeling/bagel/bagel.py`),
so a batch from the official packer maps 1:1. One flat sequence of `sequence_length` positions holds
several samples (`sample_lens`); every position is exactly one of: a text/special token (und expert),
a ViT patch token (und expert), or a VAE latent token (gen expert).

Attention layout: `split_lens` partitions the sequence into segments and `attn_modes[i]` is one of
  * "causal": text; causal inside, sees all earlier segments of its sample;
  * "full":   ViT image or clean VAE image (incl. its <|vision_start|>/<|vision_end|>); bidirectional
              inside, sees all earlier segments;
  * "noise":  noisy VAE target; like "full", but no later segment may attend to it.
Samples are isolated (block-diagonal). The rules live in `bagel_ft.attention`.

Shapes: L = sequence_length, Nt text tokens, Nv ViT tokens, Nz VAE latent tokens, Nce supervised text
positions, Nmse noisy latent tokens, D = p*p*z_channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

ATTN_MODES = ("causal", "full", "noise")
_LAYOUT_FIELDS = ("sequence_length", "sample_lens", "split_lens", "attn_modes", "patchified_vae_latent_shapes")


@dataclass
class PackedBatch:
    sequence_length: int
    sample_lens: list[int]  # positions per sample, sums to sequence_length
    packed_position_ids: torch.Tensor  # [L] RoPE position ids, restart at 0 per sample
    split_lens: list[int]  # segment lengths, sums to sequence_length
    attn_modes: list[str]  # one of ATTN_MODES per segment

    # text / special tokens -> und expert
    packed_text_ids: torch.Tensor  # [Nt] token ids
    packed_text_indexes: torch.Tensor  # [Nt] their positions in the sequence

    # CE supervision (positions whose next-token logits are scored)
    packed_label_ids: torch.Tensor | None = None  # [Nce]
    ce_loss_indexes: torch.Tensor | None = None  # [Nce] positions
    ce_loss_weights: torch.Tensor | None = None  # [Nce]

    # ViT understanding images -> und expert
    packed_vit_tokens: torch.Tensor | None = None  # [Nv, patch*patch*3] pixels in [-1, 1], features (p, q, c)
    packed_vit_position_ids: torch.Tensor | None = None  # [Nv] row * vit_max_num_patch_per_side + col
    packed_vit_token_indexes: torch.Tensor | None = None  # [Nv] positions
    vit_token_seqlens: torch.Tensor | None = None  # [n_vit_images] tokens per image

    # VAE images -> gen expert. Give pixels (encoded in the forward) or latents already encoded.
    padded_images: torch.Tensor | None = None  # [n_vae, 3, Hmax, Wmax] in [-1, 1], zero-padded bottom/right
    padded_latent: torch.Tensor | None = None  # [n_vae, z, hmax, wmax] = vae.encode(padded_images)
    patchified_vae_latent_shapes: list[tuple[int, int]] = field(default_factory=list)  # (h, w) tokens per image
    packed_latent_position_ids: torch.Tensor | None = None  # [Nz] row * max_latent_size + col
    packed_vae_token_indexes: torch.Tensor | None = None  # [Nz] positions
    packed_timesteps: torch.Tensor | None = None  # [Nz] RAW logits: t = sigmoid(raw) (then shifted); -inf = clean
    mse_loss_indexes: torch.Tensor | None = None  # [Nmse] positions of noisy latent tokens
    noise: torch.Tensor | None = None  # [Nz, D] optional fixed noise (else drawn with torch.randn)

    @classmethod
    def from_reference(cls, d: dict[str, torch.Tensor]) -> PackedBatch:
        """The official packer's tensors as `shared/reference/tiny/inputs.safetensors` stores them (official field
        names; `attn_modes_code` 0/1/2 = causal/full/noise). Its `nested_attention_mask_*` are not an input: the
        model builds masks itself (bagel_ft.attention)."""
        batch = cls(
            sequence_length=int(d["sample_lens"].sum()),
            sample_lens=d["sample_lens"].tolist(),
            split_lens=d["split_lens"].tolist(),
            attn_modes=[ATTN_MODES[c] for c in d["attn_modes_code"].tolist()],
            patchified_vae_latent_shapes=[tuple(hw) for hw in d["patchified_vae_latent_shapes"].tolist()],
            **{f.name: d[f.name] for f in fields(cls) if f.name not in _LAYOUT_FIELDS},
        )
        batch.validate()
        return batch

    def to(self, device: torch.device | str) -> PackedBatch:
        """Move every tensor field to `device` (lists stay lists)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return PackedBatch(**moved)

    @property
    def has_vit(self) -> bool:
        return self.packed_vit_tokens is not None and self.packed_vit_tokens.numel() > 0

    @property
    def has_vae(self) -> bool:
        return self.packed_vae_token_indexes is not None and self.packed_vae_token_indexes.numel() > 0

    def validate(self) -> None:
        """Raise ValueError naming the field whose layout is inconsistent."""
        if sum(self.sample_lens) != self.sequence_length:
            raise ValueError(f"sample_lens sum {sum(self.sample_lens)} != sequence_length {self.sequence_length}")
        if sum(self.split_lens) != self.sequence_length:
            raise ValueError(f"split_lens sum {sum(self.split_lens)} != sequence_length {self.sequence_length}")
        if len(self.split_lens) != len(self.attn_modes):
            raise ValueError(f"split_lens has {len(self.split_lens)} entries, attn_modes {len(self.attn_modes)}")
        bad = [m for m in self.attn_modes if m not in ATTN_MODES]
        if bad:
            raise ValueError(f"attn_modes: expected entries in {ATTN_MODES}, got {bad}")
        if self.packed_position_ids.shape != (self.sequence_length,):
            raise ValueError(
                f"packed_position_ids: expected shape ({self.sequence_length},), got {tuple(self.packed_position_ids.shape)}"
            )
        covered = self.packed_text_indexes.numel()
        covered += self.packed_vit_token_indexes.numel() if self.has_vit else 0
        covered += self.packed_vae_token_indexes.numel() if self.has_vae else 0
        if covered != self.sequence_length:
            raise ValueError(
                f"text+vit+vae indexes cover {covered} positions, sequence_length is {self.sequence_length}"
            )
