"""GenEval (Ghosh et al. 2023, github djghosh13/geneval) the way the paper ran it.

Generation writes the official layout, which the official scorer reads unchanged:

  <out>/00000/metadata.jsonl     the prompt's line of evaluation_metadata.jsonl, byte for byte
  <out>/00000/samples/0000.png   N samples per prompt (4 in the paper), seeds `sample_seed(seed, i, s)`
  <out>/00000/grid.png           optional (--grid)
  <out>/00000/gen.jsonl          ours: seed + cost per sample (the scorer ignores it)
  <out>/00000/trajectories/      ours: 0000.traj/ ... when the generator returns PSIR trajectories

Folders keep the prompt's line index in the metadata file, so subsets (`--subset`, `--limit`) of one
run and of different runs line up. A prompt folder appears only by renaming a complete temporary
folder into place, so a killed run never leaves a folder that looks finished; a folder whose samples
0..N-1 are all present is never regenerated. Samples of several prompts are drawn `batch_size` at a time
(the same images as one at a time); a `shard` (inference.sharding) draws every N-th prompt's folder.

Scoring is the official scorer (Mask2Former + CLIP; it needs mmdet and CUDA, and asserts CUDA). Install:

  git clone https://github.com/djghosh13/geneval && cd geneval
  conda env create -f environment.yml && conda activate geneval    # mmdet 2.x, mmcv-full, open_clip
  ./evaluation/download_models.sh <MODEL_DIR>                        # mask2former_swin-s-p4-w7-224...pth
  export GENEVAL_REPO=$PWD GENEVAL_MODEL_PATH=<MODEL_DIR>

then `bagel-ft eval geneval ...` runs, when it finds them,

  python $GENEVAL_REPO/evaluation/evaluate_images.py <out> --outfile <out>/results.jsonl --model-path <MODEL_DIR>

and summarises results.jsonl exactly as `evaluation/summary_scores.py` does (`summarize_results`). On a
machine without them, generate here, score there, and re-run with `--stage score` to summarise.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from common.atomic import clean_tmp, make_tmp_dir, move_into_place, replacing
from eval.generator import Generation, ImageGenerator, generate_many, sample_seed
from eval.run_dir import (
    RECORDS_FILE,
    SUMMARY_FILE,
    cost_per_sample,
    read_jsonl,
    record,
    save_trajectory,
    write_json_atomic,
    write_jsonl_atomic,
)
from inference.sharding import Shard

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RESULTS_FILE = "results.jsonl"
GEN_FILE = "gen.jsonl"


# ---- prompts -----------------------------------------------------------------------------------------
def load_metadata(path: str | Path) -> list[tuple[int, bytes, dict[str, Any]]]:
    """(line index, the raw line with its terminator, parsed metadata) for every prompt line."""
    lines = Path(path).read_bytes().splitlines(keepends=True)
    return [(i, line, json.loads(line)) for i, line in enumerate(lines) if line.strip()]


def select_prompts(entries: list, subset: list[str] | None = None, limit: int | None = None) -> list:
    """Keep prompts whose tag is in `subset` (all when None), then the first `limit` of each tag."""
    if subset:
        unknown = set(subset) - {e[2]["tag"] for e in entries}
        if unknown:
            raise ValueError(f"--subset: unknown GenEval tags {sorted(unknown)}; expected some of {TAGS}")
        entries = [e for e in entries if e[2]["tag"] in subset]
    if limit is not None:
        seen: dict[str, int] = {}
        kept = []
        for e in entries:
            seen[e[2]["tag"]] = seen.get(e[2]["tag"], 0) + 1
            if seen[e[2]["tag"]] <= limit:
                kept.append(e)
        entries = kept
    return entries


# ---- generation -------------------------------------------------------------------------------------
def sample_name(sample: int) -> str:
    return f"{sample:04d}.png"


def prompt_complete(folder: Path, n: int, line: bytes, grid: bool = False) -> bool:
    if not folder.is_dir():
        return False
    meta = folder / "metadata.jsonl"
    if meta.exists() and meta.read_bytes() != line:
        raise ValueError(f"{folder}: metadata.jsonl differs from the prompt file's line; use a new --out")
    samples = all((folder / "samples" / sample_name(s)).exists() for s in range(n))
    return samples and (not grid or (folder / "grid.png").exists())


def generate_geneval(
    generator: ImageGenerator,
    metadata: str | Path,
    out: str | Path,
    *,
    n: int = 4,
    seed: int = 0,
    subset: list[str] | None = None,
    limit: int | None = None,
    grid: bool = False,
    progress: bool = True,
    batch_size: int | None = None,
    shard: Shard | None = None,
) -> dict[str, int]:
    """Draw `n` samples for every selected prompt (of this `shard`'s prompts) into the official layout,
    `batch_size` samples in flight (None: the generator's default); returns
    {"prompts", "generated_prompts", "skipped_prompts", "generated_samples"}."""
    out = Path(out)
    shard = shard or Shard()
    if shard.count == 1:  # shards cannot tell another shard's work in progress from debris: scoring cleans
        clean_tmp(out)
    entries = shard.select(select_prompts(load_metadata(metadata), subset, limit))
    stats = dict(prompts=len(entries), generated_prompts=0, skipped_prompts=0, generated_samples=0)
    folders = []
    for index, line, meta in entries:
        folder = out / f"{index:05d}"
        if prompt_complete(folder, n, line, grid):
            stats["skipped_prompts"] += 1
        else:
            folders.append(_PromptFolder(folder, index, line, meta, n, grid))
    for f in folders:
        if not f.todo:  # every sample there, the grid missing
            f.finish()
            stats["generated_prompts"] += 1
    jobs = [(f, s) for f in folders for s in sorted(f.todo)]
    requests = [(f.meta["prompt"], sample_seed(seed, f.index, s)) for f, s in jobs]
    for i, g in tqdm(
        generate_many(generator, requests, batch_size), desc="geneval", total=len(jobs), disable=not progress
    ):
        folder, sample = jobs[i]
        if folder.add(sample, requests[i][1], g):  # its last sample: the folder is in place
            stats["generated_prompts"] += 1
        stats["generated_samples"] += 1
    return stats


class _PromptFolder:
    """One prompt's folder, completed in a temporary copy (samples already there are kept) that replaces it
    once its last missing sample is drawn."""

    def __init__(self, folder: Path, index: int, line: bytes, meta: dict, n: int, grid: bool):
        self.folder, self.index, self.line, self.meta, self.n, self.grid = folder, index, line, meta, n, grid
        self.tmp: Path | None = None  # made when the first sample arrives
        self.todo = {s for s in range(n) if not (folder / "samples" / sample_name(s)).exists()}
        self.gens: dict[int, dict] = {}

    def _open(self) -> None:
        if self.tmp is None:
            self.tmp = make_tmp_dir(self.folder.parent, self.folder.name)
            if self.folder.exists():  # a finished folder from a run with smaller n (or no grid): extend it
                shutil.copytree(self.folder, self.tmp, dirs_exist_ok=True)
            (self.tmp / "metadata.jsonl").write_bytes(self.line)
            (self.tmp / "samples").mkdir(exist_ok=True)
            self.gens = {row["sample"]: row for row in read_jsonl(self.tmp / GEN_FILE)}

    def add(self, sample: int, seed: int, g: Generation) -> bool:
        """Write one sample into the temporary copy -> True when that completed the folder (now in place)."""
        self._open()
        g.image.convert("RGB").save(self.tmp / "samples" / sample_name(sample))
        traj = None
        if g.trajectory is not None:
            traj = f"trajectories/{sample:04d}.traj"
            save_trajectory(self.tmp / traj, g.trajectory)
        self.gens[sample] = {"sample": sample, "seed": seed, "cost": g.cost, "trajectory": traj, "no_image": g.no_image}
        self.todo.discard(sample)
        if self.todo:
            return False
        self.finish()
        return True

    def finish(self) -> None:
        """gen.jsonl (+ grid) into the temporary copy, then swap it into place."""
        self._open()
        tmp, folder = self.tmp, self.folder
        (tmp / GEN_FILE).write_text("".join(json.dumps(self.gens[s], sort_keys=True) + "\n" for s in sorted(self.gens)))
        if self.grid:
            make_grid([Image.open(tmp / "samples" / sample_name(s)) for s in range(self.n)]).save(tmp / "grid.png")
        move_into_place(tmp, folder)


def make_grid(images: list[Image.Image]) -> Image.Image:
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    canvas = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        canvas.paste(im.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return canvas


# ---- the official scorer ------------------------------------------------------------------------------
def find_official_scorer(repo: str | None = None) -> tuple[Path | None, str]:
    """(path of evaluation/evaluate_images.py, "") when it can run here, else (None, why not)."""
    repo = repo or os.environ.get("GENEVAL_REPO")
    if not repo:
        return None, "GENEVAL_REPO is not set (see `eval/geneval.py` for the install steps)"
    script = Path(repo) / "evaluation" / "evaluate_images.py"
    if not script.exists():
        return None, f"{script} not found"
    missing = [m for m in ("mmdet", "open_clip", "clip_benchmark") if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"the official scorer needs {missing} installed"
    import torch

    if not torch.cuda.is_available():
        return None, "the official scorer asserts CUDA, none is available"
    return script, ""


def run_official_scorer(out: str | Path, script: Path, model_path: str, python: str = sys.executable) -> Path:
    """Run evaluate_images.py over `out`; results.jsonl appears only when the scorer finished."""
    out = Path(out).resolve()
    with replacing(out / RESULTS_FILE) as tmp:
        cmd = [python, str(script), str(out), "--outfile", str(tmp), "--model-path", model_path]
        subprocess.run(cmd, cwd=script.parent.parent, check=True)
    return out / RESULTS_FILE


def results_cover_samples(out: Path, results: list[dict]) -> bool:
    """Whether results.jsonl scored exactly the samples now on disk (else it is stale)."""
    scored = {_sample_key(r["filename"]) for r in results}
    present = {f"{p.parent.parent.name}/{p.stem}" for p in out.glob("[0-9]*/samples/*.png")}
    return scored == present


def _sample_key(filename: str) -> str:
    """'<out>/00012/samples/0003.png' -> '00012/0003'."""
    p = Path(filename)
    return f"{p.parent.parent.name}/{p.stem}"


# ---- summary: evaluation/summary_scores.py ---------------------------------------------------------------
def summarize_results(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """summary_scores.py on results.jsonl rows: per-tag mean of per-image `correct` (tags in order of first
    appearance, like `groupby(sort=False)`), overall = unweighted mean over tags; prompts are grouped by
    their `metadata` string (a prompt is correct when any of its images is)."""
    tags: dict[str, list[bool]] = {}
    prompts: dict[str, list[bool]] = {}
    for r in rows:
        tags.setdefault(r["tag"], []).append(bool(r["correct"]))
        prompts.setdefault(r["metadata"], []).append(bool(r["correct"]))
    categories = {t: {"score": sum(v) / len(v), "correct": sum(v), "n": len(v)} for t, v in tags.items()}
    return {
        "total_images": len(rows),
        "total_prompts": len(prompts),
        "correct_images": sum(sum(v) for v in tags.values()) / len(rows) if rows else None,
        "correct_prompts": sum(any(v) for v in prompts.values()) / len(prompts) if prompts else None,
        "categories": categories,
        "overall": sum(c["score"] for c in categories.values()) / len(categories) if categories else None,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The printout of summary_scores.py."""
    lines = [
        "Summary",
        "=======",
        f"Total images: {summary['total_images']}",
        f"Total prompts: {summary['total_prompts']}",
    ]
    if summary["total_images"]:
        lines += [
            f"% correct images: {summary['correct_images']:.2%}",
            f"% correct prompts: {summary['correct_prompts']:.2%}",
            "",
            "Task breakdown",
            "==============",
        ]
        for tag, c in summary["categories"].items():
            lines.append(f"{tag:<16} = {c['score']:.2%} ({c['correct']} / {c['n']})")
        lines += ["", f"Overall score (avg. over tasks): {summary['overall']:.5f}"]
    return "\n".join(lines)


def score_geneval(
    out: str | Path, *, repo: str | None = None, model_path: str | None = None, log: Callable[[str], None] = print
) -> dict[str, Any] | None:
    """Score a generated run: (re)run the official scorer when results.jsonl is missing or stale and the
    scorer is available, then write records.jsonl + summary.json. Returns the summary (None: unscored)."""
    out = Path(out)
    clean_tmp(out)  # debris of killed shards (they leave it: see generate_geneval); the scorer reads every folder
    results = read_jsonl(out / RESULTS_FILE)
    if not results or not results_cover_samples(out, results):
        script, why = find_official_scorer(repo)
        if script is None:
            log(f"geneval: not scored ({why}); score {out} with the official scorer, then `--stage score`")
            write_json_atomic(out / SUMMARY_FILE, _summary_json(out, None))
            return None
        model_path = model_path or os.environ.get("GENEVAL_MODEL_PATH", "./")
        results = read_jsonl(run_official_scorer(out, script, model_path))
    summary = summarize_results(results)
    log(format_summary(summary))
    write_jsonl_atomic(out / RECORDS_FILE, _records(out, results))
    write_json_atomic(out / SUMMARY_FILE, _summary_json(out, summary))
    return summary


def _records(out: Path, results: list[dict]) -> list[dict]:
    gens: dict[str, dict] = {}
    for path in out.glob(f"[0-9]*/{GEN_FILE}"):
        for row in read_jsonl(path):
            gens[f"{path.parent.name}/{row['sample']:04d}"] = dict(row, folder=path.parent.name)
    rows = []
    for r in results:
        key = _sample_key(r["filename"])
        g = gens.get(key, {})
        folder, stem = key.split("/")
        traj = f"{folder}/{g['trajectory']}" if g.get("trajectory") else None
        rows.append(
            record(
                key,
                r["tag"],
                r["prompt"],
                f"{folder}/samples/{stem}.png",
                correct=bool(r["correct"]),
                score=float(bool(r["correct"])),
                reasons=(["the generator returned no image (black stand-in)"] if g.get("no_image") else [])
                + [x for x in r.get("reason", "").split("\n") if x],
                seed=g.get("seed"),
                trajectory=traj,
                cost=g.get("cost"),
            )
        )
    return sorted(rows, key=lambda r: r["key"])


def _summary_json(out: Path, summary: dict | None) -> dict[str, Any]:
    costs = [row.get("cost", {}) for p in out.glob(f"[0-9]*/{GEN_FILE}") for row in read_jsonl(p)]
    data: dict[str, Any] = {
        "benchmark": "geneval",
        "scored": summary is not None,
        "cost_per_sample": cost_per_sample(costs),
    }
    if summary is not None:
        data.update(summary)  # categories in the paper's table order (summary_scores prints them as found)
        data["categories"] = {t: summary["categories"][t] for t in sorted(summary["categories"], key=_tag_order)}
    return data


def _tag_order(tag: str) -> tuple[int, str]:
    return (TAGS.index(tag) if tag in TAGS else len(TAGS), tag)
