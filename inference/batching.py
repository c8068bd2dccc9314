"""Inference programs, and running many of them in one packed forward per tick.

Every inference routine (a text turn, a flow integration, a whole PSIR stream) is written once, as a
*program*: a generator that yields the engine ops it needs next (a list of `inference.engine` ops: `Tokens`,
`Velocity`, `CleanImage`, `DecodeLatent`) and receives their results in the same order; its return value
is the routine's result. Only `Engine.execute(ops)` runs the model. So:

  * alone: `run_alone(engine, program)` executes each yielded list as one `engine.execute` call — the CFG
    branches of a flow step, yielded together, are already one packed forward;
  * batched: `run_batched(engine, programs, batch_size)` keeps up to `batch_size` programs in flight and
    executes the ops of all of them in one `engine.execute` call per tick. Programs are ragged: a stream
    that decodes text shares the forward with one in the middle of a flow; a finished program leaves the
    batch and the next waiting one joins. Every program owns its contexts, random generator (seed) and
    state, so its result is the one it gets alone, up to float reassociation in packed matmuls (~1e-6 fp32);
  * inside a program, `yield from gather(*programs)` runs sub-programs side by side.

`@batchable` makes a program function serve both ways: `f(engine, ...)` runs it alone and returns its
result (the synchronous API), `f.steps(engine, ...)` is the program itself (for `yield from` inside another
program, or for `run_batched`). The first argument is the engine, or an object holding it as `.engine`;
on methods of such objects the same holds (`engine.decode_text(...)`, `engine.decode_text.steps(...)`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
Steps = Generator[list, list, T]  # yields a tick's ops, receives their results, returns the program's result


class _Running:
    """A started program: the ops it waits on (`ops`) until it finishes with `value`."""

    def __init__(self, program: Steps):
        self.program, self.value, self.done = program, None, False
        self._advance(program.__next__)

    def _advance(self, step, *args) -> None:
        try:
            self.ops = list(step(*args))
        except StopIteration as stop:
            self.ops, self.value, self.done = [], stop.value, True

    def send(self, results: list) -> None:
        self._advance(self.program.send, results)


def _dispatch(running: list[_Running], results: list) -> None:
    """Hand each program the results of its ops (they were concatenated in this order)."""
    start = 0
    for r in running:
        n = len(r.ops)
        r.send(results[start : start + n])
        start += n


def run_alone(engine: Any, program: Steps[T]) -> T:
    """Run one program to its end, one `engine.execute` per yielded list of ops."""
    r = _Running(program)
    while not r.done:
        _dispatch([r], engine.execute(r.ops))
    return r.value


def gather(*programs: Steps) -> Steps[list]:
    """Inside a program: run `programs` side by side (their ops share ticks) -> their results, in order."""
    running = [_Running(p) for p in programs]
    while not all(r.done for r in running):
        active = [r for r in running if not r.done]
        _dispatch(active, (yield [op for r in active for op in r.ops]))
    return [r.value for r in running]


@dataclass
class Finished:
    index: int  # position of the program in the input
    value: Any  # its return value
    wall_s: float  # its share of the wall time: every tick's time split evenly among the programs in it


def run_batched(engine: Any, programs: Iterable[Steps], batch_size: int) -> Iterator[Finished]:
    """Run `programs` with up to `batch_size` in flight, all their ops in one `engine.execute` per tick;
    yields each program's `Finished` as soon as it ends (completion order). `programs` is read lazily: a
    program is started when it joins the batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    source = enumerate(programs)
    active: list[tuple[int, _Running, list[float]]] = []  # (index, program, [wall share so far])
    exhausted = False
    while True:
        start = time.perf_counter()
        finished = []
        while not exhausted and len(active) < batch_size:
            item = next(source, None)
            if item is None:
                exhausted = True
                continue
            entry = (item[0], _Running(item[1]), [0.0])
            (finished if entry[1].done else active).append(entry)  # a program may end before its first op
        if active:
            _dispatch([a[1] for a in active], engine.execute([op for a in active for op in a[1].ops]))
            share = (time.perf_counter() - start) / len(active)
            for a in active:
                a[2][0] += share
        finished += [a for a in active if a[1].done]
        active = [a for a in active if not a[1].done]
        for index, r, wall in finished:
            yield Finished(index, r.value, wall[0])
        if exhausted and not active:
            return


class batchable:
    """Decorator for a program function (module docstring): calling it runs the program alone; `.steps` is
    the program. `f(owner, *args)` == `run_alone(engine of owner, f.steps(owner, *args))`."""

    def __init__(self, fn):
        functools.update_wrapper(self, fn)
        self.steps = fn

    def __call__(self, owner, *args, **kwargs):
        return run_alone(getattr(owner, "engine", owner), self.steps(owner, *args, **kwargs))

    def __get__(self, owner, owner_type=None):
        return self if owner is None else _Bound(self, owner)


class _Bound:
    """A `batchable` method bound to its owner: `obj.f(...)` runs alone, `obj.f.steps(...)` is the program."""

    def __init__(self, fn: batchable, owner: Any):
        self._fn, self._owner = fn, owner
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    def __call__(self, *args, **kwargs):
        return self._fn(self._owner, *args, **kwargs)

    def steps(self, *args, **kwargs) -> Steps:
        return self._fn.steps(self._owner, *args, **kwargs)
