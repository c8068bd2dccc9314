"""The call cache's SQLite store (common/call_cache.py) and the shard manifest (data_gen/shards.py): values
by key, deletion, processes writing at once, and the one-shot migration of the earlier layouts (one file
per cached call; a JSON manifest rewritten per chunk), also end to end: an output directory of an earlier
version resumes with no call made again."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sqlite3

from fake_openai_server import FakeOpenAIServer, shapes_answer
from test_data_gen_api import KEY_ENV, PROMPTS, api_config, records_of, run

from common.call_cache import CallCache, canonical_json
from data_gen.shards import ShardOutput, read_manifests, select_items


def test_values_by_key_deleted_on_request(tmp_path):
    cache = CallCache(tmp_path)
    key, value = cache.lookup("x", {"q": 1})
    assert value is None
    cache.put(key, {"text": "hi", "n": [1, 2]})
    cache.put(key, {"text": "hi again"})  # a later value replaces
    assert cache.lookup("x", {"q": 1}) == (key, {"text": "hi again"})
    assert len(cache) == 1 and (tmp_path / "calls.sqlite").exists()
    cache.delete([key, "no-such-key"])
    assert cache.get(key) is None and len(cache) == 0
    assert cache.stats() == {"x": {"hits": 1, "misses": 1}}


def _write_values(root: str, worker: int, n: int) -> None:
    cache = CallCache(root)
    for i in range(n):
        cache.put(f"{worker}-{i}", {"worker": worker, "i": i})
    cache.close()


def test_processes_write_one_store_at_once(tmp_path):
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")  # fork: no second start-up
    procs = [ctx.Process(target=_write_values, args=(str(tmp_path), w, 200)) for w in range(3)]
    for p in procs:
        p.start()
    _write_values(str(tmp_path), 3, 200)  # and this process too
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = CallCache(tmp_path)
    assert len(cache) == 800 and cache.get("2-199") == {"worker": 2, "i": 199}


def legacy_cache(root, values: dict[str, object]) -> None:
    """The earlier layout: ROOT/ab/<key>.json, canonical JSON, plus a temporary file of a killed writer."""
    for key, value in values.items():
        path = root / key[:2] / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(canonical_json(value))
    (root / "ab").mkdir(exist_ok=True)
    (root / "ab" / ".abcd.json.123.456.tmp").write_text('{"half')


def test_per_file_cache_moves_into_the_store_once(tmp_path, monkeypatch):
    import common.call_cache as call_cache

    monkeypatch.setattr(call_cache, "MIGRATE_BATCH", 3)  # several batches
    values = {f"{i:02x}" + "f" * 62: {"text": f"reply {i}"} for i in range(0, 256, 37)}  # 7 keys
    legacy_cache(tmp_path, values)
    newer = next(iter(values))
    CallCache(tmp_path).put(newer, {"text": "newer"})  # a value already in the store is kept
    cache = CallCache(tmp_path)
    assert len(cache) == 7 and cache.get(newer) == {"text": "newer"}
    assert all(cache.get(k) == v for k, v in values.items() if k != newer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calls.sqlite", "calls.sqlite-shm", "calls.sqlite-wal"]
    assert call_cache.migrate_files(cache) == 0  # once


def test_an_earlier_versions_output_resumes_with_no_call_made_again(tmp_path, monkeypatch):
    """A run as an earlier version left it (per-file cache holding a reply that stayed malformed as the final
    answer, JSON manifest), re-run: nothing is asked again but the prompt whose reply was invalid."""
    monkeypatch.setenv(KEY_ENV, "sk-test")
    script = {PROMPTS[1]: ["malformed", "malformed"]}
    with FakeOpenAIServer(shapes_answer, script) as server:
        cfg = api_config(server, tmp_path, **{"pipeline.chunk_size": 4})
        with monkeypatch.context() as old:
            old.setattr(CallCache, "delete", lambda self, keys: None)  # earlier versions kept invalid replies
            first = run(cfg, tmp_path / "out")
        asked = len(server.log)
        assert first.total.rejected == {"malformed_json": 1} and first.total.kept == 11
        # the earlier layout: every stored value as a file of its own, the manifest as JSON
        store = sqlite3.connect(tmp_path / "cache" / "calls.sqlite")
        values = {k: json.loads(v) for k, v in store.execute("SELECT key, value FROM calls")}
        store.close()
        shutil.rmtree(tmp_path / "cache")
        legacy_cache(tmp_path / "cache", values)
        manifest = read_manifests(tmp_path / "out", allow_partial=True)[0]
        for chunk in manifest["chunks"].values():
            chunk.pop("retry")  # an earlier version had no retry count; its rejection was final
        for path in (tmp_path / "out").glob("manifest-*"):
            path.unlink()
        (tmp_path / "out" / "manifest-00000of00001.json").write_text(json.dumps(manifest))

        # migrates both, redoes the chunk with the invalid reply: its cached exchange is invalid, so it is
        # dropped and asked again (once: the fault is used up); the chunk's other prompts come from the cache
        again = run(cfg, tmp_path / "out")
        assert len(server.log) == asked + 1 and server.log[-1]["key"] == PROMPTS[1]
    assert again.complete and again.total.kept == 12 and not again.total.rejected
    assert not (tmp_path / "out" / "manifest-00000of00001.json").exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(records_of(tmp_path / "out")) == 12


def test_manifest_rows_and_spend(tmp_path):
    items = select_items(["a", "b", "c"], None, (0, 1), 0)
    out = ShardOutput(tmp_path, (0, 1), "trajectories", "fp")
    out.write_chunk("00000", items, [], {"failed": {}}, retry=1, spend={"requests": 4, "prompt_tokens": 40})
    out.record_spend({"requests": 6, "prompt_tokens": 60, "completion_tokens": 30})  # adds the difference
    assert not out.is_done("00000", items)  # a reply to ask again
    other = ShardOutput(tmp_path, (0, 1), "trajectories", "fp")  # another process on the same shard
    other.record_spend({"requests": 1})
    assert out.spent() == {"requests": 7, "prompt_tokens": 60, "completion_tokens": 30}
    assert other.chunks["00000"]["retry"] == 1 and not read_manifests(tmp_path, allow_partial=True)[0]["complete"]
