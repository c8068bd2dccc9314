"""Content-addressed cache of model calls, remote (chat API, `common.endpoint`) or local (data_gen's
shapes world, editors, samplers). Users: data_gen (every call), eval.wise (judge replies).

Key: sha256 of the canonical JSON of the request (endpoint, model, messages with every image replaced by
the sha256 of its bytes, schema, seed, temperature, ...). Value: JSON text (images inside as base64 PNG text,
`image_text` / `text_image`).

Store: one SQLite file per cache directory, `ROOT/calls.sqlite`, in WAL mode (`connect`). Every `put` is one
committed transaction, so a value is complete or absent even after SIGKILL, and a re-run after a crash
repeats no call whose reply had arrived; millions of entries are one file, appended to. Threads and
processes of one machine may share a directory (SQLite's locks; a writer waits up to a minute for
another); machines should not share one over a network filesystem (WAL needs one host): give each machine
its own, as data_gen's default (OUT/cache) does. `delete` drops values a caller found unusable (a reply that
stayed invalid after repair: a re-run asks again).

Migration: earlier versions wrote one file per call (`ROOT/ab/<key>.json`). Opening such a directory moves
those values into the store once, in batches, each file removed after its batch is committed (an
interrupted migration continues at the next open; a value already in the store is kept).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from common.images import image_to_png, png_to_image

log = logging.getLogger(__name__)
_DATA_URL = re.compile(r"^data:image/[a-z]+;base64,(.*)$", re.S)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def request_key(request: dict[str, Any]) -> str:
    """The cache key of a request; inline images (data URLs, raw bytes) count by the hash of their bytes."""
    return sha256_hex(canonical_json(_hash_images(request)).encode())


def _hash_images(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _hash_images(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_hash_images(v) for v in obj]
    if isinstance(obj, bytes):
        return "sha256:" + sha256_hex(obj)
    if isinstance(obj, str) and obj.startswith("data:image/"):
        m = _DATA_URL.match(obj)
        if m:
            return "sha256:" + sha256_hex(base64.b64decode(m.group(1)))
    return obj


def png_text(png: bytes) -> str:
    """PNG bytes as text for a JSON cache value (base64)."""
    return base64.b64encode(png).decode()


def image_text(image: Image.Image) -> str:
    return png_text(image_to_png(image))


def text_image(text: str) -> Image.Image:
    return png_to_image(base64.b64decode(text))


class CallCache:
    """The store of one cache directory: JSON values by request key; thread-safe counters of hits and
    misses per endpoint."""

    FILE = "calls.sqlite"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / self.FILE
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self._lock = threading.Lock()  # one connection, shared by this process's threads
        self._db = connect(self.path)
        with self._lock, self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        migrate_files(self)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM calls WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: Any) -> None:
        self.put_many([(key, canonical_json(value))])

    def put_many(self, items: list[tuple[str, str]], *, replace: bool = True) -> None:
        """(key, JSON text) pairs in one transaction; `replace=False` keeps values already stored."""
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with self._lock, self._db:
            self._db.executemany(f"{verb} INTO calls (key, value) VALUES (?, ?)", items)

    def delete(self, keys: list[str]) -> None:
        with self._lock, self._db:
            self._db.executemany("DELETE FROM calls WHERE key = ?", [(k,) for k in keys])

    def key(self, endpoint: str, request: dict[str, Any]) -> str:
        return request_key({"endpoint": endpoint, **request})

    def count(self, endpoint: str, hit: bool) -> None:
        with self._lock:
            (self.hits if hit else self.misses)[endpoint] += 1

    def lookup(self, endpoint: str, request: dict[str, Any]) -> tuple[str, Any | None]:
        """(key, cached value or None), counting the hit or miss for `endpoint`."""
        key = self.key(endpoint, request)
        value = self.get(key)
        self.count(endpoint, value is not None)
        return key, value

    def memo(self, endpoint: str, request: dict[str, Any], compute: Callable[[], Any]) -> Any:
        """The cached value of a local (synchronous) call, computing and storing it on a miss."""
        key, value = self.lookup(endpoint, request)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            names = sorted(set(self.hits) | set(self.misses))
            return {n: {"hits": self.hits[n], "misses": self.misses[n]} for n in names}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def connect(path: Path) -> sqlite3.Connection:
    """A connection to the SQLite file `path` (created if absent) for one process's threads, which must
    serialise on a lock of their own: WAL journal (readers never wait; a commit is one append, no fsync:
    durable against a killed process, and an OS crash loses at most the last commits, never the file),
    a 60 s wait for another process's write lock. `with conn:` commits a transaction."""
    conn = sqlite3.connect(path, timeout=60.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


# ---- one-shot migration of the per-file layout ----------------------------------------------------------
MIGRATE_BATCH = 20_000  # files per transaction


def migrate_files(cache: CallCache) -> int:
    """Move `ROOT/ab/<key>.json` values into the store (see the module doc); the number moved."""
    dirs = sorted(d for d in cache.root.iterdir() if d.is_dir() and _LEGACY_DIR.fullmatch(d.name))
    moved = 0
    for d in dirs:
        batch, done = [], []
        for path in d.iterdir():
            if path.name.startswith("."):  # a temporary file of a killed writer
                done.append(path)
                continue
            try:
                text = path.read_text()
                json.loads(text)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                log.warning("%s: unreadable cached value, dropped", path)
                done.append(path)
                continue
            batch.append((path.stem, text))
            done.append(path)
            if len(batch) >= MIGRATE_BATCH:
                moved += _commit_batch(cache, batch, done)
                batch, done = [], []
        moved += _commit_batch(cache, batch, done)
        try:
            d.rmdir()
        except OSError:  # a file appeared meanwhile (an older version still running): next open takes it
            pass
    if moved:
        log.warning("%s: moved %d cached values from one file each into %s", cache.root, moved, cache.path.name)
    return moved


def _commit_batch(cache: CallCache, batch: list[tuple[str, str]], done: list[Path]) -> int:
    cache.put_many(batch, replace=False)
    for path in done:  # only after the commit: a kill in between leaves files to move again, nothing lost
        path.unlink(missing_ok=True)
    return len(batch)


_LEGACY_DIR = re.compile(r"[0-9a-f]{2}")
