"""Small synthetic trajectory tables for tests, the CPU demo and the benchmark (no data_gen needed).

Every record draws coloured shapes on a plain canvas; its texts name exactly what is drawn, so both losses can
fall quickly on the tiny model: the CE learns the templates, the MSE learns colour/placement from the text.

    python -m training.synthetic runs/data/tiny_synthetic --records 64
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

from bagel_ft.trajectory import Trajectory, Turn, inspect_text, plan_text

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def draw(objects: list[tuple[str, str, int]], size: tuple[int, int]) -> Image.Image:
    """objects: (color, shape, slot 0..3) -> an RGB image with one shape per quadrant slot."""
    w, h = size
    im = Image.new("RGB", size, (245, 245, 245))
    d = ImageDraw.Draw(im)
    for color, shape, slot in objects:
        x0, y0 = (slot % 2) * w // 2 + 2, (slot // 2) * h // 2 + 2
        box = (x0, y0, x0 + w // 2 - 5, y0 + h // 2 - 5)
        (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
    return im


def make_record(rng: random.Random, index: int, size: tuple[int, int] = (32, 32)) -> Trajectory:
    kind = rng.choice(["t2i", "trajectory", "trajectory", "caption"])
    objs = [(rng.choice(list(COLORS)), rng.choice(SHAPES), slot) for slot in rng.sample(range(4), 2)]
    names = [f"{c} {s}" for c, s, _ in objs]
    meta = {"seed": index, "source": "synthetic"}
    if kind == "t2i":
        return Trajectory(
            prompt=" and ".join(names),
            turns=[Turn("image", image=0)],
            images=[draw(objs, size)],
            subset="t2i",
            meta=meta,
        )
    if kind == "caption":
        return Trajectory(
            prompt="",
            turns=[Turn("image", image=0, loss=False), Turn("caption", " and ".join(names))],
            images=[draw(objs, size)],
            subset="caption",
            meta=meta,
        )
    turns, images = [], []
    for k in range(2):
        turns.append(Turn("plan", plan_text(f"add {names[k]}", " and ".join(names[: k + 1]))))
        images.append(draw(objs[: k + 1], size))
        turns.append(Turn("image", image=k))
        turns.append(Turn("inspect", inspect_text("consistent")))
    return Trajectory(prompt=" and ".join(names), turns=turns, images=images, subset="trajectory", meta=meta)


def make_records(records: int = 64, seed: int = 0, size: tuple[int, int] = (32, 32)) -> list[Trajectory]:
    rng = random.Random(seed)
    return [make_record(rng, i, size) for i in range(records)]


class SyntheticTable:
    """`records` synthetic trajectories in memory, read like a `training.data.RecordTable` (one row group): a
    `DataStream` over it packs exactly what it would pack from `write_table`'s files, with no parquet (and no
    `datasets`) in between. For benchmarks on machines that lack the data stack."""

    def __init__(self, records: int = 64, seed: int = 0, size: tuple[int, int] = (32, 32)):
        self.records = make_records(records, seed, size)
        self.path = Path(f"<{records} synthetic records, {size[0]}x{size[1]} px, seed {seed}>")

    def __len__(self) -> int:
        return len(self.records)

    def group_of(self, i: int) -> int:
        return 0

    def get(self, i: int) -> Trajectory:
        return self.records[i]


def write_table(
    path: str | Path, records: int = 64, seed: int = 0, size: tuple[int, int] = (32, 32), rows_per_file: int = 32
) -> Path:
    """Write `records` synthetic trajectories as parquet shards (docs/format.md features) into `path`."""
    import datasets

    from bagel_ft.trajectory import datasets_features

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rows = [record.to_row() for record in make_records(records, seed, size)]
    for k in range(0, records, rows_per_file):
        table = datasets.Dataset.from_list(rows[k : k + rows_per_file], features=datasets_features())
        table.to_parquet(str(path / f"shard-{k // rows_per_file:05d}.parquet"), batch_size=8)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output directory")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    args = parser.parse_args(argv)
    print(write_table(args.out, args.records, args.seed, (args.size, args.size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
