"""A unified model's skills, measured one by one on held-out shapes-world scenes (`bagel-ft eval skills`).

    bagel-ft eval skills --ckpt checkpoints/shapes-base --out runs/eval/skills-base [--limit 20]

Four skills, each judged exactly by the shapes world (`scene_graphs.shapes`), on scenes no training record
shows (`scene_graphs.shapes.tasks.heldout_scenes`; ShapesEval's fixed prompts for t2i):

  t2i      prompt -> image (single mode): ShapesEval overall (mean over categories of the fraction of images
           the judge passes), `--limit` prompts per category
  edit     image + instruction -> image (`inference.psir.run_edit`, the official editing context): the judge
           passes the edited image against the scene asked for; per operation (`EDIT_OPS`), `--limit` each.
           Diagnostics apart from accuracy: `kept` = unchanged objects still found in their box (IoU >= 0.5,
           same shape and color), `relation` = relations of add / move edits that hold
  verdict  text + image + "does the picture match the text?" -> "the picture shows ...; consistent" |
           "...; inconsistent: why" (`parse_verdict_answer`): balanced accuracy (mean of the accuracies on true
           pairs and on near misses), `--limit` pairs of each
  caption  image + "describe the picture" -> text: the text parses (`parse_prompt`) to the shown scene exactly
           (objects, counts, colors, sizes, relations; up to object ids), `--limit` scenes

`DIR/summary.json` holds each skill's accuracy in [0, 1] under its name plus details; `DIR/<skill>.jsonl` one
line per item (resumed: items already there are not redone); `DIR/images/` the drawn images.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from eval.run_dir import prepare_run_dir, read_jsonl, save_png_atomic, write_json_atomic
from scene_graphs.describe import describe
from scene_graphs.schema import SceneGraph
from scene_graphs.shapes import check
from scene_graphs.shapes.edits import EDIT_OPS, sample_edit
from scene_graphs.shapes.judge import compatible
from scene_graphs.shapes.parse import ParseError, parse_prompt
from scene_graphs.shapes.render import draw_layout
from scene_graphs.shapes.tasks import (
    CONSISTENT,
    DESCRIBE,
    INCONSISTENT,
    VERIFY,
    heldout_scenes,
    near_miss,
    parse_verdict_answer,
    true_pair,
)

SKILLS = ("t2i", "edit", "verdict", "caption")
KEPT_IOU = 0.5


@dataclass
class SkillsConfig:
    limit: int = 20  # items per skill unit: t2i prompts per category, edits per op, pairs per label, captions
    seed: int = 0  # flow noise and scene sampling
    num_timesteps: int = 26  # flow schedule points (25 Euler steps), as the shapes base draws
    timestep_shift: float = 1.0
    # no guidance by default: the shapes base's edits come out as fragmented textures under the release's
    # editing CFG (text 4, image 2); `--inference-config` sets these for other models
    cfg_text_scale: float = 1.0
    cfg_img_scale: float = 1.0  # edits: guidance against the instruction alone (the release uses 2.0)
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    max_text_tokens: int = 64
    skills: list[str] = field(default_factory=lambda: list(SKILLS))


def evaluate_skills(engine, out: str | Path, config: SkillsConfig | None = None, log=print) -> dict[str, Any]:
    """Run every skill of `config.skills` with `engine` (an `inference.engine.Engine`); writes and returns the
    summary (module doc)."""
    config = config or SkillsConfig()
    out = Path(out)
    canvas = min(engine.geometry.vae_max_size, engine.max_image_side)  # the size the model was trained to draw
    summary: dict[str, Any] = {"config": asdict(config), "canvas": canvas}
    for skill in config.skills:
        t0 = time.time()
        rows = _RUNNERS[skill](engine, out, config, canvas)
        summary.update(_SUMMARIZE[skill](rows))
        summary.setdefault("seconds", {})[skill] = round(time.time() - t0)
        log(f"{skill}: {summary[skill]:.3f} ({len(rows)} items, {summary['seconds'][skill]} s)")
    write_json_atomic(out / "summary.json", summary)
    return summary


# ---- resumable item loops ----------------------------------------------------------------------------------
class _Items:
    """`DIR/<skill>.jsonl`: items done so far, appended one line at a time (a killed run redoes at most one)."""

    def __init__(self, out: Path, skill: str):
        self.path = out / f"{skill}.jsonl"
        self.rows = {r["key"]: r for r in read_jsonl(self.path)} if self.path.exists() else {}

    def get(self, key: str, fn) -> dict:
        if key not in self.rows:
            row = {"key": key, **fn()}
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.rows[key] = row
        return self.rows[key]


def _flow(engine, config: SkillsConfig, canvas: int, edit: bool = False):
    from inference.settings import FlowSettings

    flow = FlowSettings(height=canvas, width=canvas, num_timesteps=config.num_timesteps,
                        timestep_shift=config.timestep_shift, cfg_text_scale=config.cfg_text_scale,
                        cfg_interval=tuple(config.cfg_interval))  # fmt: skip
    return replace(flow, cfg_img_scale=config.cfg_img_scale, cfg_renorm_type="text_channel") if edit else flow


def _t2i(engine, out: Path, config: SkillsConfig, canvas: int) -> list[dict]:
    from eval.shapes_eval import load_prompts, select_prompts, sub_checks
    from inference.psir import run_single

    items, rows = _Items(out, "t2i"), []
    flow = _flow(engine, config, canvas)
    for p in select_prompts(load_prompts(), limit=config.limit):

        def one(p=p) -> dict:
            image = run_single(engine, p["prompt"], flow, seed=config.seed + p["index"]).last_image
            save_png_atomic(out / "images" / f"t2i_{p['index']:04d}.png", image)
            verdict = check(image, p["graph"])
            return {"category": p["category"], "correct": verdict.consistent, "score": verdict.score,
                    "checks": sub_checks(verdict, p["graph"])}  # fmt: skip

        rows.append(items.get(f"t2i_{p['index']}", one))
    return rows


def _edits(config: SkillsConfig, canvas: int):
    """(key, op, edit) for `limit` held-out edits of every op, deterministic given config.seed."""
    rng = random.Random(config.seed)
    scenes = heldout_scenes(400, canvas)
    for op in EDIT_OPS:
        made, i = 0, 0
        while made < config.limit and i < len(scenes):
            _, graph, layout = scenes[(i * 37 + EDIT_OPS.index(op)) % len(scenes)]
            i += 1
            edit = sample_edit(graph, layout, op, rng)
            if edit is not None:
                yield f"{op}_{made}", op, edit
                made += 1


def _edit(engine, out: Path, config: SkillsConfig, canvas: int) -> list[dict]:
    from inference.psir import run_edit

    items, rows = _Items(out, "edit"), []
    flow = _flow(engine, config, canvas, edit=True)
    for n, (key, op, edit) in enumerate(_edits(config, canvas)):

        def one(key=key, op=op, edit=edit, n=n) -> dict:
            before = draw_layout(edit.before, edit.before_layout)
            image, _ = run_edit(engine, before, edit.instruction, flow, seed=config.seed + n)
            save_png_atomic(out / "images" / f"edit_{key}.png", _side_by_side(before, image))
            verdict = check(image, edit.after)
            kept = [_kept(verdict.detections, edit.after.object(o), box)
                    for o in edit.unchanged for box in edit.after_layout.boxes[o]]  # fmt: skip
            relation = (
                [bool(r.ok) for r in verdict.requirements if r.kind == "relation"] if op in ("add", "move") else []
            )
            return {"op": op, "instruction": edit.instruction, "correct": verdict.consistent, "kept": kept,
                    "relation": relation, "reasons": verdict.reasons}  # fmt: skip

        rows.append(items.get(key, one))
    return rows


def _verdict(engine, out: Path, config: SkillsConfig, canvas: int) -> list[dict]:
    items, rows = _Items(out, "verdict"), []
    rng = random.Random(config.seed + 1)
    scenes = heldout_scenes(400, canvas)
    pairs, k = [], 0
    while len([p for p in pairs if p.consistent]) < config.limit:
        _, graph, layout = scenes[k % len(scenes)]
        pairs.append(true_pair(graph, layout))
        k += 1
    k = 0
    while len([p for p in pairs if not p.consistent]) < config.limit and k < 20 * len(scenes):
        _, graph, layout = scenes[(k * 13 + 5) % len(scenes)]
        k += 1
        pair = near_miss(graph, layout, rng)
        if pair is not None:
            pairs.append(pair)
    for n, pair in enumerate(pairs):

        def one(pair=pair) -> dict:
            text = describe(pair.text_graph)
            answer = ask(engine, config, text, pair.image, VERIFY)
            return {"text": text, "label": pair.consistent, "mistake": pair.mistake, "mode": pair.mode,
                    "answer": answer, "said": parse_verdict_answer(answer)}  # fmt: skip

        rows.append(items.get(f"pair_{n}", one))
    return rows


def _caption(engine, out: Path, config: SkillsConfig, canvas: int) -> list[dict]:
    items, rows = _Items(out, "caption"), []
    scenes = heldout_scenes(400, canvas)
    for n in range(min(config.limit, len(scenes))):
        _, graph, layout = scenes[(n * 7 + 3) % len(scenes)]

        def one(graph=graph, layout=layout) -> dict:
            answer = ask(engine, config, "", draw_layout(graph, layout), DESCRIBE)
            try:
                parsed, error = parse_prompt(answer), ""
            except ParseError as e:
                parsed, error = None, str(e)
            return {"truth": describe(graph), "answer": answer, "correct": parsed is not None and parsed.isomorphic(graph),
                    "objects_right": parsed is not None and _objects(parsed) == _objects(graph), "parse_error": error}  # fmt: skip

        rows.append(items.get(f"scene_{n}", one))
    return rows


def ask(engine, config: SkillsConfig, text: str, image: Image.Image, question: str) -> str:
    """Greedy answer of the model to `question` after `text` (skipped when empty) and `image`."""
    from inference.settings import TextSettings

    ctx = engine.new_context()
    if text:
        engine.update_text(ctx, text)
    engine.update_image(ctx, image)
    engine.update_text(ctx, question)
    out = engine.decode_text(ctx, TextSettings(max_tokens=config.max_text_tokens))
    ids = out.ids[:-1] if out.finished else out.ids
    return engine.tokenizer.decode(ids, skip_special_tokens=True).strip()


# ---- scoring ------------------------------------------------------------------------------------------------------
def _t2i_summary(rows: list[dict]) -> dict:
    from eval.shapes_eval import summarize

    s = summarize(rows)
    return {"t2i": s["overall"] or 0.0, "t2i_detail": {"categories": s["categories"], "subscores": s["subscores"]}}


def _edit_summary(rows: list[dict]) -> dict:
    ops = {
        op: _mean([r["correct"] for r in rows if r["op"] == op]) for op in EDIT_OPS if any(r["op"] == op for r in rows)
    }
    kept = [k for r in rows for k in r["kept"]]
    relation = [k for r in rows for k in r["relation"]]
    return {"edit": _mean([r["correct"] for r in rows]), "edit_ops": ops,
            "edit_detail": {"kept": _mean(kept), "kept_n": len(kept), "relation": _mean(relation),
                            "relation_n": len(relation), "n": len(rows)}}  # fmt: skip


def _verdict_summary(rows: list[dict]) -> dict:
    pos = [r["said"] == CONSISTENT for r in rows if r["label"]]
    neg = [r["said"] == INCONSISTENT for r in rows if not r["label"]]
    by = {}
    for m in sorted({r["mistake"] for r in rows if r["mistake"]}):
        by[m] = _mean([r["said"] == INCONSISTENT for r in rows if r["mistake"] == m])
    return {"verdict": (_mean(pos) + _mean(neg)) / 2,
            "verdict_detail": {"true_pairs": _mean(pos), "near_misses": _mean(neg), "by_mistake": by,
                               "unparsed": sum(r["said"] is None for r in rows), "n": len(rows)}}  # fmt: skip


def _caption_summary(rows: list[dict]) -> dict:
    return {"caption": _mean([r["correct"] for r in rows]),
            "caption_detail": {"objects_right": _mean([r["objects_right"] for r in rows]),
                               "unparsed": sum(bool(r["parse_error"]) for r in rows), "n": len(rows)}}  # fmt: skip


_RUNNERS = {"t2i": _t2i, "edit": _edit, "verdict": _verdict, "caption": _caption}
_SUMMARIZE = {"t2i": _t2i_summary, "edit": _edit_summary, "verdict": _verdict_summary, "caption": _caption_summary}


# ---- helpers ---------------------------------------------------------------------------------------------------
def _mean(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def _objects(graph: SceneGraph) -> list[tuple]:
    return sorted((o.name, o.count, tuple(sorted(o.attributes.items()))) for o in graph.objects)


def _kept(detections, obj, box) -> bool:
    """Whether an instance of `obj` was found in `box` (IoU >= KEPT_IOU)."""
    return any(compatible(d, obj) and _iou(d.bbox, box) >= KEPT_IOU for d in detections)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _side_by_side(a: Image.Image, b: Image.Image) -> Image.Image:
    sheet = Image.new("RGB", (a.width + b.width + 2, max(a.height, b.height)), (255, 255, 255))
    sheet.paste(a, (0, 0))
    sheet.paste(b, (a.width + 2, 0))
    return sheet


def run(ckpt: str, out: str | Path, config: SkillsConfig, tokenizer: str = "auto") -> dict[str, Any]:
    """`bagel-ft eval skills`: load the checkpoint, prepare the run folder, evaluate."""
    from inference.engine import Engine

    sampling = json.loads(json.dumps({k: v for k, v in asdict(config).items() if k not in ("limit", "skills")}))
    run_config = {"benchmark": "skills", "ckpt": ckpt, "mode": "single", "seed": config.seed, "inference": sampling,
                  "limit": config.limit, "skills": config.skills}  # fmt: skip
    prepare_run_dir(out, run_config)
    engine = Engine.from_pretrained(ckpt, tokenizer=tokenizer)
    return evaluate_skills(engine, out, config)
