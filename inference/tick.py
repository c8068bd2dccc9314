"""One tick of inference: the ops that programs (`inference.batching`) yield, and `execute`, which runs all the
ops of a tick — the CFG branches of a flow step, the steps of every sample in flight — together:

  * the ViT, the VAE encoder and the VAE decoder run once per kind over all their images (one call per
    image size);
  * every LLM op becomes one sample of ONE packed forward: its new rows after its own context's cache
    (`AttentionSpec.with_cache` over `PackedCaches`: each sample attends only to its own context), text
    segments causal on the und expert, image blocks `<|vision_start|> inner <|vision_end|>` bidirectional with
    latent rows on the gen expert; then lm_head once over the text rows asked for, llm2vae once over the
    latent rows of the flow forwards.
A tick may append to a context only if no other op of the same tick uses that context (`_check_tick`).
Shapes: H hidden, N latent tokens of one image, D = p*p*z latent token features.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bagel_ft.attention import AttentionSpec
from bagel_ft.embeddings import latent_position_ids, patchify_latent, unpatchify_latent
from bagel_ft.segments import CAUSAL, Segment, image_segment, text_segment
from bagel_ft.siglip import patchify_image, vit_position_ids
from inference.kv_cache import PackedCaches

if TYPE_CHECKING:
    from inference.engine import Context, Engine

# ---- the ops ----------------------------------------------------------------------------------------------


@dataclass
class Tokens:
    """Append text tokens to `ctx` (causal, und expert, RoPE ids rope..rope+n-1; rope += n) -> float logits
    [V] after the last token ([n, V] after each one when `all_logits`)."""

    ctx: Context
    ids: list[int]
    all_logits: bool = False


@dataclass
class Velocity:
    """One flow forward (the official `_forward_flow`; the cache is untouched): latent tokens x_t [N, D] of an
    h x w grid at time t, placed at ctx.rope -> velocity [N, D] (float32)."""

    ctx: Context
    x_t: Tensor
    t: float
    h: int
    w: int


@dataclass
class CleanImage:
    """Append a clean image [3, H, W] in [-1, 1] to `ctx` (one RoPE id; rope += 1) -> None. `encoder` "vae":
    latents at t = 0 on the gen expert (H, W multiples of latent_downsample); "vit": SigLIP features, und."""

    ctx: Context
    image: Tensor
    encoder: str


@dataclass
class DecodeLatent:
    """Latent tokens [N, D] of an h x w grid -> decoded image [3, H, W] (float, ~[-1, 1], unclamped)."""

    tokens: Tensor
    h: int
    w: int


@dataclass
class _Sample:
    """One sample of a packed LLM forward: new rows after `ctx`'s cache."""

    op: int  # index of the op it serves in the tick
    ctx: Context
    rows: Tensor  # [n, H] input embeddings
    segment: Segment  # where the rows sit after the cache (bagel_ft.segments: positions, RoPE ids, attention mode)
    gen: Tensor | None  # rows (indexes into `rows`) on the gen expert
    store: bool  # append to the cache (False: a flow forward peeks)

    @property
    def attn_mode(self) -> str:
        return self.segment.attn_mode


# ---- a tick ----------------------------------------------------------------------------------------------


@torch.no_grad()
def execute(engine: Engine, ops: list) -> list:
    """Run one tick of ops (the op classes above) -> their results, in order. The ViT, the VAE encoder and
    decoder run once per kind over all their images; every LLM op is one sample of ONE packed forward,
    attending only to its own context's cache (`AttentionSpec.with_cache`, `PackedCaches`)."""
    _check_tick(ops)
    results: list = [None] * len(ops)
    picked = {
        kind: [(i, op) for i, op in enumerate(ops) if isinstance(op, kind)]
        for kind in (Tokens, Velocity, CleanImage, DecodeLatent)
    }
    samples = _text_samples(engine, picked[Tokens]) + _image_samples(engine, picked[Velocity], picked[CleanImage])
    hidden = _forward(engine, samples) if samples else []
    texts = [(s, h) for s, h in zip(samples, hidden, strict=True) if isinstance(ops[s.op], Tokens)]
    flows = [(s, h) for s, h in zip(samples, hidden, strict=True) if isinstance(ops[s.op], Velocity)]
    if texts:  # lm_head once over the rows asked for
        rows = [h if ops[s.op].all_logits else h[-1:] for s, h in texts]
        logits = engine.model.language_model.lm_head(torch.cat(rows)).float().split([len(r) for r in rows])
        for (s, _), out in zip(texts, logits, strict=True):
            results[s.op] = out if ops[s.op].all_logits else out[0]
    if flows:  # llm2vae once over every latent row (the block's ends excluded)
        rows = [h[1:-1] for _, h in flows]
        v = engine.model.predict_velocity(torch.cat(rows)).float().split([len(r) for r in rows])
        for (s, _), out in zip(flows, v, strict=True):
            results[s.op] = out
    for s in samples:  # RoPE advances once the segment is in the cache
        if s.store:
            s.ctx.rope = s.segment.next_rope
    for i, image in _decode_latents(engine, picked[DecodeLatent]):
        results[i] = image
    return results


def _forward(engine: Engine, samples: list[_Sample]) -> list[Tensor]:
    """ONE packed LLM call over `samples` -> each one's final hidden [n, H]. (flash-attn cannot mix causal
    and bidirectional query segments in one call: under that backend each mode gets its own call.)"""
    causal = sorted({s.attn_mode == CAUSAL for s in samples})
    if engine.model.language_model.model.attn_backend == "flash" and len(causal) > 1:
        by_mode = {c: [i for i, s in enumerate(samples) if (s.attn_mode == CAUSAL) == c] for c in causal}
        out: list = [None] * len(samples)
        for idx in by_mode.values():
            for i, h in zip(idx, _forward(engine, [samples[i] for i in idx]), strict=True):
                out[i] = h
        return out
    lens = [s.rows.shape[0] for s in samples]
    spec = AttentionSpec.with_cache([s.ctx.kv_len for s in samples], lens, [s.attn_mode for s in samples])
    caches = PackedCaches([s.ctx.cache if s.store else s.ctx.cache.peek() for s in samples], lens)
    starts = [0, *accumulate(lens)][:-1]
    gen = [s.gen + start for s, start in zip(samples, starts, strict=True) if s.gen is not None]
    rows = torch.cat([s.rows for s in samples])
    positions = torch.tensor([i for s in samples for i in s.segment.position_ids], device=engine.device)
    hidden = engine.model.language_model(
        rows, positions, spec, mode="gen" if gen else "und", gen_indexes=torch.cat(gen) if gen else None, cache=caches
    )
    return list(hidden.split(lens))


def _text_samples(engine: Engine, picked: list[tuple[int, Tokens]]) -> list[_Sample]:
    if not picked:
        return []
    if any(not op.ids for _, op in picked):
        raise ValueError("Tokens: an op with no token ids")
    lens = [len(op.ids) for _, op in picked]
    rows = engine.model.embed_text(_ids(engine, [t for _, op in picked for t in op.ids])).split(lens)
    return [
        _Sample(i, op.ctx, r, text_segment(op.ctx.kv_len, op.ctx.rope, len(op.ids)), None, True)
        for (i, op), r in zip(picked, rows, strict=True)
    ]


def _image_samples(
    engine: Engine, flows: list[tuple[int, Velocity]], cleans: list[tuple[int, CleanImage]]
) -> list[_Sample]:
    """`<|vision_start|> inner <|vision_end|>` blocks at ctx.rope, bidirectional: noisy latents (flow
    forwards, not stored), clean VAE latents (gen expert) and ViT features (und), embedded per kind."""
    blocks = []  # (op index, ctx, inner [n, H], gen expert, store)
    if flows:
        for _, op in flows:
            engine.check_tokens(op.x_t, op.h * op.w)
        grids = [(op.h, op.w) for _, op in flows]
        t = torch.cat([torch.full((op.h * op.w,), float(op.t), device=engine.device) for _, op in flows])
        inner = _embed_latents(engine, torch.cat([op.x_t.to(engine.device) for _, op in flows]), t, grids)
        blocks += [(i, op.ctx, x, True, False) for (i, op), x in zip(flows, inner, strict=True)]
    vae = [(i, op) for i, op in cleans if op.encoder == "vae"]
    vit = [(i, op) for i, op in cleans if op.encoder == "vit"]
    if len(vae) + len(vit) != len(cleans):
        raise ValueError(f"CleanImage.encoder: expected 'vae' or 'vit', got {[op.encoder for _, op in cleans]}")
    if vae:
        tokens, grids = _encode_vae(engine, [op.image for _, op in vae])
        t = torch.zeros(sum(len(x) for x in tokens), device=engine.device)
        inner = _embed_latents(engine, torch.cat(tokens), t, grids)
        blocks += [(i, op.ctx, x, True, True) for (i, op), x in zip(vae, inner, strict=True)]
    if vit:
        inner = _embed_vit(engine, [op.image for _, op in vit])
        blocks += [(i, op.ctx, x, False, True) for (i, op), x in zip(vit, inner, strict=True)]
    if not blocks:
        return []
    tok = engine.tokenizer
    ends = engine.model.embed_text(_ids(engine, [tok.vision_start_id, tok.vision_end_id]))
    samples = []
    for i, ctx, inner, gen_expert, store in blocks:
        n = inner.shape[0]
        rows = torch.cat([ends[:1], inner.to(ends.dtype), ends[1:]])
        gen = torch.arange(1, n + 1, device=engine.device) if gen_expert else None
        segment = image_segment(ctx.kv_len, ctx.rope, n, noisy=not store)  # a flow forward's latents are noisy
        samples.append(_Sample(i, ctx, rows, segment, gen, store))
    return samples


def _embed_latents(engine: Engine, tokens: Tensor, t: Tensor, grids: list[tuple[int, int]]) -> list[Tensor]:
    """Latent tokens [sum h*w, D] at times t of several h x w grids -> LLM inputs, one [h*w, H] per grid."""
    side = engine.config.arch.max_latent_size
    pos = torch.cat([latent_position_ids(h, w, side) for h, w in grids]).to(engine.device)
    return list(engine.model.embed_vae_latents(tokens, t, pos).split([h * w for h, w in grids]))


def _encode_vae(engine: Engine, images: list[Tensor]) -> tuple[list[Tensor], list[tuple[int, int]]]:
    """Images [3, H, W] -> (clean latent tokens [h*w, D], grid (h, w)) each; one VAE call per image size."""
    p, f = engine.config.arch.latent_patch_size, engine.config.latent_downsample
    tokens: list = [None] * len(images)
    for shape, idx in _by_shape(images, lambda x: tuple(x.shape)).items():
        h, w = shape[1] // f, shape[2] // f
        latents = engine.model.encode_images(torch.stack([images[i] for i in idx]).to(engine.device))
        for i, latent in zip(idx, latents, strict=True):
            tokens[i] = patchify_latent(latent[:, : h * p, : w * p], p)
    return tokens, [(x.shape[1] // f, x.shape[2] // f) for x in images]


def _embed_vit(engine: Engine, images: list[Tensor]) -> list[Tensor]:
    """ViT images [3, H, W] -> LLM inputs [h*w, H] each, all images in one packed SigLIP call."""
    patch, side = engine.config.vit.patch_size, engine.config.arch.vit_max_num_patch_per_side
    grids = [(x.shape[1] // patch, x.shape[2] // patch) for x in images]
    tokens = torch.cat([patchify_image(x.to(engine.device, engine.dtype), patch) for x in images])
    pos = torch.cat([vit_position_ids(h, w, side) for h, w in grids]).to(engine.device)
    lens = [h * w for h, w in grids]
    return list(engine.model.embed_vit(tokens, pos, torch.tensor(lens, device=engine.device)).split(lens))


def _decode_latents(engine: Engine, picked: list[tuple[int, DecodeLatent]]) -> list[tuple[int, Tensor]]:
    """(op index, decoded image) for every DecodeLatent op; one VAE decoder call per grid size."""
    if not picked:
        return []
    vae = engine.model.vae
    p, z = engine.config.arch.latent_patch_size, engine.config.vae.z_channels
    out = []
    for (h, w), idx in _by_shape([op for _, op in picked], lambda op: (op.h, op.w)).items():
        latents = torch.stack([unpatchify_latent(picked[k][1].tokens, h, w, p, z) for k in idx])
        images = vae.decode(latents.to(engine.device, next(vae.parameters()).dtype)).float()
        out += [(picked[k][0], image) for k, image in zip(idx, images, strict=True)]
    return out


def _check_tick(ops: list) -> None:
    """A tick may append to a context only if no other op of the tick reads or writes that context (its
    forks are separate contexts; several flow forwards may peek at the same one)."""
    touched = Counter(id(op.ctx.cache) for op in ops if hasattr(op, "ctx"))
    twice = [type(op).__name__ for op in ops if isinstance(op, Tokens | CleanImage) and touched[id(op.ctx.cache)] > 1]
    if twice:
        raise ValueError(
            f"one tick appends to a context that another op of the same tick also uses ({twice}); "
            "yield them one after another"
        )


def _ids(engine: Engine, ids: list[int]) -> Tensor:
    return torch.as_tensor(ids, dtype=torch.long, device=engine.device)


def _by_shape(items: list, key) -> dict:
    """{key(item): [indexes of the items with that key]}, in first-seen order."""
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return groups
