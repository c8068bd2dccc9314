"""KV-cache benchmark: per-token decode cost at growing context, and what a fork costs.

Compares our `inference.kv_cache.KVCache` (in-place appends into doubling buffers, copy-on-write forks)
with the official `NaiveCache` behaviour (every update re-concatenates the whole cache) on a tiny-ish
Qwen2 MoT LLM (CPU, under a minute):

  * append: one `cache.update(layer, k, v)` of one token, alone;
  * decode: one full token step (`Engine.feed_tokens`: embed, every layer, lm_head);
  * attention: the attention of one query over the whole context in every layer (the irreducible part
    of a decode step that grows with the context);
  * forks: memory of F branches of a long context, each with a short suffix of its own.

    python benchmarks/kv_cache.py                  # 1K / 4K / 16K contexts, 1 thread
    python benchmarks/kv_cache.py --contexts 1024 16384 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bagel_ft.attention import AttentionSpec, attend, prepare_mask  # noqa: E402
from bagel_ft.config import BagelConfig, LLMConfig  # noqa: E402
from bagel_ft.modeling import Bagel  # noqa: E402
from bagel_ft.tokenizer import ByteTokenizer  # noqa: E402
from inference.engine import Context, Engine  # noqa: E402
from inference.kv_cache import KVCache, total_nbytes  # noqa: E402


class NaiveCache(KVCache):
    """The official NaiveCache's cost model: each update stores cat(old, new), a copy of the whole layer."""

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self.k = [None] * num_layers
        self.v = [None] * num_layers

    def update(self, layer_idx, k, v):
        old_k, old_v = self.k[layer_idx], self.v[layer_idx]
        self.k[layer_idx] = k if old_k is None else torch.cat([old_k, k])
        self.v[layer_idx] = v if old_v is None else torch.cat([old_v, v])
        return self.k[layer_idx], self.v[layer_idx]

    def layer(self, layer_idx):
        return self.k[layer_idx], self.v[layer_idx]

    def __len__(self):
        return 0 if self.k[-1] is None else self.k[-1].shape[0]


def build_engine(hidden: int, layers: int, heads: int, kv_heads: int) -> Engine:
    cfg = BagelConfig.preset("tiny")
    cfg.llm = LLMConfig(
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    torch.manual_seed(0)
    return Engine(Bagel(cfg), ByteTokenizer())


def timed(fn, repeat: int) -> float:
    """Fastest of `repeat` runs of `fn()` (after one warm-up), in seconds: on a shared CPU the minimum is
    the least disturbed estimate of the intrinsic cost."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def prefill(engine: Engine, ctx, n: int, chunk: int = 2048) -> None:
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    for i in range(0, n, chunk):
        engine.feed_tokens(ctx, ids[i : i + chunk])


def bench_context(engine: Engine, n: int, repeat: int) -> tuple[dict[str, float], Context]:
    """Timings at context length n; returns them and the prefilled context (our cache)."""
    llm = engine.config.llm
    row = {}
    kv = torch.randn(n, llm.num_key_value_heads, llm.head_dim)
    k1 = kv[:1].clone()
    for name, cache_cls in (("ours", KVCache), ("naive", NaiveCache)):
        one_layer = cache_cls(1)
        one_layer.update(0, kv, kv)
        row[f"append_{name}_us"] = 1e6 * timed(lambda c=one_layer: c.update(0, k1, k1), repeat * 5)
    ctx = engine.new_context()
    prefill(engine, ctx, n)
    naive = Context(NaiveCache(llm.num_hidden_layers), ctx.rope)  # the same rows, in a NaiveCache
    for layer in range(llm.num_hidden_layers):
        naive.cache.update(layer, *(t.clone() for t in ctx.cache.layer(layer)))
    row["decode_naive_ms"] = 1e3 * timed(lambda: engine.feed_tokens(naive, [65]), repeat)
    row["decode_ours_ms"] = 1e3 * timed(lambda: engine.feed_tokens(ctx, [65]), repeat)
    # attention alone: what every decode step must compute whatever the cache — one query over the whole
    # context in each layer, with the model's own attention backend and mask (bagel_ft.attention)
    k, v = ctx.cache.layer(0)
    q = torch.randn(1, llm.num_attention_heads, llm.head_dim)
    mask = prepare_mask(
        AttentionSpec.with_cache([k.shape[0] - 1], [1], "causal"), engine.model.language_model.model.attn_backend
    )

    def attention():
        for _ in range(llm.num_hidden_layers):
            attend(q, k, v, mask)

    row["attention_ms"] = 1e3 * timed(attention, repeat)
    return row, ctx


def bench_forks(engine: Engine, ctx: Context, forks: int, suffix: int) -> dict[str, float]:
    base = ctx.cache.nbytes()  # allocated (capacity doubles, so up to 2x the rows in use)
    k, _ = ctx.cache.layer(0)
    used = 2 * k.numel() * k.element_size() * ctx.cache.num_layers  # what a NaiveCache holds: exactly the rows
    start = time.perf_counter()
    branches = [ctx.fork() for _ in range(forks)]
    fork_s = (time.perf_counter() - start) / forks
    for b in branches:
        prefill(engine, b, suffix)
    ours = total_nbytes(ctx.cache, *(b.cache for b in branches))
    start = time.perf_counter()
    copies = [copy.deepcopy(ctx.cache) for _ in range(2)]  # what the official deepcopy of a context costs
    deepcopy_s = (time.perf_counter() - start) / 2
    del copies
    return {
        "base_mb": base / 2**20,
        "forks_total_mb": ours / 2**20,
        "deepcopy_total_mb": (forks + 1) * used / 2**20,
        "fork_us": 1e6 * fork_s,
        "deepcopy_ms": 1e3 * deepcopy_s,
        "shared_mb": branches[0].cache.shared_nbytes(ctx.cache) / 2**20,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384], help="context lengths (tokens)")
    parser.add_argument("--hidden", type=int, default=256, help="LLM hidden size")
    parser.add_argument("--layers", type=int, default=4, help="LLM layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (head_dim = hidden / heads)")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    parser.add_argument("--repeat", type=int, default=9, help="timed repetitions (the fastest is reported)")
    parser.add_argument("--forks", type=int, default=8, help="branches of the longest context in the fork test")
    parser.add_argument("--suffix", type=int, default=32, help="tokens each branch appends")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    engine = build_engine(args.hidden, args.layers, args.heads, args.kv_heads)
    llm = engine.config.llm
    print(
        f"LLM: hidden {llm.hidden_size}, {llm.num_hidden_layers} layers, {llm.num_attention_heads} heads / "
        f"{llm.num_key_value_heads} kv heads (head_dim {llm.head_dim}), float32, {args.threads} CPU thread(s)\n"
    )
    print(
        "| context | append, ours (us) | append, naive cat (us) | decode step, ours (ms) | decode step, naive (ms) "
        "| attention alone (ms) | ours - attention (ms) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in sorted(args.contexts):
        r, ctx = bench_context(engine, n, args.repeat)
        print(
            f"| {n} | {r['append_ours_us']:.1f} | {r['append_naive_us']:.1f} | {r['decode_ours_ms']:.2f} | "
            f"{r['decode_naive_ms']:.2f} | {r['attention_ms']:.2f} | {r['decode_ours_ms'] - r['attention_ms']:.2f} |"
        )
    n = max(args.contexts)
    f = bench_forks(engine, ctx, args.forks, args.suffix)
    print(
        f"\nForks of a {n}-token context ({f['base_mb']:.1f} MiB of K/V storage), {args.forks} branches appending "
        f"{args.suffix} tokens each:"
    )
    print("| | time per branch | storage of context + branches |")
    print("|---|---:|---:|")
    print(
        f"| KVCache.fork (copy-on-write) | {f['fork_us']:.1f} us | {f['forks_total_mb']:.1f} MiB "
        f"(each branch shares {f['shared_mb']:.1f} MiB) |"
    )
    print(f"| deepcopy (official contexts) | {f['deepcopy_ms']:.1f} ms | {f['deepcopy_total_mb']:.1f} MiB |")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
