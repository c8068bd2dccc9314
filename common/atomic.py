"""Atomic writes, the one implementation: a file (or folder) is absent, its old content, or all of the new one.

Everything is written to a temporary sibling (`.tmp-*`) and moved into place with `os.replace` / `os.rename`,
so a SIGKILL leaves at most `.tmp-*` debris (`clean_tmp` removes it), never a half-written final name. Used by
eval's run folders, data_gen's shards, the checkpoint exports and the tokenizer cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write (a file); it replaces `path` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Indented JSON, keys in the given order (it is the display order)."""
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


@contextmanager
def replacing_directory(path: str | Path) -> Iterator[Path]:
    """A temporary sibling directory to fill; on success it replaces `path` (renames, so a crash at any point
    leaves either the previous directory or the new one, never a mix); on error it is removed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a directory")
    tmp = make_tmp_dir(path.parent, path.name)
    try:
        yield tmp
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous directory (if any) is untouched
        raise
    move_into_place(tmp, path)


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished directory `tmp` to `path`, replacing a previous `path` (moved aside first, then
    removed: a crash leaves the old or the new directory under `path`, and `.tmp-*` debris)."""
    if path.exists():
        old = path.parent / f"{TMP_PREFIX}old-{path.name}-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_tmp_dir(parent: str | Path, name: str) -> Path:
    """A fresh private directory beside the final `parent/name`, to be renamed into place when complete."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=parent))


def clean_tmp(parent: str | Path) -> int:
    """Remove the `.tmp-*` debris a killed run left in `parent`; returns how many entries were removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return 0
    removed = 0
    for p in parent.iterdir():
        if p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            removed += 1
    return removed
