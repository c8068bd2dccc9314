"""Shapes-world base-pretraining data: `t2i` (prompt -> image), `caption` (image -> text), `text` (prompt -> text).

    python -m demo.base_data --out runs/base-data --t2i 12000 --caption 3000 --text 3000 --canvas 64

The single-pass analog of BAGEL's pretraining mixture (docs/format.md section 2):

  t2i      prompt | image(loss)          prompt = a `generate_prompts` text (all ten ShapesEval categories,
                                          round robin); image = `render(graph, canvas, seed)`
  caption  ""     | image(given) caption  caption = `describe` of the drawn scene with every object's color and
                                          size made explicit (the renderer picks colors a prompt leaves open)
  text     prompt | caption              a text-only `caption` record (no image): the `describe` of the prompt's
                                          own scene graph. BAGEL's base also learned text from text; without this
                                          task a tiny base never reads a prompt to write text, and PSIR plans
                                          fine-tuned from it ignore the prompt (docs/results.md, T9)

Prompt seeds are `--seed` (t2i), `--seed + 1` (caption) and `--seed + 2` (text), disjoint from ShapesEval's
fixed set by construction of `generate_prompts` (different seed); render seed = record index. Each task is
one folder of parquet files (`OUT/t2i/00000.parquet`, ...; `data_gen.shards.write_parquet`, `--per-file` rows),
one trainer source each (`data.sources[].path` = OUT/t2i, OUT/caption, OUT/text) so the mixture weights
are set per task.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from bagel_ft.trajectory import Trajectory, Turn
from data_gen.shards import write_parquet
from scene_graphs.describe import describe
from scene_graphs.schema import SceneGraph
from scene_graphs.shapes import ShapesPrompt, generate_prompts, render

SOURCE = "demo.base_data"


def explicit_graph(graph: SceneGraph, colors: dict[str, str]) -> SceneGraph:
    """`graph` with the drawn color of every object (layout.colors) as an attribute."""
    objects = [dataclasses.replace(o, attributes={**o.attributes, "color": colors[o.id]}) for o in graph.objects]
    return SceneGraph(objects, graph.relations)


def t2i_record(prompt: ShapesPrompt, canvas: int, seed: int) -> Trajectory:
    image, layout = render(prompt.graph, canvas, seed=seed)
    meta = {"source": SOURCE, "seed": seed, "tag": prompt.tag, "graph": prompt.graph.to_json(), "canvas": canvas}
    return Trajectory(prompt.text, [Turn("image", image=0, loss=True)], [image], subset="t2i", meta=meta)


def caption_record(prompt: ShapesPrompt, canvas: int, seed: int) -> Trajectory:
    image, layout = render(prompt.graph, canvas, seed=seed)
    caption = describe(explicit_graph(prompt.graph, layout.colors))
    meta = {"source": SOURCE, "seed": seed, "tag": prompt.tag, "graph": prompt.graph.to_json(), "canvas": canvas}
    turns = [Turn("image", image=0, loss=False), Turn("caption", text=caption, loss=True)]
    return Trajectory("", turns, [image], subset="caption", meta=meta)


def text_record(prompt: ShapesPrompt, canvas: int, seed: int) -> Trajectory:
    """prompt | caption: the `describe` of the prompt's own scene graph, no image (`canvas` unused)."""
    meta = {"source": SOURCE, "task": "text", "seed": seed, "tag": prompt.tag, "graph": prompt.graph.to_json()}
    turns = [Turn("caption", text=describe(prompt.graph), loss=True)]
    return Trajectory(prompt.text, turns, [], subset="caption", meta=meta)


TASKS = {"t2i": t2i_record, "caption": caption_record, "text": text_record}  # folder name -> record maker


def write_base_data(
    out: str | Path,
    t2i: int,
    caption: int,
    canvas: int,
    seed: int = 1,
    per_file: int = 2000,
    text: int = 0,
    log=print,
) -> dict:
    """Write `t2i`, `caption` and `text` records into `out/<task>/` (module doc); returns counts and seconds."""
    out = Path(out)
    t0 = time.time()
    counts = {"t2i": t2i, "caption": caption, "text": text}
    for offset, (task, n) in enumerate(counts.items()):
        if n <= 0:
            continue
        (out / task).mkdir(parents=True, exist_ok=True)
        prompts = generate_prompts(n, seed + offset)
        for k, start in enumerate(range(0, n, per_file)):
            records = [TASKS[task](p, canvas, i) for i, p in enumerate(prompts[start : start + per_file], start)]
            write_parquet(records, out / task / f"{k:05d}.parquet")
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
    ap.add_argument("--out", required=True, help="output dir of parquet files")
    ap.add_argument("--t2i", type=int, default=12000, help="t2i records")
    ap.add_argument("--caption", type=int, default=3000, help="caption records")
    ap.add_argument("--text", type=int, default=3000, help="text-only caption records (prompt -> describe)")
    ap.add_argument("--canvas", type=int, default=64, help="image side, px")
    ap.add_argument("--seed", type=int, default=1, help="prompt seed of the t2i records (caption: +1, text: +2)")
    ap.add_argument("--per-file", type=int, default=2000, help="records per parquet file")
    args = ap.parse_args(argv)
    write_base_data(args.out, args.t2i, args.caption, args.canvas, args.seed, args.per_file, args.text)


if __name__ == "__main__":
    main()
