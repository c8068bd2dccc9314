"""A KV cache that appends in place and forks in O(1): the memory of one inference context.

The official `NaiveCache` re-concatenates the whole cache on every update (cost O(context) per new
token, and a `deepcopy` per CFG context / branch). Here each layer's keys and values live in growable
buffers (capacity doubles, so an append costs O(new tokens) amortised) and a context is a chain of
*segments* — (buffer, start, end) views — so that:

  * `fork()` is O(num_layers): the fork points at the same buffers and records their lengths;
  * a context appends in place only into a buffer it created, and only at that buffer's written end;
    a fork (or a rolled-back snapshot) that appends after a shared prefix starts its own suffix buffer —
    copy-on-write that never copies the prefix, and never grows storage that other contexts share;
  * a snapshot stays valid however the original grows: rows it can see are never overwritten.

The model's attention layers call the one hook `k, v = cache.update(layer_idx, k_new, v_new)`
(keys already k_norm'ed and RoPE'd) and attend to the returned keys/values: the cached prefix followed
by the new rows. Whether the new rows are kept is the cache's business: `store=True` appends them (the
official `update_past_key_values=True`), a `peek()` view returns the concatenation without storing
(`_forward_flow`, CFG branches). Reading a single-segment context is a zero-copy view; a context made
of several segments (a fork that appended) is concatenated per read, which is O(context) like the
attention that consumes it (`compact()` merges it into one private buffer when that matters).

Shapes: one layer's rows are `[tokens, num_kv_heads, head_dim]` (the packed layout of BAGEL's
attention; the sequence is dimension 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_CAPACITY = 64  # rows allocated for a new buffer (grows by doubling)


class _Buffer:
    """Growable K/V storage of one layer. Rows [0, used) are written and never change afterwards."""

    def __init__(self, like: torch.Tensor, capacity: int, owner: object):
        self.owner = owner  # the only context that may append here
        shape = (max(capacity, MIN_CAPACITY),) + tuple(like.shape[1:])
        self.k = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.v = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.used = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[0]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Write rows at the tail (doubling the storage when full); returns the new `used`."""
        n = k.shape[0]
        if self.used + n > self.capacity:
            cap = self.capacity
            while cap < self.used + n:
                cap *= 2
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_empty((cap,) + tuple(old.shape[1:]))
                new[: self.used] = old[: self.used]
                setattr(self, name, new)
        self.k[self.used : self.used + n] = k
        self.v[self.used : self.used + n] = v
        self.used += n
        return self.used

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass(frozen=True)
class _Segment:
    buf: _Buffer
    start: int
    end: int


class KVCache:
    """Keys/values of every layer of one context; see the module docstring.

    Example (a CFG snapshot and a branch, no recomputation of the shared prefix):
        cache = KVCache(num_layers)              # model forwards call cache.update(l, k, v)
        before_text = cache.fork()               # O(1) snapshot
        ... prefill more text into `cache` (appends in place) ...
        with_branch = cache.fork()               # both see the prefix; each appends separately
    """

    def __init__(self, num_layers: int, store: bool = True):
        self.num_layers = num_layers
        self.store = store  # False: `update` returns prefix + new rows without keeping them
        self._layers: list[list[_Segment]] = [[] for _ in range(num_layers)]
        self._token = object()  # identifies the buffers this context created (and may append to)

    # ---- the attention hook ----------------------------------------------------------------------
    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (prefix + new) keys and values for `layer_idx`; append the new rows if `store`."""
        if not self.store:
            pk, pv = self.layer(layer_idx)
            if pk is None:
                return k, v
            return torch.cat([pk, k.to(pk.dtype)]), torch.cat([pv, v.to(pv.dtype)])
        segs = self._layers[layer_idx]
        last = segs[-1] if segs else None
        if last is not None and last.buf.owner is self._token and last.buf.used == last.end:
            end = last.buf.append(k, v)  # our buffer, and nobody wrote past us: in place
            segs[-1] = _Segment(last.buf, last.start, end)
        else:  # empty, or a shared prefix: start our own suffix buffer
            buf = _Buffer(k, capacity=2 * k.shape[0], owner=self._token)
            buf.append(k, v)
            segs.append(_Segment(buf, 0, k.shape[0]))
        return self.layer(layer_idx)

    # ---- reading ---------------------------------------------------------------------------------
    def layer(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """All cached (k, v) rows of a layer: a view for one segment, a concatenation otherwise."""
        segs = self._layers[layer_idx]
        if not segs:
            return None, None
        if len(segs) == 1:
            s = segs[0]
            return s.buf.k[s.start : s.end], s.buf.v[s.start : s.end]
        return (
            torch.cat([s.buf.k[s.start : s.end] for s in segs]),
            torch.cat([s.buf.v[s.start : s.end] for s in segs]),
        )

    def __len__(self) -> int:
        """Cached tokens (the official `kv_lens`), read from the last layer (complete after a forward)."""
        return sum(s.end - s.start for s in self._layers[-1]) if self.num_layers else 0

    # ---- branching -------------------------------------------------------------------------------
    def fork(self) -> KVCache:
        """An independent context sharing every cached row with this one: O(num_layers), no copy."""
        other = KVCache(self.num_layers, store=self.store)
        other._layers = [list(segs) for segs in self._layers]
        return other

    def peek(self) -> KVCache:
        """A read-only view: `update` returns prefix + new rows and keeps nothing (flow forwards)."""
        other = self.fork()
        other.store = False
        return other

    def truncate(self, length: int) -> KVCache:
        """A fork that sees only the first `length` tokens (rollback); rows are shared, not freed."""
        if not 0 <= length <= len(self):
            raise ValueError(f"truncate: length must be in [0, {len(self)}], got {length}")
        other = KVCache(self.num_layers, store=self.store)
        for layer_idx, segs in enumerate(self._layers):
            kept, left = [], length
            for s in segs:
                if left <= 0:
                    break
                take = min(left, s.end - s.start)
                kept.append(_Segment(s.buf, s.start, s.start + take))
                left -= take
            other._layers[layer_idx] = kept
        return other

    def compact(self) -> KVCache:
        """Merge each layer's segments into one private buffer (one O(context) copy) so later appends
        and reads are O(new) / zero-copy again; worth it before decoding a long suffix in a fork."""
        for layer_idx in range(self.num_layers):
            if len(self._layers[layer_idx]) > 1:
                k, v = self.layer(layer_idx)
                buf = _Buffer(k, capacity=2 * k.shape[0], owner=self._token)
                buf.append(k, v)
                self._layers[layer_idx] = [_Segment(buf, 0, k.shape[0])]
        return self

    # ---- accounting ------------------------------------------------------------------------------
    def buffers(self) -> set[int]:
        return {id(s.buf) for segs in self._layers for s in segs}

    def nbytes(self) -> int:
        """Bytes of storage this context references (allocated capacity, shared buffers included)."""
        seen: dict[int, _Buffer] = {id(s.buf): s.buf for segs in self._layers for s in segs}
        return sum(b.nbytes() for b in seen.values())

    def shared_nbytes(self, other: KVCache) -> int:
        """Bytes of storage referenced by both contexts (what a fork does not duplicate)."""
        mine = {id(s.buf): s.buf for segs in self._layers for s in segs}
        common = mine.keys() & other.buffers()
        return sum(mine[i].nbytes() for i in common)

    def num_segments(self) -> int:
        return max((len(segs) for segs in self._layers), default=0)


def total_nbytes(*caches: KVCache) -> int:
    """Distinct storage bytes held by several contexts together (shared buffers counted once)."""
    seen: dict[int, _Buffer] = {}
    for c in caches:
        for segs in c._layers:
            for s in segs:
                seen[id(s.buf)] = s.buf
    return sum(b.nbytes() for b in seen.values())


class PackedCaches:
    """The KV hook of one packed forward over several contexts (`Engine.execute`): the new rows [sum q, ...]
    are split by sample, each sample's cache appends them (or, a `peek()` view, only returns them) and the
    samples' keys come back one after another — the `AttentionSpec.with_cache(kv_lens, query_lens, ...)`
    layout. With one cache this is that cache's own `update`, zero-copy as before."""

    def __init__(self, caches: list[KVCache], query_lens: list[int]):
        if len(caches) != len(query_lens):
            raise ValueError(f"PackedCaches: {len(caches)} caches for {len(query_lens)} query lengths")
        self.caches, self.query_lens = caches, list(query_lens)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.caches) == 1:
            return self.caches[0].update(layer_idx, k, v)
        ks, vs = [], []
        for cache, k_i, v_i in zip(self.caches, k.split(self.query_lens), v.split(self.query_lens), strict=True):
            k_i, v_i = cache.update(layer_idx, k_i, v_i)
            ks.append(k_i)
            vs.append(v_i)
        return torch.cat(ks), torch.cat(vs)
