"""KVCache: in-place appends, O(1) forks that share the prefix, peek (no store), truncate (rollback)."""

import torch

from inference.kv_cache import KVCache, total_nbytes

H, D = 2, 4


def rows(n, start=0):
    k = torch.arange(start, start + n, dtype=torch.float32)[:, None, None].expand(n, H, D).clone()
    return k, -k


def put(cache, n, start):
    for layer in range(cache.num_layers):
        cache.update(layer, *rows(n, start))


def keys(cache, layer=0):
    k, _ = cache.layer(layer)
    return [] if k is None else k[:, 0, 0].tolist()


def test_append_in_place_and_growth():
    cache = KVCache(num_layers=2)
    put(cache, 3, 0)
    buf = cache._layers[0][0].buf
    for i in range(3, 200):  # crosses several doublings
        k, v = cache.update(0, *rows(1, i))
        cache.update(1, *rows(1, i))
        assert k.shape == (i + 1, H, D) and torch.equal(v, -k)
    assert len(cache) == 200 and cache.num_segments() == 1 and cache._layers[0][0].buf is buf
    assert keys(cache) == list(range(200)) and buf.capacity < 400


def test_fork_shares_prefix_and_branches_independently():
    cache = KVCache(num_layers=2)
    put(cache, 100, 0)
    snap = cache.fork()
    put(cache, 5, 100)  # owner of the tail: in place
    assert cache.num_segments() == 1
    put(snap, 3, 1000)  # a fork never writes into shared storage: a suffix buffer of its own
    assert snap.num_segments() == 2
    assert keys(cache) == list(range(105))
    assert keys(snap) == list(range(100)) + [1000, 1001, 1002]
    shared = cache.shared_nbytes(snap)
    assert shared == cache.nbytes()  # the fork references the whole prefix storage ...
    assert total_nbytes(cache, snap) < 2 * cache.nbytes()  # ... and does not duplicate it


def test_snapshot_survives_growth_of_the_original():
    cache = KVCache(num_layers=1)
    put(cache, 10, 0)
    snap = cache.fork()
    put(cache, 500, 10)  # reallocates the shared buffer
    assert keys(snap) == list(range(10)) and len(snap) == 10


def test_peek_returns_prefix_plus_new_and_stores_nothing():
    cache = KVCache(num_layers=1)
    put(cache, 4, 0)
    view = cache.peek()
    k, v = view.update(0, *rows(2, 50))
    assert k[:, 0, 0].tolist() == [0, 1, 2, 3, 50, 51]
    assert len(cache) == 4 and len(view) == 4
    empty = KVCache(num_layers=1).peek()
    k, _ = empty.update(0, *rows(2, 7))
    assert k[:, 0, 0].tolist() == [7, 8]


def test_truncate_is_a_rollback_that_keeps_the_original():
    cache = KVCache(num_layers=1)
    put(cache, 5, 0)
    snap = cache.fork()
    put(snap, 5, 100)
    back = snap.truncate(7)
    assert keys(back) == [0, 1, 2, 3, 4, 100, 101]
    put(back, 1, 900)  # writes a new suffix: `snap` is untouched
    assert keys(back) == [0, 1, 2, 3, 4, 100, 101, 900]
    assert keys(snap) == [0, 1, 2, 3, 4, 100, 101, 102, 103, 104]


def test_compact_merges_segments():
    cache = KVCache(num_layers=1)
    put(cache, 5, 0)
    a = cache.fork()
    put(cache, 1, 5)
    put(a, 2, 10)
    assert a.num_segments() == 2
    a.compact()
    assert a.num_segments() == 1 and keys(a) == [0, 1, 2, 3, 4, 10, 11]
    put(a, 1, 12)
    assert a.num_segments() == 1 and keys(cache) == [0, 1, 2, 3, 4, 5]


def test_a_fork_never_grows_or_writes_shared_storage():
    cache = KVCache(num_layers=1)
    put(cache, 64, 0)  # exactly fills the first buffer (MIN_CAPACITY rows)
    buf = cache._layers[0][0].buf
    before = buf.capacity
    fork = cache.fork()
    put(fork, 1, 500)  # the original has not appended: the fork still must not take the shared tail
    assert buf.capacity == before and buf.used == 64 and fork.num_segments() == 2
    put(cache, 1, 64)  # the original keeps appending in place
    assert cache.num_segments() == 1 and keys(cache)[-1] == 64 and keys(fork)[-1] == 500


def test_benchmark_script_runs(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kv_cache.py"
    spec = importlib.util.spec_from_file_location("kv_cache_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(
            [
                "--contexts",
                "64",
                "128",
                "--hidden",
                "64",
                "--layers",
                "1",
                "--repeat",
                "1",
                "--forks",
                "2",
                "--suffix",
                "4",
                "--threads",
                "1",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| 128 |" in out and "KVCache.fork" in out
