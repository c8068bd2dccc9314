"""Training throughput on CPU: tokens/s and packing efficiency of the tiny model.

    python benchmarks/train_throughput.py                 # ~1 min
    python benchmarks/train_throughput.py --steps 30 --budgets 320 1024

The real trainer (synthetic trajectories -> packer -> forward/backward -> AdamW + EMA) with
configs/train/tiny_cpu.yaml at several pack budgets; tokens/s is the median over steps after the first two,
packing efficiency is real tokens / (packs x max_num_tokens) of the data streams.
GPU figures at 7B widths (tokens/s, MFU, memory; several pack lengths with --train-tokens) come from
benchmarks/gpu_check.py --sections train.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import load_config  # noqa: E402
from training.metrics import read_metrics  # noqa: E402
from training.synthetic import write_table  # noqa: E402
from training.trainer import Trainer  # noqa: E402


def cpu_rows(steps: int, budgets: list[int]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_table(Path(tmp) / "data", records=64, size=(16, 16))
        for budget in budgets:
            run = Path(tmp) / f"run{budget}"
            cfg = load_config(
                ROOT / "configs/train/tiny_cpu.yaml",
                [
                    f"data.sources=[{{path: {data}}}]",
                    f"run.dir={run}",
                    f"train.steps={steps}",
                    f"data.max_num_tokens={budget}",
                    f"data.expected_num_tokens={int(budget * 0.8)}",
                    f"data.max_num_tokens_per_sample={budget}",
                    f"data.prefer_buffer_before={budget // 2}",
                    "train.save_every=100000",
                    "train.export_ema=false",
                    "train.log_every=100000",
                ],
            )
            Trainer(cfg).setup().train()
            m = read_metrics(run)
            tail = [m[s] for s in sorted(m)[2:]]
            rows.append(
                {
                    "setting": f"tiny, CPU 1 thread, pack budget {budget}",
                    "tokens/s": statistics.median(r["tokens_per_s"] for r in tail),
                    "packing eff.": m[max(m)]["packing_efficiency"],
                    "tokens/pack": statistics.mean(r["tokens"] for r in tail),
                    "MFU": None,
                }
            )
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ["setting", "tokens/pack", "tokens/s", "packing eff.", "MFU"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = [
            r["setting"],
            f"{r['tokens/pack']:.0f}",
            f"{r['tokens/s']:.0f}",
            "-" if r["packing eff."] is None else f"{r['packing eff.']:.3f}",
            "-" if r["MFU"] is None else f"{r['MFU']:.1%}",
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="trainer steps per CPU row")
    p.add_argument("--budgets", type=int, nargs="+", default=[320, 1024], help="pack budgets (max_num_tokens) on CPU")
    args = p.parse_args()
    print_table(cpu_rows(args.steps, args.budgets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
