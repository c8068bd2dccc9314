"""Run counters: records kept, items rejected / failed by reason, replies found invalid, retries, HTTP
requests sent, cache hits and tokens used. Printed at the end of a run and written as `summary.json`.

Vocabulary (the same in code, logs and the JSON):
  kept       records written.
  rejected   an item (or one record of it) dropped on purpose: a malformed or invalid reply that repair
             could not fix, a plan too short, a judge verdict that disagrees, ... (reason -> count).
  failed     an item not done because of transient errors that outlived the retries, or a bug; a re-run
             retries it (reason -> count).
  invalid    every reply that did not parse or validate, repaired later or not, and every sampled stream
             that broke the PSIR format (reason -> count).
  retries    re-sends after 429 / 5xx / timeouts / connection errors / cut-off bodies (reason -> count).
  requests   HTTP requests sent per endpoint (first tries + retries); cache hits send none.
  tokens     prompt / completion tokens of every reply from the server (repairs, unusable replies too).
Token usage is run statistics only: records carry none, so a record is the same bytes however many
retries or repairs it took.

`Progress` shows a run going: a tqdm bar on a terminal, otherwise (nohup, a cluster job's log) one line on
stderr every `run.progress_every_s` seconds: prompts done / total, rate, ETA, then the runner's status
(requests, in flight, retries, tokens, estimated cost).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

COUNTERS = ("rejected", "failed", "invalid", "retries", "requests", "tokens")


@dataclass
class Summary:
    kept: int = 0
    items: int = 0  # prompts processed (done, rejected or failed)
    rejected: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    invalid: Counter = field(default_factory=Counter)
    retries: Counter = field(default_factory=Counter)
    requests: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)  # prompt / completion, from the API's usage
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, counter: str, key: str = "", n: int = 1) -> None:
        """Add `n` to `counter[key]` (or to `kept` / `items`), here and in every summary scoped around the caller."""
        for summary in (self, *_SCOPES.get()):
            with summary._lock:
                if counter in ("kept", "items"):
                    setattr(summary, counter, getattr(summary, counter) + n)
                else:
                    getattr(summary, counter)[key] += n

    def add(self, other: Summary | dict[str, Any]) -> None:
        d = other.to_dict() if isinstance(other, Summary) else other
        with self._lock:
            self.kept += d.get("kept", 0)
            self.items += d.get("items", 0)
            for name in COUNTERS:
                getattr(self, name).update(d.get(name, {}))

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            d: dict[str, Any] = {"kept": self.kept, "items": self.items}
            d.update({name: dict(sorted(getattr(self, name).items())) for name in COUNTERS})
        return d

    def total(self, counter: str, key: str | None = None) -> int:
        """`counter[key]`, or the sum over its keys (`kept` / `items`: the number)."""
        with self._lock:
            if counter in ("kept", "items"):
                return getattr(self, counter)
            values = getattr(self, counter)
            return values[key] if key is not None else sum(values.values())

    def line(self) -> str:
        return f"kept={self.kept} rejected={self.total('rejected')} failed={self.total('failed')}"


# Summaries that also receive every count made by the current task (a chunk's own counters, kept in its
# manifest entry).
_SCOPES: ContextVar[tuple[Summary, ...]] = ContextVar("summary_scopes", default=())


@contextmanager
def scoped(summary: Summary) -> Iterator[Summary]:
    """Within this block (and tasks created in it), counts also go to `summary`."""
    token = _SCOPES.set((*_SCOPES.get(), summary))
    try:
        yield summary
    finally:
        _SCOPES.reset(token)


def report(path: Path, total: Summary, this_run: Summary, cache_stats: dict, extra: dict[str, Any]) -> str:
    """Write `summary.json` (totals over all finished chunks + this invocation's calls) and return the text."""
    data = {**extra, "total": total.to_dict(), "this_run": this_run.to_dict(), "cache": cache_stats}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    t, r = total.to_dict(), this_run.to_dict()
    cache = {name: f"{v['hits']} hits/{v['misses']} misses" for name, v in cache_stats.items()}
    lines = [
        f"{extra.get('pipeline', 'data')}: {t['kept']} records kept from {t['items']} prompts",
        f"  rejected: {_fmt(t['rejected'])}",
        f"  failed:   {_fmt(t['failed'])}",
        f"  invalid replies: {_fmt(t['invalid'])}",
        f"  this run: requests {_fmt(r['requests'])}, retries {_fmt(r['retries'])}, tokens {_fmt(r['tokens'])}",
    ]
    if "requests_in_flight" in extra:
        f = extra["requests_in_flight"]
        lines.append(
            f"  requests in flight: {f['mean']} on average ({f['mean_to_last_start']} until the last prompt "
            f"started) of {f['mean_allowed']} allowed (lowest limit {f['lowest_allowed']})"
        )
    if "spent" in extra:
        cost = extra.get("cost_usd")
        lines.append(
            f"  all runs of this shard: {_fmt(extra['spent'])}" + (f", est. ${cost:.4f}" if cost is not None else "")
        )
    lines.append(f"  cache: {_fmt(cache)}")
    if extra.get("stopped"):
        lines.append(f"  stopped: {extra['stopped']} (re-run the same command to resume)")
    lines.append(f"  -> {path}")
    return "\n".join(lines)


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "none"


class Progress:
    """Prompts done of `total` (see the module doc); `status()` adds the runner's counters to a line."""

    def __init__(self, total: int, done: int, desc: str, every_s: float, status: Callable[[], str]):
        self.total, self.done, self.desc, self.every_s, self.status = total, done, desc, every_s, status
        self._start_done, self._start = done, time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=done, desc=desc, unit="prompt", dynamic_ncols=True, mininterval=1.0)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(self.status(), refresh=False)

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 else ("0s" if left == 0 else "?")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.desc}: {self.done}/{self.total} prompts ({pct:.1f}%), {rate:.2f}/s, ETA {eta} | {self.status()}"

    async def log_lines(self) -> None:
        """Without a terminal: a line every `every_s` seconds (run as a task; cancel it at the end)."""
        if self.bar is not None:
            return
        while True:
            await asyncio.sleep(self.every_s)
            print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(self.line(), file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
