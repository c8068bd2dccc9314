"""Sharding, resumable parquet output and merging.

* `--shard I/N` keeps the prompts whose stable hash (sha256 of the text) is I mod N, so N machines split
  one prompt file with no coordination, and shard membership never depends on order or on N's siblings.
  Each prompt's seed is derived from (run seed, prompt text), so a record is the same whichever shard
  or run makes it, and its id (`record_id`) deduplicates re-runs and merges.
* A shard's prompts are cut into chunks of `pipeline.chunk_size`; each chunk becomes one parquet file
  `part-<I>of<N>-<chunk>.parquet` (rows: `bagel_ft.trajectory.datasets_features()`, in prompt order),
  written to a temporary name and renamed, so a file is complete or absent. Then the chunk is recorded in
  the shard's manifest `manifest-<I>of<N>.sqlite`: one SQLite row per chunk (fingerprint, file, records,
  failed / retry counts, counters), one transaction appended per chunk, and what the shard's runs spent
  (requests, tokens: budget.py), added to in the same transaction.
* A re-run skips the chunks the manifest lists with the same fingerprint, no failures and no replies to
  ask again (`retry`: invalid after repair); a chunk it redoes overwrites its file, so there are no
  duplicates. The call cache makes redone items free.
* A manifest of an earlier version (`manifest-<I>of<N>.json`, rewritten whole per chunk) is moved into the
  SQLite one when the shard is next run; a chunk whose rejections include invalid replies is marked for
  asking again (earlier versions cached such replies as final).
* `merge(dirs)` reads the files the manifests list, drops repeated record ids, sorts by id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from bagel_ft.trajectory import Trajectory, datasets_features
from common.atomic import replacing
from common.call_cache import connect

log = logging.getLogger(__name__)
ROW_GROUP = 128  # rows per parquet row group: the unit training reads and shuffles (training/data.py)


@dataclass(frozen=True)
class Item:
    """One prompt of a run and its own seed."""

    prompt: str
    seed: int


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected I/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard: expected 0 <= I < N, got {text!r}")
    return i, n


def _hash_int(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def shard_of(prompt: str, num_shards: int) -> int:
    return _hash_int(prompt) % num_shards


def item_seed(run_seed: int, prompt: str) -> int:
    return _hash_int(f"{run_seed}\n{prompt}") % 2**31


def derive_seed(seed: int, *parts: object) -> int:
    """An independent seed for one use of an item's seed (a step, an attempt, a negative, ...)."""
    return _hash_int("\n".join(map(str, (seed, *parts)))) % 2**31


def select_items(prompts: list[str], num: int | None, shard: tuple[int, int], run_seed: int) -> list[Item]:
    """The first `num` distinct prompts of the file, then those of shard I of N."""
    distinct = list(dict.fromkeys(p.strip() for p in prompts if p.strip()))
    if num is not None:
        distinct = distinct[:num]
    i, n = shard
    return [Item(p, item_seed(run_seed, p)) for p in distinct if shard_of(p, n) == i]


def write_parquet(records: list[Trajectory], path: Path) -> None:
    """Rows of `records` as one parquet file, complete or absent (temporary file + rename)."""
    write_rows([r.to_row() for r in records], path)


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """`Trajectory.to_row()` rows as one parquet file, complete or absent (temporary file + rename)."""
    table = datasets.Dataset.from_list(rows, features=datasets_features()).data.table
    with replacing(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP)


SPEND_KEYS = ("requests", "prompt_tokens", "completion_tokens")


class ShardOutput:
    """The chunk files and manifest of shard I/N of one run in `out_dir` (thread-safe)."""

    def __init__(self, out_dir: str | Path, shard: tuple[int, int], pipeline: str, config_fingerprint: str):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tag = f"{shard[0]:05d}of{shard[1]:05d}"
        self.path = self.dir / f"manifest-{self.tag}.sqlite"
        self.pipeline, self.config_fingerprint = pipeline, config_fingerprint
        self._lock = threading.Lock()
        self._db = connect(self.path)
        with self._lock, self._db:
            self._db.executescript(SCHEMA)
        _migrate_json_manifest(self, self.dir / f"manifest-{self.tag}.json")
        meta = self._meta()
        if meta.get("pipeline", pipeline) != pipeline:
            raise ValueError(f"{self.dir}: holds a {meta['pipeline']!r} run, not {pipeline!r}; use another --out")
        self._set_meta(pipeline=pipeline, shard=list(shard), config=config_fingerprint)
        self.chunks = _read_chunks(self._db)
        self._recorded = dict.fromkeys(SPEND_KEYS, 0)  # this process's spend already added to the manifest

    def _meta(self) -> dict[str, Any]:
        with self._lock:
            return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    def _set_meta(self, **values: Any) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in values.items()],
            )

    def chunk_fingerprint(self, items: list[Item]) -> str:
        key = json.dumps([self.pipeline, self.config_fingerprint, [(it.prompt, it.seed) for it in items]])
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def is_done(self, name: str, items: list[Item]) -> bool:
        entry = self.chunks.get(name)
        return (
            entry is not None
            and entry["fingerprint"] == self.chunk_fingerprint(items)
            and entry["failed"] == 0
            and entry["retry"] == 0
            and (entry["file"] is None or (self.dir / entry["file"]).exists())
        )

    def write_chunk(
        self,
        name: str,
        items: list[Item],
        rows: list[dict[str, Any]],
        counters: dict[str, Any],
        retry: int,
        spend: dict[str, int],
    ) -> None:
        """The chunk's rows (file first, then its manifest row, with the spend so far); a chunk with no
        records has no file. `retry`: its items rejected for invalid replies (a re-run asks again)."""
        file = f"part-{self.tag}-{name}.parquet" if rows else None
        if file:
            write_rows(rows, self.dir / file)
        entry = {
            "fingerprint": self.chunk_fingerprint(items),
            "file": file,
            "records": len(rows),
            "failed": sum(counters.get("failed", {}).values()),
            "retry": retry,
            "counters": counters,
        }
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO chunks (name, fingerprint, file, records, failed, retry, counters) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, entry["fingerprint"], file, len(rows), entry["failed"], retry, json.dumps(counters)),
            )
            self._add_spend(spend)
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('complete', 'false')")
            self.chunks[name] = entry

    def record_spend(self, spend: dict[str, int]) -> None:
        """Add what this process spent since it last recorded (`spend`: its totals so far)."""
        with self._lock, self._db:
            self._add_spend(spend)

    def _add_spend(self, spend: dict[str, int]) -> None:  # inside a transaction
        delta = [spend.get(k, 0) - self._recorded[k] for k in SPEND_KEYS]
        self._db.execute(
            "UPDATE spend SET requests = requests + ?, prompt_tokens = prompt_tokens + ?, "
            "completion_tokens = completion_tokens + ?",
            delta,
        )
        self._recorded = {k: spend.get(k, 0) for k in SPEND_KEYS}

    def spent(self) -> dict[str, int]:
        """What every run of this shard has recorded spending."""
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(SPEND_KEYS)} FROM spend").fetchone()
        return dict(zip(SPEND_KEYS, row, strict=True))

    def finish(self, chunk_names: list[str]) -> bool:
        """Mark the shard complete when every chunk is done without failures; drop stale chunk entries."""
        stale = set(self.chunks) - set(chunk_names)
        complete = all(name in self.chunks and self.chunks[name]["failed"] == 0 for name in chunk_names)
        with self._lock, self._db:
            self._db.executemany("DELETE FROM chunks WHERE name = ?", [(n,) for n in stale])
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('complete', ?)", (json.dumps(complete),))
            for name in stale:
                del self.chunks[name]
        return complete

    def close(self) -> None:
        with self._lock:
            self._db.close()


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, file TEXT, records INTEGER NOT NULL,
    failed INTEGER NOT NULL, retry INTEGER NOT NULL, counters TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS spend (requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL);
INSERT INTO spend SELECT 0, 0, 0 WHERE NOT EXISTS (SELECT 1 FROM spend);
"""


def _read_chunks(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    rows = db.execute("SELECT name, fingerprint, file, records, failed, retry, counters FROM chunks ORDER BY name")
    return {
        name: {
            "fingerprint": fp,
            "file": file,
            "records": n,
            "failed": failed,
            "retry": retry,
            "counters": json.loads(c),
        }
        for name, fp, file, n, failed, retry, c in rows
    }


def _migrate_json_manifest(out: ShardOutput, path: Path) -> None:
    """Move an earlier version's JSON manifest into the SQLite one (once: the JSON file is removed after)."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    with out._lock, out._db:
        for name, c in old.get("chunks", {}).items():
            counters = c.get("counters", {})
            retry = sum(
                n for reason, n in counters.get("rejected", {}).items() if reason in counters.get("invalid", {})
            )
            out._db.execute(
                "INSERT OR IGNORE INTO chunks (name, fingerprint, file, records, failed, retry, counters) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, c["fingerprint"], c["file"], c["records"], c["failed"], retry, json.dumps(counters)),
            )
        out._db.executemany(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
            [(k, json.dumps(old[k])) for k in ("pipeline", "shard", "config", "complete") if k in old],
        )
    path.unlink()
    log.warning("%s: moved into %s", path, out.path.name)


def chunk_items(items: list[Item], size: int) -> list[tuple[str, list[Item]]]:
    return [(f"{k // size:05d}", items[k : k + size]) for k in range(0, len(items), size)]


# ---- merging ---------------------------------------------------------------------------------------------
def read_manifests(out_dir: str | Path, allow_partial: bool = False) -> list[dict[str, Any]]:
    """The shard manifests of a run directory ({"pipeline", "shard", "config", "complete", "chunks"}, SQLite
    or an earlier version's JSON); refuses incomplete shards unless allow_partial."""
    out_dir = Path(out_dir)
    paths = sorted(out_dir.glob("manifest-*.sqlite"))
    paths += [p for p in sorted(out_dir.glob("manifest-*.json")) if not p.with_suffix(".sqlite").exists()]
    if not paths:
        raise FileNotFoundError(f"{out_dir}: no manifest-*.sqlite (not a data_gen output directory)")
    manifests = []
    for path in paths:
        data = _read_manifest(path)
        if not data.get("complete") and not allow_partial:
            raise ValueError(f"{path}: shard is incomplete (re-run it to finish, or merge with --allow-partial)")
        manifests.append(data)
    return manifests


def _read_manifest(path: Path) -> dict[str, Any]:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    db = connect(path)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunks'").fetchone():
            return {"chunks": {}}  # just created by a run that has not written its tables yet
        data = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        data["chunks"] = _read_chunks(db)
    finally:
        db.close()
    return data


def shard_files(out_dir: str | Path, allow_partial: bool = False) -> list[Path]:
    """The parquet files a run directory's manifests list, in chunk order."""
    return [
        Path(out_dir) / c["file"]
        for m in read_manifests(out_dir, allow_partial)
        for _, c in sorted(m["chunks"].items())
        if c["file"]
    ]


def merge(dirs: list[str | Path], allow_partial: bool = False) -> datasets.Dataset:
    """One dataset from run/shard directories: rows with a repeated id are dropped (first kept), sorted by id."""
    files = [f for d in dirs for f in shard_files(d, allow_partial)]
    features = datasets_features()
    tables = [pq.read_table(f) for f in files]
    table = pa.concat_tables(tables) if tables else features.arrow_schema.empty_table()
    first: dict[str, int] = {}
    for row, rid in enumerate(table.column("id").to_pylist()):
        kept = first.setdefault(rid, row)
        if kept != row and not table.slice(row, 1).equals(table.slice(kept, 1)):
            log.warning("merge: record %s occurs twice with different contents; keeping the first", rid)
    order = sorted(first, key=str)
    table = table.take(pa.array([first[rid] for rid in order], type=pa.int64()))
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def save_dataset(ds: datasets.Dataset, out_dir: str | Path, rows_per_file: int = 2000) -> list[Path]:
    """Write `ds` as `data-<k>-of-<n>.parquet` files (each atomically) for `load_dataset("parquet", ...)`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = ds.with_format("arrow")[:]  # the rows in order (any indices mapping applied)
    n = -(-len(table) // rows_per_file)  # no file at all for an empty dataset (parquet readers reject empty files)
    paths = []
    for k in range(n):
        path = out_dir / f"data-{k:05d}-of-{n:05d}.parquet"
        with replacing(path) as tmp:
            pq.write_table(table.slice(k * rows_per_file, rows_per_file), tmp, row_group_size=ROW_GROUP)
        paths.append(path)
    return paths
