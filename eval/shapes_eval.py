"""ShapesEval: the shapes world's exact benchmark — fixed prompts, fixed seeds, a pixel-level judge.

The prompts are `scene_graphs.shapes.shapes_eval_prompts()`, the shapes world's fixed published set:
GenEval's six categories (single_object, two_object, counting, colors, position, color_attr) drawn in
shapes, plus harder multi-object / relation categories. Each sample is judged by
`scene_graphs.shapes.check(image, graph)`, which reads only pixels: an image is correct when the picture
shows exactly the prompt's scene graph.

  <out>/images/{index:05d}_{sample:02d}.png   N samples per prompt (4 by default, like GenEval)
  <out>/gen/{key}.json                        ours: seed + cost (+ trajectory path, format failure) of the image
  <out>/trajectories/{key}.traj/              the PSIR trajectory, when the generator returns one
  <out>/records.jsonl, summary.json           per-image verdicts; per-category accuracy and sub-accuracies

Scores: per category, the fraction of images judged consistent (overall = unweighted mean over
categories, GenEval's rule). Sub-accuracies count the checks behind a verdict, per object or relation
(`sub_checks`): shape (an object of the asked shape is there), color (one of them has the asked color),
count (exactly the asked number of matching objects), position (the relation holds, GenEval's box rule).
`geneval_rule` is GenEval's own, looser decision rule (`shapes.geneval_style_score`: at least the asked
objects, extras allowed) on the same pixels, for GenEval's six categories only (its rule checks the colors
of the top-`count` objects of a class, so it misjudges the harder categories' same-shape, two-color prompts).
Generation resumes image by image (each PNG appears atomically, last), draws `batch_size` samples at once
(the same images as one at a time) and, with a `shard` (inference.sharding), only every N-th prompt; scoring
re-judges every image (the judge is a deterministic function of the pixels, milliseconds per image).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from eval.generator import ImageGenerator, generate_many, sample_seed
from eval.run_dir import (
    RECORDS_FILE,
    SUMMARY_FILE,
    clean_sample_dirs,
    cost_per_sample,
    record,
    save_sample,
    write_json_atomic,
    write_jsonl_atomic,
)
from inference.sharding import Shard

SUB_CHECKS = ("shape", "color", "count", "position")
NO_IMAGE_REASON = "the generator returned no image (judged on a black stand-in)"


# ---- prompts ---------------------------------------------------------------------------------------------
def load_prompts() -> list[dict[str, Any]]:
    """The fixed published prompt set as [{"index", "prompt", "category", "graph", "include", "exclude"}]."""
    from scene_graphs import shapes

    return as_eval_prompts(shapes.shapes_eval_prompts())


def as_eval_prompts(prompts) -> list[dict[str, Any]]:
    """`ShapesPrompt`s (e.g. a validation set of generated prompts) as prompt dicts, indexed in order."""
    return [
        {"index": i, "prompt": p.text, "category": p.tag, "graph": p.graph, "include": p.include, "exclude": p.exclude}
        for i, p in enumerate(prompts)
    ]


def select_prompts(prompts: list[dict], subset: list[str] | None = None, limit: int | None = None) -> list[dict]:
    """Prompts of the categories in `subset` (all when None), the first `limit` of each category."""
    if subset:
        unknown = set(subset) - {p["category"] for p in prompts}
        if unknown:
            cats = sorted({p["category"] for p in prompts})
            raise ValueError(f"--subset: unknown ShapesEval categories {sorted(unknown)}; expected some of {cats}")
    kept, seen = [], {}
    for p in prompts:
        if subset and p["category"] not in subset:
            continue
        seen[p["category"]] = seen.get(p["category"], 0) + 1
        if limit is None or seen[p["category"]] <= limit:
            kept.append(p)
    return kept


# ---- generation -------------------------------------------------------------------------------------------
def sample_key(index: int, sample: int) -> str:
    return f"{index:05d}_{sample:02d}"


def generate_shapes(
    generator: ImageGenerator,
    prompts: list[dict],
    out: str | Path,
    *,
    n: int = 4,
    seed: int = 0,
    progress: bool = True,
    batch_size: int | None = None,
    shard: Shard | None = None,
) -> dict[str, int]:
    """`n` samples per prompt (of this `shard`'s prompts), `batch_size` in flight (None: the generator's
    default); an image already on disk is kept (its PNG is written last, atomically)."""
    out = Path(out)
    shard = shard or Shard()
    if shard.count == 1:  # shards cannot tell another shard's writes in progress from debris: scoring cleans
        clean_sample_dirs(out)
    units = [(p, s) for p in shard.select(prompts) for s in range(n)]
    todo = [(p, s) for p, s in units if not (out / "images" / f"{sample_key(p['index'], s)}.png").exists()]
    stats = dict(images=len(units), generated=0, skipped=len(units) - len(todo))
    jobs = [(p["prompt"], sample_seed(seed, p["index"], s)) for p, s in todo]
    for i, g in tqdm(generate_many(generator, jobs, batch_size), desc="shapes", total=len(jobs), disable=not progress):
        key = sample_key(todo[i][0]["index"], todo[i][1])
        save_sample(out, key, g, jobs[i][1], {"key": key})
        stats["generated"] += 1
    return stats


# ---- scoring ----------------------------------------------------------------------------------------------
def sub_checks(verdict: Any, graph: Any) -> dict[str, list[bool]]:
    """Per-aspect checks behind a verdict (see the module docstring), from its detections and the graph."""
    from scene_graphs.shapes.judge import compatible  # the judge's one definition of "an instance of obj"

    dets = verdict.detections
    checks: dict[str, list[bool]] = {k: [] for k in SUB_CHECKS}
    for obj in graph.objects:
        same_shape = [d for d in dets if d.shape == obj.name]
        checks["shape"].append(bool(same_shape))
        if "color" in obj.attributes:
            checks["color"].append(any(d.color == obj.attributes["color"] for d in same_shape))
        checks["count"].append(sum(compatible(d, obj) for d in dets) == obj.count)
    checks["position"] = [bool(r.ok) for r in verdict.requirements if r.kind == "relation" and r.ok is not None]
    return checks


def score_shapes(out: str | Path, prompts: list[dict], *, n: int = 4, progress: bool = True) -> dict[str, Any]:
    """Judge every generated image of `prompts`; writes records.jsonl and summary.json, returns the summary."""
    from scene_graphs import shapes

    out = Path(out)
    clean_sample_dirs(out)
    records = []
    for p in tqdm(prompts, desc="shapes judge", disable=not progress):
        for s in range(n):
            key = sample_key(p["index"], s)
            path = out / "images" / f"{key}.png"
            if not path.exists():
                continue
            image = Image.open(path).convert("RGB")
            verdict = shapes.check(image, p["graph"])
            extra = {}
            if p["category"] in shapes.GENEVAL_CATEGORIES:  # GenEval's rule is only meant for its own categories
                extra["geneval_rule_correct"] = bool(
                    shapes.geneval_style_score(image, p["include"], p["exclude"])["correct"]
                )
            gen_path = out / "gen" / f"{key}.json"
            gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
            records.append(
                record(
                    key,
                    p["category"],
                    p["prompt"],
                    f"images/{key}.png",
                    correct=bool(verdict.consistent),
                    score=float(verdict.score),
                    reasons=([NO_IMAGE_REASON] if gen.get("no_image") else []) + list(verdict.reasons),
                    seed=gen.get("seed"),
                    trajectory=gen.get("trajectory"),
                    cost=gen.get("cost"),
                    checks=sub_checks(verdict, p["graph"]),
                    detections=[_phrase(d) for d in verdict.detections],
                    failure=gen.get("failure"),
                    **extra,
                )
            )
    summary = summarize(records)
    summary.update(
        benchmark="shapes",
        prompts=len(prompts),
        missing_images=len(prompts) * n - len(records),
        cost_per_sample=cost_per_sample([r["cost"] for r in records if r["cost"]]),
    )
    write_jsonl_atomic(out / RECORDS_FILE, records)
    write_json_atomic(out / SUMMARY_FILE, summary)
    return summary


def _phrase(d: Any) -> str:
    return f"{d.size} {d.color} {d.shape} at {tuple(round(float(v)) for v in d.bbox)}"


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-category accuracy (n = images), overall = mean over categories, sub-accuracies (n = checks)."""
    by_cat: dict[str, list[bool]] = {}
    rule: dict[str, list[bool]] = {}
    checks: dict[str, list[bool]] = {k: [] for k in SUB_CHECKS}
    for r in records:
        by_cat.setdefault(r["category"], []).append(bool(r["correct"]))
        if "geneval_rule_correct" in r:
            rule.setdefault(r["category"], []).append(bool(r["geneval_rule_correct"]))
        for k, v in r.get("checks", {}).items():
            checks[k] += v
    categories = {c: {"score": sum(v) / len(v), "correct": sum(v), "n": len(v)} for c, v in by_cat.items()}
    return {
        "categories": categories,
        "overall": sum(c["score"] for c in categories.values()) / len(categories) if categories else None,
        "correct_images": sum(r["correct"] for r in records) / len(records) if records else None,
        "mean_requirement_score": sum(r["score"] for r in records) / len(records) if records else None,
        "subscores": {k: {"score": sum(v) / len(v), "n": len(v)} for k, v in checks.items() if v},
        "geneval_rule": {c: {"score": sum(v) / len(v), "n": len(v)} for c, v in rule.items()},
        "total_images": len(records),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{c:<18} {v['score']:7.2%} ({v['correct']} / {v['n']})" for c, v in summary["categories"].items()]
    lines += [f"{'overall':<18} {summary['overall']:.5f}" if summary["overall"] is not None else "overall: no images"]
    lines += [f"  {k:<16} {v['score']:7.2%} (n={v['n']})" for k, v in summary["subscores"].items()]
    return "\n".join(lines)


def score_images(prompts: list[Any], images: list[Image.Image]) -> dict[str, Any]:
    """`summarize` of in-memory `images[i]` judged against `prompts[i]` (`scene_graphs.shapes.ShapesPrompt`s; for
    trials and the autoencoder's measurements): the rule of `score_shapes`, the judge reading each image at its
    native size (clean renders pass 100% at 32-128 px)."""
    from scene_graphs import shapes

    if len(prompts) != len(images):
        raise ValueError(f"score_images: {len(prompts)} prompts but {len(images)} images")
    records = []
    for prompt, image in zip(prompts, images, strict=True):
        verdict = shapes.check(image.convert("RGB"), prompt.graph)
        checks = sub_checks(verdict, prompt.graph)
        records.append(
            {"category": prompt.tag, "correct": verdict.consistent, "score": verdict.score, "checks": checks}
        )
    return summarize(records)
