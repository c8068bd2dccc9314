"""Data parallelism over processes: which share of the prompts this process draws.

    torchrun --nproc_per_node 8 --no-python -- bagel-ft eval shapes --ckpt CKPT --out RUN   # one GPU per rank
    bagel-ft eval shapes --ckpt CKPT --out RUN --shard 0/2     # machine A (no process group needed)
    bagel-ft eval shapes --ckpt CKPT --out RUN --shard 1/2     # machine B, same shared RUN folder

Item i of the list a command draws (prompts, in the order it selects them) belongs to shard i mod N. Every
shard writes its own files, each atomically, into the same run folder, so the shards together write exactly
the files of a single-process run, and a killed shard resumes like any run. Under torchrun the ranks meet
at the end (`wait_for_all`, a gloo process group: CPU or GPU alike) so that one of them scores the run.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
WAIT_TIMEOUT = datetime.timedelta(days=7)  # how long finished ranks wait for the slowest at the end


@dataclass(frozen=True)
class Shard:
    index: int = 0  # this process's share
    count: int = 1  # number of shares
    launched: bool = False  # started by torchrun: the ranks can wait for each other

    def select(self, items: list[T]) -> list[T]:
        return list(items)[self.index :: self.count]

    @property
    def is_first(self) -> bool:
        return self.index == 0

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """'I/N' (0 <= I < N) -> Shard(I, N)."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected I/N with integers (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return Shard(index, count)


def current_shard(text: str | None = None) -> Shard:
    """`--shard I/N` if given; else the torchrun rank (RANK / WORLD_SIZE in the environment); else 0/1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if text:
        if world > 1:
            raise ValueError("--shard splits the prompts across separate launches; under torchrun the ranks do it")
        return parse_shard(text)
    if world > 1:
        return Shard(int(os.environ["RANK"]), world, launched=True)
    return Shard()


def wait_for_all(shard: Shard) -> None:
    """Under torchrun: block until every rank gets here (a gloo process group, created and destroyed here).
    Separate `--shard` launches cannot wait for each other: nothing happens."""
    if not shard.launched:
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=WAIT_TIMEOUT)
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
