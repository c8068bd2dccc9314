"""Who attends to whom in a packed sequence, and the backends that compute it: the one place for both.

Rules (official BAGEL `prepare_attention_mask_per_sample` / `create_sparse_mask`). A packed call holds
samples, each split into segments with an attention mode:
  * causal (text):            causal inside the segment, sees every earlier segment of its sample;
  * full (ViT / clean VAE):   bidirectional inside, sees every earlier segment;
  * noise (noisy VAE target): like full, but no token of another segment may attend to it;
  * samples never see each other (block-diagonal).
All of this is `_allowed` below; the dense masks and the flex BlockMask are both built from it.

KV cache: keys may outnumber queries. Keys are laid out sample after sample; the queries of sample i
are its LAST `query_lens[i]` keys (its cached keys come first), so a cached prefix is just earlier
segments of the sample and the same rules apply (causal masks are bottom-right aligned).

Backends (`ATTN_BACKENDS`, chosen by name in `prepare_mask`):
  * "sdpa":  torch scaled_dot_product_attention with a dense boolean mask per sample (CPU default,
             differentiable; memory O(sample_len^2) per sample, like the official nested masks);
  * "flex":  torch flex_attention with a BlockMask built from the same rules (compiled on CUDA;
             eager on CPU, forward only there);
  * "flash": flash_attn_varlen_func; it can only express "each sample's queries form one causal or
             full segment at the end of its keys" (inference, text-only training), else an error.
Scale is 1/sqrt(head_dim); GQA: query head h reads kv head h // (heads / kv_heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

ATTN_BACKENDS = ("sdpa", "flex", "flash")
ATTN_MODES = ("causal", "full", "noise")


@dataclass(frozen=True)
class AttentionSpec:
    """The layout of one packed attention call (all lengths in tokens)."""

    sample_lens: tuple[int, ...]  # keys per sample, packed one sample after another
    split_lens: tuple[int, ...]  # segments over the keys, in order; each lies inside one sample
    attn_modes: tuple[str, ...]  # one of ATTN_MODES per segment
    query_lens: tuple[int, ...] | None = None  # queries of sample i = its last query_lens[i] keys; None: all keys

    def __post_init__(self):
        object.__setattr__(self, "sample_lens", tuple(int(n) for n in self.sample_lens))
        object.__setattr__(self, "split_lens", tuple(int(n) for n in self.split_lens))
        object.__setattr__(self, "attn_modes", tuple(self.attn_modes))
        if self.query_lens is not None:
            object.__setattr__(self, "query_lens", tuple(int(n) for n in self.query_lens))
        self.validate()

    @classmethod
    def causal(cls, sample_lens) -> AttentionSpec:
        """Plain causal LM over samples of text (each sample one causal segment)."""
        return cls(tuple(sample_lens), tuple(sample_lens), ("causal",) * len(sample_lens))

    @classmethod
    def with_cache(cls, kv_lens, query_lens, mode) -> AttentionSpec:
        """New tokens (one segment per sample, in `mode`: one mode for all, or one per sample) appended after
        `kv_lens[i]` cached keys each."""
        split_lens, modes = [], []
        sample_modes = [mode] * len(kv_lens) if isinstance(mode, str) else list(mode)
        for kv, q, m in zip(kv_lens, query_lens, sample_modes, strict=True):
            if kv > 0:  # the cache is earlier context; its own inner mask no longer matters
                split_lens.append(kv)
                modes.append("full")
            split_lens.append(q)
            modes.append(m)
        sample_lens = tuple(kv + q for kv, q in zip(kv_lens, query_lens, strict=True))
        return cls(sample_lens, tuple(split_lens), tuple(modes), tuple(query_lens))

    @property
    def num_keys(self) -> int:
        return sum(self.sample_lens)

    @property
    def num_queries(self) -> int:
        return self.num_keys if self.query_lens is None else sum(self.query_lens)

    def validate(self) -> None:
        if len(self.split_lens) != len(self.attn_modes):
            raise ValueError(f"split_lens has {len(self.split_lens)} entries, attn_modes {len(self.attn_modes)}")
        bad = [m for m in self.attn_modes if m not in ATTN_MODES]
        if bad:
            raise ValueError(f"attn_modes: expected entries in {ATTN_MODES}, got {bad}")
        # every sample boundary must also be a segment boundary
        seg_ends = set(accumulate(self.split_lens))
        if sum(self.split_lens) != self.num_keys or not set(accumulate(self.sample_lens)) <= seg_ends:
            raise ValueError(f"split_lens {self.split_lens} do not partition sample_lens {self.sample_lens}")
        if self.query_lens is not None:
            if len(self.query_lens) != len(self.sample_lens):
                raise ValueError(f"query_lens has {len(self.query_lens)} entries, sample_lens {len(self.sample_lens)}")
            if any(q > n for q, n in zip(self.query_lens, self.sample_lens, strict=True)):
                raise ValueError(f"query_lens {self.query_lens} exceed sample_lens {self.sample_lens}")


# ---- the rules ------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Per-key ids the rules read ([Lk] each) and the key position of every query ([Lq])."""

    sample_id: Tensor
    segment_id: Tensor
    bidirectional: Tensor  # bool: key lies in a full or noise segment
    noise: Tensor  # bool: key lies in a noise segment
    query_pos: Tensor


def _layout(spec: AttentionSpec, device) -> _Layout:
    def per_key(values, lens):
        return torch.repeat_interleave(torch.tensor(values, device=device), torch.tensor(lens, device=device))

    modes = spec.attn_modes
    if spec.query_lens is None:
        query_pos = torch.arange(spec.num_keys, device=device)
    else:
        starts = [end - q for end, q in zip(accumulate(spec.sample_lens), spec.query_lens, strict=True)]
        query_pos = torch.cat(
            [torch.arange(s, s + q, device=device) for s, q in zip(starts, spec.query_lens, strict=True)]
        )
    return _Layout(
        sample_id=per_key(list(range(len(spec.sample_lens))), spec.sample_lens),
        segment_id=per_key(list(range(len(spec.split_lens))), spec.split_lens),
        bidirectional=per_key([m != "causal" for m in modes], spec.split_lens),
        noise=per_key([m == "noise" for m in modes], spec.split_lens),
        query_pos=query_pos,
    )


def _allowed(lay: _Layout, q: Tensor, kv: Tensor) -> Tensor:
    """May the token at key position `q` attend to key position `kv`? (broadcasting; also a flex mask_mod)."""
    same_sample = lay.sample_id[q] == lay.sample_id[kv]
    same_segment = lay.segment_id[q] == lay.segment_id[kv]
    earlier_or_self = q >= kv  # causal inside a segment, and every earlier segment
    visible = earlier_or_self | (same_segment & lay.bidirectional[q])
    hidden_noise = lay.noise[kv] & ~same_segment
    return same_sample & visible & ~hidden_noise


def build_sample_masks(spec: AttentionSpec, device=None) -> list[Tensor]:
    """Boolean allowed-masks, one [queries_i, keys_i] block per sample (True = may attend)."""
    lay = _layout(spec, device)
    masks, key_start, query_start = [], 0, 0
    for i, n in enumerate(spec.sample_lens):
        nq = n if spec.query_lens is None else spec.query_lens[i]
        q = lay.query_pos[query_start : query_start + nq]
        kv = torch.arange(key_start, key_start + n, device=device)
        masks.append(_allowed(lay, q[:, None], kv[None, :]))
        key_start, query_start = key_start + n, query_start + nq
    return masks


def build_dense_mask(spec: AttentionSpec, device=None, dtype=torch.float32) -> Tensor:
    """Additive mask [Lq, Lk] of the whole packed call: 0 where allowed, -inf elsewhere (block-diagonal)."""
    allowed = torch.block_diag(*build_sample_masks(spec, device))
    return additive(allowed, dtype)


def additive(allowed: Tensor, dtype=torch.float32) -> Tensor:
    """Boolean allowed-mask -> additive 0 / -inf mask (the official nested_attention_masks format)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


# ---- backends -------------------------------------------------------------------------------------


@dataclass
class PreparedMask:
    """A spec turned into what one backend needs; build once per forward, reuse in every layer."""

    spec: AttentionSpec
    backend: str
    sample_masks: list[Tensor | None] | None = None  # sdpa; None for a sample whose queries see every key
    block_mask: object | None = None  # flex BlockMask
    flash_args: dict | None = None  # flash: cu_seqlens / max_seqlen / causal


def _sees_every_key(spec: AttentionSpec) -> list[bool]:
    """Per sample: do all its queries see all its keys? True when the queries are exactly its last segment,
    that segment is bidirectional or one token (a decode step), and no earlier segment is a noisy image —
    the shape of every cached inference call (the cache never holds noisy images). Such samples need no
    mask, so a decode step costs no O(context) mask building."""
    if spec.query_lens is None:
        return [False] * len(spec.sample_lens)
    out, seg, splits = [], 0, list(zip(spec.split_lens, spec.attn_modes, strict=True))
    for n, q in zip(spec.sample_lens, spec.query_lens, strict=True):
        mine, total = [], 0
        while total < n:
            mine.append(splits[seg])
            total, seg = total + splits[seg][0], seg + 1
        last_len, last_mode = mine[-1]
        out.append(q == last_len and (last_mode != "causal" or q == 1) and all(m != "noise" for _, m in mine[:-1]))
    return out


def prepare_mask(spec: AttentionSpec, backend: str = "sdpa", device=None) -> PreparedMask:
    if backend == "sdpa":
        unmasked = _sees_every_key(spec)
        if all(unmasked):
            return PreparedMask(spec, backend, sample_masks=[None] * len(unmasked))
        masks = build_sample_masks(spec, device)
        return PreparedMask(
            spec, backend, sample_masks=[None if u else m for u, m in zip(unmasked, masks, strict=True)]
        )
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        lay = _layout(spec, device)

        def mask_mod(b, h, q_idx, kv_idx):
            return _allowed(lay, lay.query_pos[q_idx], kv_idx)

        device = torch.device(device if device is not None else "cpu")
        block_mask = create_block_mask(
            mask_mod,
            B=None,
            H=None,
            Q_LEN=spec.num_queries,
            KV_LEN=spec.num_keys,
            device=device,
            _compile=device.type == "cuda",  # as the official: avoids materialising [Lq, Lk] on long packs
        )
        return PreparedMask(spec, backend, block_mask=block_mask)
    if backend == "flash":
        return PreparedMask(spec, backend, flash_args=_flash_args(spec, device))
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTN_BACKENDS}")


def attend(q: Tensor, k: Tensor, v: Tensor, mask: PreparedMask) -> Tensor:
    """Packed attention. q [Lq, H, Dh], k/v [Lk, Hkv, Dh] laid out as `mask.spec` says -> [Lq, H, Dh]."""
    spec = mask.spec
    if q.shape[0] != spec.num_queries or k.shape[0] != spec.num_keys:
        raise ValueError(
            f"attention got {q.shape[0]} queries / {k.shape[0]} keys, spec expects {spec.num_queries} / {spec.num_keys}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1])
    if mask.backend == "sdpa":
        return _sdpa(q, k, v, mask, scale)
    if mask.backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        fn = _compiled_flex() if q.is_cuda else flex_attention
        qb, kb, vb = (rearrange(t, "l h d -> 1 h l d") for t in (q, k, v))
        o = fn(qb, kb, vb, block_mask=mask.block_mask, scale=scale, enable_gqa=True)
        return rearrange(o, "1 h l d -> l h d")
    if mask.backend == "flash":
        flash_attn_varlen_func = _import_flash()
        return flash_attn_varlen_func(q, k, v, softmax_scale=scale, **mask.flash_args)
    raise ValueError(f"unknown attention backend {mask.backend!r}; expected one of {ATTN_BACKENDS}")


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: PreparedMask, scale: float) -> Tensor:
    """One SDPA call per sample, with its dense mask (None: the sample's queries see all its keys). (One
    padded call for the unmasked samples of a batched decode / flow step was measured slower on CPU: the
    masked kernel costs more than the per-call overhead it saves.)"""
    spec = mask.spec
    query_lens = spec.sample_lens if spec.query_lens is None else spec.query_lens
    outs = []
    for qi, ki, vi, m in zip(
        q.split(query_lens), k.split(spec.sample_lens), v.split(spec.sample_lens), mask.sample_masks, strict=True
    ):
        qi, ki, vi = (t.transpose(0, 1)[None] for t in (qi, ki, vi))  # [1, heads, l, d] views
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=m, scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


_COMPILED_FLEX = None


def _compiled_flex():
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:  # compiling once per process; the eager version materialises all scores
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def _import_flash():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise RuntimeError(
            "attention backend 'flash' needs the flash-attn package (pip install -e '.[gpu]' on a "
            "CUDA machine); use 'sdpa' or 'flex' instead"
        ) from e
    return flash_attn_varlen_func


def _flash_args(spec: AttentionSpec, device) -> dict:
    """flash-attn can express only: per sample, the queries are one causal/full segment ending the keys."""
    query_lens = spec.sample_lens if spec.query_lens is None else spec.query_lens
    seg_modes, problems, i = [], [], 0  # mode of each sample's query segment
    for s, (n, nq) in enumerate(zip(spec.sample_lens, query_lens, strict=True)):
        done, segs = 0, []
        while done < n:
            segs.append((spec.split_lens[i], spec.attn_modes[i]))
            done += spec.split_lens[i]
            i += 1
        last_len, last_mode = segs[-1]
        if last_len != nq or any(m == "noise" for _, m in segs[:-1]):
            problems.append(f"sample {s}: queries {nq}, segments {segs}")
        seg_modes.append(last_mode)
    if len({m == "causal" for m in seg_modes}) > 1:
        problems.append(f"mixed causal / full query segments {seg_modes}")
    if problems:
        raise ValueError(
            "attention backend 'flash' cannot express this layout (use 'sdpa' or 'flex'): " + "; ".join(problems)
        )

    def cu(lens):
        return F.pad(torch.tensor(lens, device=device).cumsum(0), (1, 0)).to(torch.int32)

    return dict(
        cu_seqlens_q=cu(query_lens),
        cu_seqlens_k=cu(spec.sample_lens),
        max_seqlen_q=max(query_lens),
        max_seqlen_k=max(spec.sample_lens),
        causal=seg_modes[0] == "causal",
    )
