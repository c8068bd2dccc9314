"""Sample plans -> one packed sequence (`PackedBatch`), and the greedy packer that fills sequences to a budget.

`pack_samples` is the official `PackedDataset.pack_sequence` + `to_tensor` (use_flex) as a pure function of
the plans and one random generator; given the reference plans it reproduces every index tensor of
`shared/reference/tiny/inputs.safetensors`. Per item:

  text   [bos] ids [eos], attn "causal", RoPE ids consecutive. With loss: CE at bos..last id, labels ids + [eos],
         weight 1/sqrt(len+1) each (official len2weight 'square'); the eos position is scored only with a
         special_token_label (weight 1). CFG-dropped: nothing is emitted, the RoPE id does not move.
  ViT    <|vision_start|> patches <|vision_end|>, attn "full", one RoPE id for the block, then +1.
         CFG-dropped: nothing emitted, RoPE +1.
  VAE    <|vision_start|> latent tokens <|vision_end|>, one RoPE id. Noisy target (loss): attn "noise", raw
         timestep ~ N(0, 1) for all its tokens, MSE on its tokens, RoPE does NOT advance (its clean copy reuses
         the id). Clean: attn "full", raw timestep -inf, RoPE +1. CFG-dropped clean image: RoPE +1.

RoPE ids restart at 0 per sample; samples are concatenated (block-diagonal attention via `sample_lens`).
Random draws, in order per item: a CFG-dropout uniform (only for `enable_cfg` items with p > 0), a raw timestep
(noisy targets); after all samples, the flow noise for every VAE token.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from bagel_ft.batch import PackedBatch
from bagel_ft.config import ConfigError
from bagel_ft.embeddings import latent_position_ids
from bagel_ft.flow import sample_raw_timesteps
from bagel_ft.segments import dropped_rope, image_segment, text_segment
from bagel_ft.siglip import patchify_image, vit_position_ids
from bagel_ft.tokenizer import SpecialTokens
from training.sequence import TEXT, VAE, VIT, SamplePlan


@dataclass(frozen=True)
class PackingGeometry:
    """Model geometry the packer needs (from BagelConfig)."""

    vit_patch: int  # ViT patch size (px)
    vit_max_side: int  # vit_max_num_patch_per_side
    latent_downsample: int  # px per latent token side
    max_latent_size: int  # side of the latent position table
    latent_dim: int  # p*p*z features per latent token (for the noise)

    @classmethod
    def from_model_config(cls, cfg) -> PackingGeometry:
        return cls(
            vit_patch=cfg.vit.patch_size,
            vit_max_side=cfg.arch.vit_max_num_patch_per_side,
            latent_downsample=cfg.latent_downsample,
            max_latent_size=cfg.arch.max_latent_size,
            latent_dim=cfg.patch_latent_dim,
        )


@dataclass(frozen=True)
class CFGDropout:
    text: float = 0.0  # data.text_cond_dropout_prob
    vit: float = 0.0  # data.vit_cond_dropout_prob
    vae: float = 0.0  # data.vae_cond_dropout_prob


def len2weight(n: int) -> float:
    """Official per-token CE weight of a text of n scored tokens ('square' reduction)."""
    return 1.0 / math.sqrt(n)


def pack_samples(
    plans: list[SamplePlan],
    special: SpecialTokens,
    geometry: PackingGeometry,
    generator: torch.Generator,
    dropout: CFGDropout = CFGDropout(),
    with_noise: bool = True,
) -> PackedBatch:
    """Lay out `plans` as one packed sequence (see the module doc for the rules)."""
    g = geometry
    text_ids, text_idx, pos_ids = [], [], []
    labels, ce_idx, ce_w = [], [], []
    split_lens, attn_modes, sample_lens = [], [], []
    vit_tokens, vit_pos, vit_idx, vit_lens = [], [], [], []
    vae_images, vae_shapes, lat_pos, vae_idx, timesteps, mse_idx = [], [], [], [], [], []
    curr = 0

    def dropped(p: float) -> bool:
        return p > 0 and torch.rand((), generator=generator).item() < p

    for plan in plans:
        rope = 0
        sample_start = curr
        for item in plan.items:
            if item.type not in (TEXT, VIT, VAE):
                raise ValueError(f"record {plan.record_id}: unknown plan item type {item.type!r}")
            p_drop = {TEXT: dropout.text, VIT: dropout.vit, VAE: dropout.vae}[item.type]
            if item.enable_cfg and not (item.type == VAE and item.loss) and dropped(p_drop):  # a noisy target stays
                rope = dropped_rope(rope, is_image=item.type != TEXT)
                continue
            if item.type == TEXT:
                shifted = [special.bos_id] + item.text_ids
                seg = text_segment(curr, rope, len(shifted) + 1)
                text_ids += shifted + [special.eos_id]
                text_idx += seg.positions
                if item.loss:
                    ce_idx += seg.positions[:-1]
                    ce_w += [len2weight(len(shifted))] * len(shifted)
                    labels += item.text_ids + [special.eos_id]
                if item.special_token_label is not None:
                    ce_idx.append(seg.end - 1)
                    ce_w.append(1.0)
                    labels.append(item.special_token_label)
            elif item.type == VIT:
                _, H, W = item.image.shape
                tokens = patchify_image(item.image, g.vit_patch)
                seg = image_segment(curr, rope, tokens.shape[0])
                vit_tokens.append(tokens)
                vit_pos.append(vit_position_ids(H // g.vit_patch, W // g.vit_patch, g.vit_max_side))
                vit_idx += seg.inner
                vit_lens.append(tokens.shape[0])
            else:
                _, H, W = item.image.shape
                h, w = H // g.latent_downsample, W // g.latent_downsample
                seg = image_segment(curr, rope, h * w, noisy=item.loss)
                vae_images.append(item.image)
                vae_shapes.append((h, w))
                lat_pos.append(latent_position_ids(h, w, g.max_latent_size))
                vae_idx += seg.inner
                if item.loss:
                    mse_idx += seg.inner
                    raw = sample_raw_timesteps(1, generator=generator).item()
                else:
                    raw = float("-inf")
                timesteps += [raw] * (h * w)
            if item.type != TEXT:
                text_ids += [special.vision_start_id, special.vision_end_id]
                text_idx += seg.ends
            pos_ids += seg.position_ids
            split_lens.append(seg.length)
            attn_modes.append(seg.attn_mode)
            curr, rope = seg.end, seg.next_rope
        sample_lens.append(curr - sample_start)

    def t(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype)

    batch = PackedBatch(
        sequence_length=curr,
        sample_lens=sample_lens,
        packed_position_ids=t(pos_ids),
        split_lens=split_lens,
        attn_modes=attn_modes,
        packed_text_ids=t(text_ids),
        packed_text_indexes=t(text_idx),
    )
    if labels:
        batch.packed_label_ids, batch.ce_loss_indexes = t(labels), t(ce_idx)
        batch.ce_loss_weights = t(ce_w, torch.float32)
    if vit_tokens:
        batch.packed_vit_tokens = torch.cat(vit_tokens)
        batch.packed_vit_position_ids = torch.cat(vit_pos)
        batch.packed_vit_token_indexes = t(vit_idx)
        batch.vit_token_seqlens = t(vit_lens)
    if vae_images:
        hmax = max(im.shape[1] for im in vae_images)
        wmax = max(im.shape[2] for im in vae_images)
        padded = torch.zeros(len(vae_images), 3, hmax, wmax)
        for i, im in enumerate(vae_images):
            padded[i, :, : im.shape[1], : im.shape[2]] = im
        batch.padded_images = padded
        batch.patchified_vae_latent_shapes = vae_shapes
        batch.packed_latent_position_ids = torch.cat(lat_pos)
        batch.packed_vae_token_indexes = t(vae_idx)
        batch.packed_timesteps = t(timesteps, torch.float32)
        batch.mse_loss_indexes = t(mse_idx)
        if with_noise:
            batch.noise = torch.randn(len(vae_idx), g.latent_dim, generator=generator)
    return batch


# ---- the greedy packer ------------------------------------------------------------------------------------


@dataclass
class PackerStats:
    packs: int = 0
    samples: int = 0
    tokens: int = 0  # real (post-dropout) tokens in emitted packs
    budget: int = 0  # packs * max_num_tokens
    skipped: int = 0  # over-long samples skipped

    @property
    def efficiency(self) -> float:
        """Packing efficiency: real tokens / (packs * max_num_tokens)."""
        return self.tokens / self.budget if self.budget else 0.0


class PackingError(ConfigError):
    """No sample fits the token limits: a config problem (limits vs image sizes), reported before any step."""


MAX_CONSECUTIVE_SKIPS = 256  # this many over-long samples in a row means the limits fit (almost) no sample


@dataclass
class Packer:
    """Greedy packing with a leftover buffer (official `PackedDataset.__iter__`, single group).

    Take samples (while the pack is shorter than `prefer_buffer_before`, the first buffered one that fits); a
    sample that does not fit under `max_num_tokens` goes to the buffer (up to `max_buffer_size`), otherwise the
    pack is emitted and the sample starts the next one (the official code drops it, and pops the buffer head
    even when it cannot fit); a pack is emitted once it reaches `expected_num_tokens`. Samples longer than `max_num_tokens_per_sample` are skipped with a warning.
    """

    expected_num_tokens: int
    max_num_tokens: int
    max_num_tokens_per_sample: int
    prefer_buffer_before: int
    max_buffer_size: int
    buffer: list[SamplePlan] = field(default_factory=list)
    stats: PackerStats = field(default_factory=PackerStats)
    _carry: SamplePlan | None = None  # a sample that closed the previous pack and opens the next
    _skips_in_a_row: int = 0
    _shortest_skipped: int = 0

    def next_pack(self, source: Callable[[], SamplePlan]) -> list[SamplePlan]:
        """Plans of the next pack; `source()` returns the next sample plan of the data stream."""
        pack, curr = [], 0
        if self._carry is not None:
            pack, curr, self._carry = [self._carry], self._carry.num_tokens, None
        while curr < self.expected_num_tokens:
            fits = [i for i, p in enumerate(self.buffer) if curr + p.num_tokens <= self.max_num_tokens]
            from_buffer = curr < self.prefer_buffer_before and bool(fits)
            sample = self.buffer.pop(fits[0]) if from_buffer else source()
            n = sample.num_tokens
            if n > self.max_num_tokens_per_sample:
                self.stats.skipped += 1
                self._skips_in_a_row += 1
                self._shortest_skipped = min(n, self._shortest_skipped or n)
                if self._skips_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                    raise PackingError(
                        f"packing: {self._skips_in_a_row} samples in a row are longer than "
                        f"data.max_num_tokens_per_sample={self.max_num_tokens_per_sample} (the shortest has "
                        f"{self._shortest_skipped} tokens): raise data.max_num_tokens_per_sample and "
                        f"data.max_num_tokens (now {self.max_num_tokens}), or lower data.vae_max_size / "
                        f"data.vit_max_size"
                    )
                warnings.warn(
                    f"packing: skipped record {sample.record_id} with {n} tokens "
                    f"(> max_num_tokens_per_sample {self.max_num_tokens_per_sample}; "
                    f"{self.stats.skipped} skipped so far)",
                    stacklevel=2,
                )
                continue
            self._skips_in_a_row = 0
            if curr + n > self.max_num_tokens:
                if len(self.buffer) < self.max_buffer_size and not from_buffer:
                    self.buffer.append(sample)
                    continue
                self._carry = sample
                break
            pack.append(sample)
            curr += n
        return pack

    def record(self, batch: PackedBatch, num_samples: int) -> None:
        """Count an emitted pack for the efficiency statistics."""
        self.stats.packs += 1
        self.stats.samples += num_samples
        self.stats.tokens += batch.sequence_length
        self.stats.budget += self.max_num_tokens

    def pending(self) -> list[SamplePlan]:
        """Plans held between packs (buffer + carry), in order: what a resume must rebuild."""
        return ([self._carry] if self._carry is not None else []) + list(self.buffer)

    def restore(self, carry: SamplePlan | None, buffer: list[SamplePlan]) -> None:
        self._carry, self.buffer = carry, list(buffer)


def iterate_packs(packer: Packer, source: Callable[[], SamplePlan]) -> Iterator[list[SamplePlan]]:
    while True:
        yield packer.next_pack(source)
