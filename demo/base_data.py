"""Write the shapes base's pretraining data: one folder of parquet files per task (`demo.base_tasks`).

    python -m demo.base_data --out runs/base-data --canvas 64 --t2i 12000 --edit 12000 --verdict 6000 ...

Tasks and their records are `demo.base_tasks` (its docstring shows each as a turn sequence). Each task is one
folder (`OUT/<task>/00000.parquet`, ...; `data_gen.shards.write_parquet`, `--per-file` rows) and one trainer
source (`data.sources[].path` = OUT/<task>), so the mixture weights are set per task in the trainer YAML.
Task k uses prompt seed `--seed + k` (k = its place in `demo.base_tasks.TASKS`); render seeds are record
indexes. Scenes of the held-out skills set (`base_tasks.heldout_texts`) never occur in edit, verdict or chat
records.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from data_gen.shards import write_parquet
from demo.base_tasks import TASKS, caption_record, explicit_graph, heldout_texts, make_records, t2i_record, text_record

# the recipe's defaults: records per task (demo.base_model passes these on)
DEFAULT_COUNTS = {"t2i": 12000, "caption": 3000, "text": 3000, "edit": 24000, "verdict": 12000, "chat": 6000}


def write_base_data(out: str | Path, counts: dict[str, int], canvas: int, seed: int = 1, per_file: int = 2000,
                    log=print) -> dict:  # fmt: skip
    """Write `counts[task]` records of every task into `out/<task>/` (module doc); returns counts and seconds."""
    unknown = set(counts) - set(TASKS)
    if unknown:
        raise ValueError(f"base data: unknown tasks {sorted(unknown)}; expected some of {TASKS}")
    out = Path(out)
    t0 = time.time()
    exclude = heldout_texts(canvas=canvas)
    for task, n in counts.items():
        if n <= 0:
            continue
        (out / task).mkdir(parents=True, exist_ok=True)
        records = make_records(task, n, canvas, seed + TASKS.index(task), exclude)
        for k, start in enumerate(range(0, n, per_file)):
            write_parquet(records[start : start + per_file], out / task / f"{k:05d}.parquet")
        log(f"base data: {n} {task} records ({time.time() - t0:.0f}s)")
    return {**counts, "canvas": canvas, "seed": seed, "seconds": round(time.time() - t0)}


def base_texts(data_dir: str | Path):
    """Every text of the base data under `data_dir` (each record's prompt and text turns), file by file."""
    import pyarrow.parquet as pq

    for path in sorted(Path(data_dir).glob("*/*.parquet")):
        table = pq.read_table(path, columns=["prompt", "turns"]).to_pylist()
        for row in table:
            if row["prompt"]:
                yield row["prompt"]
            for turn in row["turns"]:
                if turn.get("text"):
                    yield turn["text"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output dir (one folder per task)")
    for task, n in DEFAULT_COUNTS.items():
        ap.add_argument(f"--{task}", type=int, default=n, help=f"{task} records (0 = none)")
    ap.add_argument("--canvas", type=int, default=64, help="image side, px")
    ap.add_argument("--seed", type=int, default=1, help="prompt seed of the first task (task k: + k)")
    ap.add_argument("--per-file", type=int, default=2000, help="records per parquet file")
    args = ap.parse_args(argv)
    write_base_data(args.out, {t: getattr(args, t) for t in DEFAULT_COUNTS}, args.canvas, args.seed, args.per_file)


__all__ = ["DEFAULT_COUNTS", "base_texts", "caption_record", "explicit_graph", "t2i_record", "text_record",
           "write_base_data"]  # fmt: skip

if __name__ == "__main__":
    main()
