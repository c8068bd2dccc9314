"""Trajectory tables -> packed batches, one deterministic stream per (rank, micro-batch), resumable.

A table is a directory of parquet shards written from `bagel_ft.trajectory.datasets_features()` rows (or a
`datasets.save_to_disk` directory); rows become `Trajectory.from_row(normalize_row(row))`.

Streams. A step consumes `grad_accum` packs on each of `world_size` ranks; pack slot (rank r, micro m) is read
from logical stream `s = r * grad_accum + m` of `S = world_size * grad_accum`. Stream s sees every S-th record
of each source's epoch order, mixes sources by weight with its own RNG, and packs with its own generator
(CFG dropout, timesteps, flow noise). So the global batch of a step depends only on (seed, S, step): one
process accumulating 2 packs trains on exactly what 2 processes with one pack each train on.

Epoch order of a source: parquet row groups shuffled, then rows within each group shuffled (seeded by
(seed, source, epoch)), so reads stay local to a row group.

Resume: `DataStream.state_dict()` is the position (epoch and cursor per source), the RNG states and the
references (source, row) of the samples waiting in the packer (buffer + carry); loading rebuilds those
plans from their records, so a resumed stream yields exactly the packs the uninterrupted one would have.
"""

from __future__ import annotations

import copy
import queue
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bagel_ft.batch import PackedBatch
from bagel_ft.tokenizer import SpecialTokens
from bagel_ft.trajectory import FormatError, Trajectory, normalize_row
from training.packing import CFGDropout, Packer, PackerStats, PackingGeometry, pack_samples
from training.sequence import PlanGeometry, SamplePlan, build_sample_plan


class DataError(ValueError):
    """A data source cannot be read or is empty; the message names the path."""


# ---- one table --------------------------------------------------------------------------------------


class RecordTable:
    """Random access to the records of one source (parquet row groups cached, LRU)."""

    def __init__(self, path: str | Path, subsets: list[str] | tuple[str, ...] = (), cache_groups: int = 4):
        self.path = Path(path)
        self._cache: OrderedDict[int, list[dict]] = OrderedDict()
        self._cache_groups = cache_groups
        self._hf = None
        if (self.path / "state.json").is_file():  # datasets.save_to_disk
            import datasets

            self._hf = datasets.load_from_disk(str(self.path))
            subset_col = self._hf["subset"]
            self._groups = [(None, i, min(1000, len(subset_col) - i)) for i in range(0, len(subset_col), 1000)]
        else:
            import pyarrow.parquet as pq

            files = [self.path] if self.path.is_file() else sorted(self.path.rglob("*.parquet"))
            if not files:
                raise DataError(f"{self.path}: no parquet files (expected a trajectory table, docs/format.md)")
            self._files = [pq.ParquetFile(f) for f in files]
            self._groups, subset_col = [], []
            for fi, pf in enumerate(self._files):
                for rg in range(pf.num_row_groups):
                    col = pf.read_row_group(rg, columns=["subset"]).column(0).to_pylist()
                    self._groups.append((fi, rg, len(col)))
                    subset_col += col
        keep = set(subsets)
        self.rows: list[tuple[int, int]] = []  # (group, offset in group) of every kept row
        i = 0
        for g, (_, _, n) in enumerate(self._groups):
            for off in range(n):
                if not keep or subset_col[i] in keep:
                    self.rows.append((g, off))
                i += 1
        if not self.rows:
            raise DataError(f"{self.path}: no records" + (f" of subsets {sorted(keep)}" if keep else ""))

    def __len__(self) -> int:
        return len(self.rows)

    def group_of(self, i: int) -> int:
        return self.rows[i][0]

    def _group(self, g: int) -> list[dict]:
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        fi, rg, n = self._groups[g]
        if self._hf is not None:
            rows = [self._hf[rg + k] for k in range(n)]
        else:
            rows = self._files[fi].read_row_group(rg).to_pylist()
        self._cache[g] = rows
        if len(self._cache) > self._cache_groups:
            self._cache.popitem(last=False)
        return rows

    def get(self, i: int) -> Trajectory:
        g, off = self.rows[i]
        return Trajectory.from_row(normalize_row(dict(self._group(g)[off])))


def epoch_order(table: RecordTable, seed: int, source: int, epoch: int) -> np.ndarray:
    """Row indices of one epoch: row groups shuffled, rows shuffled within each group."""
    rng = np.random.default_rng([seed, source, epoch])
    groups: dict[int, list[int]] = {}
    for i in range(len(table)):
        groups.setdefault(table.group_of(i), []).append(i)
    order = []
    for g in rng.permutation(sorted(groups)):
        order += list(rng.permutation(groups[int(g)]))
    return np.asarray(order, dtype=np.int64)


# ---- one stream -------------------------------------------------------------------------------------


@dataclass
class StreamSpec:
    """Everything a stream needs besides the tables (built once by the trainer)."""

    encode: Any  # text -> ids
    special: SpecialTokens
    images: PlanGeometry  # resize bounds + strides
    packing: PackingGeometry
    dropout: CFGDropout
    loss_roles: dict[str, dict[str, bool]]
    special_token_loss: bool
    expected_num_tokens: int
    max_num_tokens: int
    max_num_tokens_per_sample: int
    prefer_buffer_before: int
    max_buffer_size: int


@dataclass
class Pack:
    """One packed sequence and what it holds."""

    batch: PackedBatch
    record_ids: list[str]
    stats: PackerStats  # cumulative for the stream, after this pack
    seed: int  # drawn from the stream: seeds the VAE posterior sample of this pack


class DataStream:
    """Endless packs for logical stream `stream` of `num_streams` (module doc)."""

    def __init__(
        self,
        tables: list[RecordTable],
        weights: list[float],
        spec: StreamSpec,
        seed: int,
        stream: int,
        num_streams: int,
    ):
        self.tables, self.spec, self.seed = tables, spec, seed
        self.stream, self.num_streams = stream, num_streams
        w = np.asarray(weights, dtype=np.float64)
        self.probs = w / w.sum()
        self.mix_rng = np.random.default_rng([seed, 1_000_003, stream])
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + stream)
        self.epochs = [0] * len(tables)
        self.cursors = [0] * len(tables)
        self.bad_records = 0
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self.packer = Packer(
            spec.expected_num_tokens,
            spec.max_num_tokens,
            spec.max_num_tokens_per_sample,
            spec.prefer_buffer_before,
            spec.max_buffer_size,
        )

    # ---- reading ------------------------------------------------------------------------------
    def _order(self, source: int) -> np.ndarray:
        key = (source, self.epochs[source])
        if key not in self._orders:
            full = epoch_order(self.tables[source], self.seed, source, self.epochs[source])
            mine = (
                full[self.stream % len(full) :: self.num_streams]
                if len(full) >= self.num_streams
                else full[[self.stream % len(full)]]
            )
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source}
            self._orders[key] = mine
        return self._orders[key]

    def _plan(self, source: int, row: int) -> SamplePlan:
        s = self.spec
        return build_sample_plan(
            self.tables[source].get(row),
            s.encode,
            s.special,
            s.images,
            s.loss_roles,
            s.special_token_loss,
            ref=(source, row),
        )

    def next_plan(self) -> SamplePlan:
        while True:
            source = int(self.mix_rng.choice(len(self.tables), p=self.probs))
            order = self._order(source)
            if self.cursors[source] >= len(order):
                self.epochs[source] += 1
                self.cursors[source] = 0
                order = self._order(source)
            row = int(order[self.cursors[source]])
            self.cursors[source] += 1
            try:
                return self._plan(source, row)
            except (FormatError, OSError, ValueError) as e:  # a broken record must not stop a long run
                self.bad_records += 1
                warnings.warn(
                    f"data: skipped unreadable record {row} of {self.tables[source].path}: {e} "
                    f"({self.bad_records} so far)",
                    stacklevel=2,
                )

    def next_pack(self) -> Pack:
        plans = self.packer.next_pack(self.next_plan)
        s = self.spec
        batch = pack_samples(plans, s.special, s.packing, self.generator, s.dropout)
        self.packer.record(batch, len(plans))
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        return Pack(batch, [p.record_id for p in plans], copy.copy(self.packer.stats), seed)

    # ---- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        carry = self.packer._carry
        return {
            "epochs": list(self.epochs),
            "cursors": list(self.cursors),
            "mix_rng": copy.deepcopy(self.mix_rng.bit_generator.state),
            "generator": self.generator.get_state(),
            "carry": None if carry is None else list(carry.ref),
            "buffer": [list(p.ref) for p in self.packer.buffer],
            "stats": vars(self.packer.stats).copy(),
            "bad_records": self.bad_records,
            "stream": self.stream,
            "num_streams": self.num_streams,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["stream"], state["num_streams"]) != (self.stream, self.num_streams):
            raise DataError(
                f"data state is for stream {state['stream']} of {state['num_streams']}, this is "
                f"{self.stream} of {self.num_streams} (world_size * grad_accum changed?)"
            )
        self.epochs, self.cursors = list(state["epochs"]), list(state["cursors"])
        self.mix_rng.bit_generator.state = state["mix_rng"]
        self.generator.set_state(state["generator"])
        carry = None if state["carry"] is None else self._plan(*state["carry"])
        self.packer.restore(carry, [self._plan(*ref) for ref in state["buffer"]])
        self.packer.stats = PackerStats(**state["stats"])
        self.bad_records = state["bad_records"]


class Prefetcher:
    """Builds packs of a stream in a background thread; yields (pack, stream state after that pack)."""

    def __init__(self, stream: DataStream, depth: int):
        self.stream, self.depth = stream, depth
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                item = (self.stream.next_pack(), self.stream.state_dict())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surface in the training loop
            self._queue.put(e)

    def next(self) -> tuple[Pack, dict[str, Any]]:
        if self.depth == 0:
            return self.stream.next_pack(), self.stream.state_dict()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, daemon=True, name=f"pack-stream-{self.stream.stream}")
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
