"""Run one pipeline over one shard of prompts: the shared loop of all three pipelines.

    prompts -> select (first --num distinct, shard I/N) -> chunks -> a sliding window of items in flight
            -> build(item) -> records | Rejected(reason) | CallFailed(reason) -> chunk file + manifest row

A pipeline is a `build(item, ctx) -> list[Trajectory]` coroutine. Every record is validated before it
is written. An item ends as records, a counted rejection, or a counted failure; only `FatalError` (bad
credentials, a used-up quota, a backend that cannot run) stops the run with an error.

The window: items start in prompt order whenever fewer than `2 x endpoint.concurrency` are working; an
item sleeping before a retry does not count (the endpoint client's `backoff_hook`), so a prompt waiting
on a 429's Retry-After never holds back the others, and the client always has requests to send. A chunk
is written (file, then manifest row) as soon as its last item ends, whatever the order items end in; at
most `OPEN_CHUNKS_PER_WINDOW x` the window's worth of finished rows wait for a slow chunk (memory bound).

Stopping cleanly — Ctrl-C (SIGINT), SIGTERM, or a budget (budget.py): no new item starts, the client sends
nothing more, requests already sent finish and are cached (none is lost and paid twice); items end
(`Stopped`), chunks whose items all ended are written, the spend is recorded and the summary printed.
`RunResult.stopped` says why (the CLI exits 130 / 143 / 4). A re-run resumes: finished chunks are
skipped, cached replies reused. A second Ctrl-C quits at once (the cache and finished chunks are safe).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bagel_ft.trajectory import Trajectory
from common.call_cache import CallCache
from common.endpoint import InvalidAfterRepair, Stopped, backoff_hook
from data_gen.backends import Backends, make_backends
from data_gen.budget import Budget
from data_gen.config import DataConfig, save_config
from data_gen.errors import CallFailed, FatalError, Rejected
from data_gen.shards import Item, ShardOutput, chunk_items, select_items
from data_gen.summary import Progress, Summary, report, scoped

log = logging.getLogger(__name__)
OPEN_CHUNKS_PER_WINDOW = 8  # finished-but-unwritten rows are bounded by this many windows' worth of prompts
SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


@dataclass
class Context:
    """What a pipeline's `build` may use."""

    cfg: DataConfig
    backends: Backends
    source: str  # record_id source: the config fingerprint, so other settings make other records
    summary: Summary

    def reject(self, reason: str) -> None:
        """Count one dropped record of an item that still yields others (e.g. one alignment negative)."""
        self.summary.count("rejected", reason)


Build = Callable[[Item, Context], Awaitable[list[Trajectory]]]


@dataclass
class RunResult:
    complete: bool  # every chunk of the shard finished without failures
    total: Summary  # over every finished chunk of this shard (this and earlier runs)
    this_run: Summary  # what this invocation did (requests, retries, tokens spent)
    cache: dict = field(default_factory=dict)
    stopped: str = ""  # why the run stopped early: "interrupted" (SIGINT), "terminated" (SIGTERM), "budget: ..."
    spent: dict = field(default_factory=dict)  # every run of the shard: requests, prompt/completion tokens
    in_flight: dict = field(default_factory=dict)  # requests in flight (with an endpoint): see `_report`


# ---- prompts ---------------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (.txt), or JSON lines with a "prompt" or "text" field (.jsonl)."""
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in lines]
        return [r.get("prompt", r.get("text", "")) for r in rows]
    return lines


def shapes_prompts(num: int, seed: int, categories: list[str] | None) -> list[str]:
    """`num` distinct prompts from the shapes grammar (deterministic; prompt i never depends on num)."""
    from scene_graphs.shapes import CATEGORIES, generate_prompts

    cats = tuple(categories or CATEGORIES)
    m = num
    while True:
        texts = list(dict.fromkeys(p.text for p in generate_prompts(m, seed, cats)))
        if len(texts) >= num or m >= 20 * num:
            return texts[:num]
        m *= 2


# ---- the loop -----------------------------------------------------------------------------------------------
@dataclass
class OpenChunk:
    """A chunk whose items are under way; written when `left` reaches 0, unless an item was stopped."""

    name: str
    items: list[Item]
    rows: list[list[dict[str, Any]]]  # per item, its records as parquet rows
    left: int
    counters: Summary = field(default_factory=Summary)
    retry: int = 0  # items rejected for replies invalid after repair: a re-run asks again
    stopped: bool = False


class ShardRun:
    """One invocation over one shard (see the module doc)."""

    def __init__(self, name: str, build: Build, cfg: DataConfig, out: ShardOutput, backends: Backends, budget: Budget):
        self.name, self.build, self.cfg, self.out, self.backends, self.budget = name, build, cfg, out, backends, budget
        self.summary = budget.this_run
        self.ctx = Context(cfg, backends, cfg.fingerprint(), self.summary)
        self.window = max(4, 2 * cfg.endpoint.concurrency)  # items working (not sleeping before a retry)
        self.active = 0
        self.open_chunks = 0
        self.max_open_chunks = 1 + OPEN_CHUNKS_PER_WINDOW * -(-self.window // cfg.pipeline.chunk_size)
        self.stopped = ""
        self.fatal: BaseException | None = None
        self._changed = asyncio.Event()  # an item ended or paused, a chunk was written, a stop
        self._tasks: set[asyncio.Task] = set()
        self.progress: Progress | None = None
        self.in_flight_to_last_start: float | None = None  # mean requests in flight until the last item started

    # ---- admission -------------------------------------------------------------------------------------
    async def _until(self, ready: Callable[[], bool]) -> bool:
        """Wait until `ready()` or a stop; False on a stop."""
        while not self.stopped and not ready():
            self._changed.clear()
            await self._changed.wait()
        return not self.stopped

    def _left(self) -> None:
        self.active -= 1
        self._changed.set()

    @asynccontextmanager
    async def _sleeping(self):
        """An item sleeping before a retry leaves the window meanwhile (the endpoint's backoff_hook)."""
        self._left()
        try:
            yield
        finally:
            self.active += 1

    def stop(self, reason: str) -> None:
        if not self.stopped:
            self.stopped = reason
            if self.backends.client is not None:
                self.backends.client.stop(reason)
            self._changed.set()

    # ---- the run ---------------------------------------------------------------------------------------
    async def run(self, todo: list[tuple[str, list[Item]]]) -> None:
        hook = backoff_hook.set(self._sleeping)
        try:
            for name, items in todo:
                if not await self._until(lambda: self.open_chunks < self.max_open_chunks):
                    break
                chunk = OpenChunk(name, items, [[] for _ in items], len(items))
                self.open_chunks += 1
                for k, item in enumerate(items):
                    if not await self._until(lambda: self.active < self.window):
                        chunk.stopped = True
                        break
                    self.active += 1
                    with scoped(chunk.counters):  # the item's task inherits the scope
                        task = asyncio.create_task(self._item(chunk, k, item))
                    self._tasks.add(task)
                    task.add_done_callback(self._task_done)
                if self.stopped:
                    break
            if self.backends.client is not None:  # the queue is empty: from here on the run drains
                self.in_flight_to_last_start = self.backends.client.limit.means()[0]
            while self._tasks:  # the items under way end (quickly after a stop)
                await asyncio.wait(set(self._tasks))
        except BaseException:  # a second Ctrl-C (KeyboardInterrupt) or a cancelled run: drop the items
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            raise
        finally:
            backoff_hook.reset(hook)
        if self.fatal is not None:
            raise self.fatal

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.fatal is None:
            self.fatal = task.exception()  # writing a chunk failed (a full disk, ...): stop, and raise it
            self.stop("error")

    async def _item(self, chunk: OpenChunk, k: int, item: Item) -> None:
        rows, ended = None, True  # ended: as records, a rejection or a failure (not stopped midway)
        try:
            records = await self.build(item, self.ctx)
            for r in records:
                r.validate()
            rows = [r.to_row() for r in records]
            self.summary.count("kept", n=len(rows))
        except Stopped as e:
            chunk.stopped, ended = True, False
            self.stop(e.reason)
        except InvalidAfterRepair as e:  # rejected in this run; a re-run asks again
            self.summary.count("rejected", e.reason)
            chunk.retry += 1
        except Rejected as e:
            self.summary.count("rejected", e.reason)
        except CallFailed as e:
            self.summary.count("failed", e.reason)
        except FatalError as e:
            chunk.stopped, ended = True, False
            if self.fatal is None:
                self.fatal = e
            self.stop("fatal")
        except Exception as e:  # a bug (a FormatError included): count it, log it, keep the other items going
            log.exception("item %r failed", item.prompt[:80])
            self.summary.count("failed", f"error_{type(e).__name__}")
        finally:
            self._left()
        if not ended:
            return
        self.summary.count("items")
        chunk.rows[k] = rows or []
        chunk.left -= 1
        if self.progress is not None:
            self.progress.update(1)
        if chunk.left == 0 and not chunk.stopped:
            rows_in_order = [r for item_rows in chunk.rows for r in item_rows]
            await asyncio.to_thread(
                self.out.write_chunk,
                chunk.name,
                chunk.items,
                rows_in_order,
                chunk.counters.to_dict(),
                chunk.retry,
                self.budget.this_run_spend(),
            )
            self.open_chunks -= 1
            self._changed.set()

    # ---- what a progress line says ---------------------------------------------------------------------
    def status(self) -> str:
        s, parts = self.summary, []
        client = self.backends.client
        if client is not None:
            parts.append(
                f"requests {s.total('requests')} (in flight {client.limit.in_flight}/{client.limit.allowed})"
                f", retries {s.total('retries')}, tokens {_count(s.total('tokens'))}"
            )
            cost = self.budget.cost()
            if cost is not None:
                parts.append(f"est. ${cost:.2f}")
        parts.append(s.line())
        return ", ".join(parts)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e4 else str(n)


async def run_pipeline(
    name: str,
    build: Build,
    cfg: DataConfig,
    prompts: list[str],
    out_dir: str | Path,
    *,
    num: int | None = None,
    shard: tuple[int, int] = (0, 1),
    seed: int = 0,
    with_sampler: bool = False,
) -> RunResult:
    out_dir = Path(out_dir)
    out = ShardOutput(out_dir, shard, name, cfg.fingerprint())
    save_config(cfg, out_dir / "config.yaml")
    cache = CallCache(cfg.cache_dir or out_dir / "cache")
    try:
        budget = Budget(cfg.run, cfg.endpoint.model, out.spent(), Summary())
        items = select_items(prompts, num, shard, seed)
        chunks = chunk_items(items, cfg.pipeline.chunk_size)
        todo = [(c, its) for c, its in chunks if not out.is_done(c, its)]
        backends = make_backends(cfg, cache, budget.this_run, with_sampler=with_sampler, budget=budget.exceeded)
        run = ShardRun(name, build, cfg, out, backends, budget)
        done = len(items) - sum(len(its) for _, its in todo)
        run.progress = Progress(len(items), done, f"{name} {shard[0]}/{shard[1]}", cfg.run.progress_every_s, run.status)
        lines = asyncio.create_task(run.progress.log_lines())
        handled = _handle_signals(run)
        try:
            await run.run(todo)
        finally:
            _restore_signals(handled)
            lines.cancel()
            run.progress.close()
            await backends.close()
            out.record_spend(budget.this_run_spend())
        complete = out.finish([c for c, _ in chunks])
        return _report(run, complete, cache, shard, out_dir)
    finally:
        cache.close()
        out.close()


def _report(run: ShardRun, complete: bool, cache: CallCache, shard: tuple[int, int], out_dir: Path) -> RunResult:
    """The run's result; its summary printed and written to `summary-<I>of<N>.json`."""
    out, budget, client = run.out, run.budget, run.backends.client
    total = Summary()
    for entry in out.chunks.values():
        total.add(entry["counters"])
    result = RunResult(complete, total, budget.this_run, cache.stats(), run.stopped, out.spent())
    if client is not None:  # means over the run, and until the last prompt started (then the run drains)
        in_flight, allowed = client.limit.means()
        to_last_start = run.in_flight_to_last_start if run.in_flight_to_last_start is not None else in_flight
        result.in_flight = {"mean": round(in_flight, 2), "mean_to_last_start": round(to_last_start, 2)}
        result.in_flight |= {"mean_allowed": round(allowed, 2), "lowest_allowed": client.limit.lowest}
    extra: dict[str, Any] = {"pipeline": run.name, "shard": list(shard), "complete": complete, "stopped": run.stopped}
    extra |= {"backends": run.backends.names(), "spent": result.spent, "cost_usd": budget.cost(result.spent)}
    if result.in_flight:
        extra["requests_in_flight"] = result.in_flight
    print(report(out_dir / f"summary-{out.tag}.json", total, budget.this_run, result.cache, extra), flush=True)
    return result


def _handle_signals(run: ShardRun) -> list[signal.Signals]:
    """SIGINT / SIGTERM stop the run cleanly, once; the second acts as usual (quits at once)."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        loop.remove_signal_handler(sig)
        print(
            f"\n{run.name}: {SIGNALS[sig]}: finishing the requests in flight, then stopping "
            "(again to quit at once; a re-run resumes either way)",
            file=sys.stderr,
            flush=True,
        )
        run.stop(SIGNALS[sig])

    handled = []
    for sig in SIGNALS:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no such signal support
            pass
    return handled


def _restore_signals(handled: list[signal.Signals]) -> None:
    loop = asyncio.get_running_loop()
    for sig in handled:
        loop.remove_signal_handler(sig)
