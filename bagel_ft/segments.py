"""Where one segment of a packed sequence sits: its positions, attention mode and RoPE ids (BAGEL's layout).

The one statement of the layout rule; the training packer (`training.packing.pack_samples`), the inference
engine's cache updates (`inference.engine`), the uniform padding (`training.uniform`) and `bagel-ft model`
all place their segments with it:

  text         [bos] ids [eos]                               "causal"  RoPE ids rope .. rope+n-1, then rope + n
  clean image  <|vision_start|> tokens <|vision_end|>        "full"    one RoPE id for the block, then rope + 1
  noisy image  <|vision_start|> latent tokens <|vision_end|>  "noise"   one RoPE id; rope does NOT advance (the
                                                                       clean copy that follows reuses the id)
  CFG-dropped  nothing is emitted; a text keeps rope, an image advances it by 1 (official PackedDataset)

An image block's `inner` positions hold its tokens (ViT patches or VAE latents); `ends` hold the two markers.
"""

from __future__ import annotations

from dataclasses import dataclass

CAUSAL, FULL, NOISE = "causal", "full", "noise"  # attention modes of bagel_ft.attention


@dataclass(frozen=True)
class Segment:
    start: int  # first sequence position
    length: int  # positions, markers included
    attn_mode: str  # CAUSAL | FULL | NOISE
    rope: int  # RoPE id of the first position
    next_rope: int  # RoPE id of the next segment of the sample

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def positions(self) -> range:
        return range(self.start, self.end)

    @property
    def position_ids(self) -> list[int]:
        """RoPE id per position: consecutive for text, one id for an image block."""
        if self.attn_mode == CAUSAL:
            return list(range(self.rope, self.rope + self.length))
        return [self.rope] * self.length

    @property
    def inner(self) -> range:
        """An image block's token positions (between the markers)."""
        return range(self.start + 1, self.end - 1)

    @property
    def ends(self) -> list[int]:
        """An image block's <|vision_start|> and <|vision_end|> positions."""
        return [self.start, self.end - 1]


def text_segment(start: int, rope: int, length: int) -> Segment:
    """A text of `length` positions ([bos] ids [eos]) at `start`."""
    return Segment(start, length, CAUSAL, rope, rope + length)


def image_segment(start: int, rope: int, num_tokens: int, noisy: bool = False) -> Segment:
    """An image block of `num_tokens` tokens (+ 2 markers) at `start`; `noisy`: a flow-matching target."""
    return Segment(start, num_tokens + 2, NOISE if noisy else FULL, rope, rope if noisy else rope + 1)


def dropped_rope(rope: int, is_image: bool) -> int:
    """The RoPE id after a CFG-dropped segment: an image still advances it, a text does not."""
    return rope + 1 if is_image else rope
