"""The demo's report: one self-contained HTML page (and the tables as markdown) from a demo folder.

    from demo.report import write_report
    write_report("runs/demo")            # -> runs/demo/report.html (+ report.md)

Sections: what the numbers say (a paragraph generated from them, demo.reading: scores with 95% Wilson intervals,
what improved and what did not, exact McNemar tests against the base); ShapesEval base vs fine-tuned (per-category
scores as a bar chart and tables, sub-accuracies, inference cost per prompt — eval.report's tables); the same
prompts side by side (the base's image, the fine-tuned single-pass and PSIR images, each marked by the judge, and
the PSIR stream's strip); the PSIR loop on held-out prompts; training: loss curves (inline SVG drawn here), the
data, and training records — a trajectory with a remove / swap step and why it is there. Strips wrap (every
draft visible), format failures read as sentences. Everything is read from disk (demo.pipeline.Layout), so the
page can be rebuilt from a finished or partial folder.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from PIL import Image

from bagel_ft.trajectory import Trajectory
from demo.pipeline import EVAL_RUNS, PHASES, Layout, training_summary
from demo.reading import reading, score
from eval.intervals import wilson
from eval.report import STYLE, Run, cost_table, html_table, load_runs, markdown_table, score_table, thumbnail
from eval.run_dir import load_trajectory, read_jsonl, write_text_atomic
from inference.html import format_failure_card, trajectory_cards

COLORS = ("#9aa0a6", "#4285f4", "#ea4335", "#34a853", "#fbbc04", "#a142f4")  # series colours, in order
PAGE_STYLE = (
    STYLE
    + """
body { max-width: 1200px; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.plots { display: flex; gap: 16px; flex-wrap: wrap; } svg text { font: 11px system-ui, sans-serif; fill: #333; }
.note { color: #555; font-size: 0.9em; max-width: 900px; } .failure { background: #fdecea; }
.card img { width: 128px; } .ok { color: #188038; font-weight: bold; } .wrong { color: #b00020; font-weight: bold; }
.reading { max-width: 900px; line-height: 1.5; } .why { max-width: 900px; background: #f1f8e9; padding: 6px 10px; }
table.cmp td { vertical-align: top; } table.cmp td.prompt { max-width: 260px; } img.cmp { width: 128px; }
table.cmp .reason { font-size: 0.8em; max-width: 220px; } .more { color: #666; } tr.stream td { border-top: none; background: #fafafa; }
summary { cursor: pointer; color: #444; font-size: 0.9em; margin: 4px 0; }
"""
)


# ---- SVG plots ------------------------------------------------------------------------------------------------
def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi]."""
    import math

    span = hi - lo or abs(hi) or 1.0
    raw = span / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def smooth(values: list[float], window: int = 0) -> list[float]:
    """Centered moving average (default window: ~4% of the points), to read a noisy per-step loss without lag."""
    w = window or max(1, len(values) // 25)
    out = []
    for i in range(len(values)):
        part = values[max(0, i - w) : i + w + 1]
        out.append(sum(part) / len(part))
    return out


def svg_lines(
    series: dict[str, list[tuple[float, float]]], title: str, xlabel: str = "step", width: int = 560, height: int = 280
) -> str:
    """A line plot of named (x, y) series as an inline SVG string (axes, ticks, legend)."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return f"<p class='note'>{html.escape(title)}: no data</p>"
    left, right, top, bottom = 56, 16, 44, 40
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(0.0, min(p[1] for p in pts)), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img'>",
           f"<text x='{left}' y='16' style='font-weight:bold'>{html.escape(title)}</text>"]  # fmt: skip
    for t in _ticks(y0, y1):
        out.append(f"<line x1='{left}' x2='{width - right}' y1='{sy(t):.1f}' y2='{sy(t):.1f}' stroke='#eee'/>"
                   f"<text x='{left - 6}' y='{sy(t) + 4:.1f}' text-anchor='end'>{t:.4g}</text>")  # fmt: skip
    for t in _ticks(x0, x1):
        out.append(f"<text x='{sx(t):.1f}' y='{height - bottom + 16}' text-anchor='middle'>{t:.4g}</text>")
    out.append(f"<line x1='{left}' x2='{left}' y1='{top}' y2='{height - bottom}' stroke='#999'/>"
               f"<line x1='{left}' x2='{width - right}' y1='{height - bottom}' y2='{height - bottom}' stroke='#999'/>"
               f"<text x='{(left + width - right) / 2}' y='{height - 6}' text-anchor='middle'>{xlabel}</text>")  # fmt: skip
    for k, (name, s) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        out.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.6' points='{path}'/>")
        lx = left + 170 * k
        out.append(
            f"<line x1='{lx}' x2='{lx + 18}' y1='30' y2='30' stroke='{color}' stroke-width='3'/>"
            f"<text x='{lx + 24}' y='34'>{html.escape(name)}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def svg_bars(
    groups: list[str], series: dict[str, list[float | None]], title: str, width: int = 1100, height: int = 300
) -> str:
    """Grouped bars (one group per category, one bar per series) of scores in [0, 1] as an inline SVG."""
    left, right, top, bottom = 44, 10, 54, 56  # top: title and legend above the 100% line
    n = max(len(series), 1)
    gw = (width - left - right) / max(len(groups), 1)
    bw = gw * 0.8 / n

    def sy(v: float) -> float:
        return height - bottom - v * (height - top - bottom)

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img'>",
           f"<text x='{left}' y='16' style='font-weight:bold'>{html.escape(title)}</text>"]  # fmt: skip
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f"<line x1='{left}' x2='{width - right}' y1='{sy(t):.1f}' y2='{sy(t):.1f}' stroke='#eee'/>"
                   f"<text x='{left - 6}' y='{sy(t) + 4:.1f}' text-anchor='end'>{100 * t:.0f}%</text>")  # fmt: skip
    for k, (name, values) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        for g, v in enumerate(values):
            if v is None:
                continue
            x = left + g * gw + gw * 0.1 + k * bw
            out.append(f"<rect x='{x:.1f}' y='{sy(v):.1f}' width='{bw - 1:.1f}' height='{sy(0) - sy(v):.1f}' "
                       f"fill='{color}'><title>{html.escape(name)}: {100 * v:.1f}%</title></rect>"
                f"<text x='{x + bw / 2:.1f}' y='{sy(v) - 3:.1f}' text-anchor='middle'>{100 * v:.0f}</text>")  # fmt: skip
        out.append(f"<rect x='{left + 170 * k}' y='24' width='10' height='10' fill='{color}'/>"
                   f"<text x='{left + 170 * k + 14}' y='33'>{html.escape(name)}</text>")  # fmt: skip
    for g, name in enumerate(groups):
        x = left + (g + 0.5) * gw
        out.append(f"<text x='{x:.1f}' y='{height - bottom + 16}' text-anchor='middle'>{html.escape(name)}</text>")
    out.append("</svg>")
    return "".join(out)


# ---- sections ---------------------------------------------------------------------------------------------------
def loss_curves(train_dir: Path) -> str:
    """CE (text) and MSE (flow matching) per step, raw and smoothed."""
    from training.metrics import read_metrics

    rows = [r for _, r in sorted(read_metrics(train_dir).items())]
    plots = []
    for key, what in (("ce", "text cross-entropy (nats / token)"), ("mse", "flow-matching MSE (per latent element)")):
        raw = [(r["step"], r[key]) for r in rows if r.get(f"{key}_tokens", 1)]
        if raw:
            smoothed = list(zip([x for x, _ in raw], smooth([y for _, y in raw]), strict=True))
            plots.append(svg_lines({f"{key} (per step)": raw, f"{key} (smoothed)": smoothed}, what))
    return f"<div class='plots'>{''.join(plots)}</div>" if plots else "<p class='note'>no training metrics yet</p>"


def phase_table(layout: Layout) -> tuple[list[str], list[list[str]]]:
    rows = []
    for p in PHASES:
        m = layout.marker(p.name)
        done = json.loads(m.read_text()) if m.is_file() else None
        rows.append([p.name, p.title, f"{done['seconds']:.0f}" if done else ("this page" if p.name == "report" else "not finished"),
                     _short(done["result"]) if done else ""])  # fmt: skip
    return ["phase", "what", "wall s", "result"], rows


def _short(result: dict[str, Any]) -> str:
    flat = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in flat.items())[:160]


def data_table(layout: Layout) -> tuple[list[str], list[list[str]]] | None:
    m = layout.marker("data")
    if not m.is_file():
        return None
    subsets = json.loads(m.read_text())["result"]["subsets"]
    rows = [
        [name, str(v.get("prompts", "—")), str(v["records"]), json.dumps(v["rejected"]) if v.get("rejected") else "—"]
        for name, v in subsets.items()
    ]  # fmt: skip (the replayed base records have no prompts or rejections)
    return ["subset", "prompts", "records", "rejected (reason: prompts)"], rows


def strip(traj: Trajectory | None, title: str, note: str = "", failure: dict | None = None, above: str = "") -> str:
    """A trajectory as a row of cards in stream order (`inference.html.trajectory_cards`; it wraps), ending with
    the format failure that ended the stream, if any, as a sentence (`inference.html.format_failure_card`);
    `above`: HTML between the title and the cards."""
    cards = trajectory_cards(traj, lambda i: thumbnail(traj.images[i]), format_failure_card(failure))
    return f"<p><b>{html.escape(title)}</b> <small>{note}</small></p>{above}{cards}"


def _verdict(correct: bool | None) -> str:
    return {True: "<span class='ok'>judged correct</span>", False: "<span class='wrong'>judged wrong</span>",
            None: "not judged"}[correct]  # fmt: skip


REWRITES = ("remove", "swap", "modify")  # the rewrite ops a training example should show, most instructive first


def rewrite_record(layout: Layout) -> Trajectory | None:
    """The first trajectory record with a remove or swap step (else a modify step), found by reading only the
    records' meta; None when the data holds none."""
    import pyarrow.parquet as pq

    from bagel_ft.trajectory import normalize_row

    best: tuple[int, Path, int] | None = None
    for f in sorted(layout.data("trajectories").glob("*.parquet")):
        for i, meta in enumerate(pq.read_table(f, columns=["meta"]).column("meta").to_pylist()):
            ops = {s["op"] for s in json.loads(meta or "{}").get("steps", [])}
            rank = min((REWRITES.index(o) for o in ops if o in REWRITES), default=None)
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, f, i)
        if best is not None and best[0] < 2:
            break
    if best is None:
        return None
    row = pq.read_table(best[1]).slice(best[2], 1).to_pylist()[0]
    return Trajectory.from_row(normalize_row(row))


def rewrite_example(traj: Trajectory) -> str:
    """The strip of a trajectory record with rewrite steps and, for each, the sentence that says why it is there
    (`scene_graphs.describe.explain_rewrite`, from meta.steps)."""
    from scene_graphs import SceneGraph
    from scene_graphs.describe import explain_rewrite

    steps = [(s["op"], SceneGraph.from_json(s["graph"])) for s in traj.meta["steps"]]
    why = [explain_rewrite(steps, k) for k, (op, _) in enumerate(steps) if op != "add"]
    ops = " → ".join(op for op, _ in steps)
    reasons = "".join(f"<p class='why'>{html.escape(w)}</p>" for w in why)  # read first, then seen in the strip
    return strip(traj, traj.prompt, f"trajectory, steps: {ops} (step n = the n-th plan and its draft)", above=reasons)


def data_examples(layout: Layout) -> list[str]:
    """Training records: a trajectory with a remove / swap (else modify) step and why it is there, then an
    inconsistent critique (inspect -> refine -> corrected image) and an inconsistent alignment pair."""
    import pyarrow.parquet as pq

    from bagel_ft.trajectory import normalize_row

    out = []
    rewrite = rewrite_record(layout)
    if rewrite is not None:
        out.append(rewrite_example(rewrite))
    for name in ("trajectories", "critiques", "alignment")[0 if rewrite is None else 1 :]:
        files = sorted(layout.data(name).glob("*.parquet"))
        rows = pq.read_table(files[0]).to_pylist()[:64] if files else []
        records = [Trajectory.from_row(normalize_row(r)) for r in rows]
        if records:
            t = next((r for r in records if r.label == "inconsistent"), records[0])
            out.append(strip(t, t.prompt or "(no prompt)", f"{t.subset}{', ' + t.label if t.label else ''}"))
    return out or ["<p class='note'>the data phase has not run yet</p>"]


def psir_strips(layout: Layout) -> list[str]:
    records = read_jsonl(layout.psir / "records.jsonl")
    if not records:
        return ["<p class='note'>the psir phase has not run yet</p>"]
    out = []
    for r in records:
        traj = load_trajectory(layout.psir / r["trajectory"]) if r.get("trajectory") else None
        cost = r["cost"]
        note = (f"[{r['category']}] {_verdict(r['correct'])}; {cost['images']:.0f} image(s), "
                f"{cost['flow_steps']:.0f} Euler steps, {cost['tokens']:.0f} text tokens; stop: {r['stop_reason']}")  # fmt: skip
        out.append(strip(traj, r["prompt"], note, r.get("failure")))
    return out


COLUMNS = (
    ("base-single", "base, single pass"),
    ("finetuned-single", "fine-tuned, single pass"),
    ("finetuned-psir", "fine-tuned, PSIR (final image)"),
)  # eval run name (EVAL_RUNS) -> column title


SHOWN_REASONS = 2  # judge's reasons shown under an image


def _judged(run: Run, rec: dict[str, Any] | None) -> str:
    """A table cell: the image, the judge's mark and its reasons."""
    if rec is None:
        return "<td class='note'>not drawn yet</td>"
    path = run.path / rec["image"]
    img = (
        f"<img class='cmp' src='{thumbnail(Image.open(path), 128)}' alt='{html.escape(rec['key'])}'>"
        if path.is_file()
        else ""
    )
    mark = "<div class='ok'>✓ correct</div>" if rec["correct"] else "<div class='wrong'>✗ wrong</div>"
    said = rec.get("reasons") or []
    reasons = "".join(f"<div class='reason'>{html.escape(r)}</div>" for r in said[:SHOWN_REASONS])
    if len(said) > SHOWN_REASONS:  # the rest on hover: a row stays about one image high
        rest = html.escape("\n".join(said[SHOWN_REASONS:]))
        reasons += f"<div class='reason more' title='{rest}'>… and {len(said) - SHOWN_REASONS} more</div>"
    return f"<td>{img}{mark}{reasons}</td>"


def stream_row(run: Run, rec: dict[str, Any]) -> str:
    """The PSIR stream behind an eval record as a strip (under a one-line summary), its format failure as a
    sentence; "" for a record without a stream."""
    failure = rec.get("failure")
    if not rec.get("trajectory"):
        if not failure:
            return ""
        return ("<p class='note'>PSIR stream: nothing to show, it broke the format before its first turn was kept</p>"
                f"<div class='strip'>{format_failure_card(failure)}</div>")  # fmt: skip
    try:
        traj = load_trajectory(run.path / rec["trajectory"])
    except (OSError, ValueError) as e:  # FormatError is a ValueError: say so, keep the page
        return f"<p class='reason'>trajectory unreadable: {html.escape(str(e))}</p>"
    cards = trajectory_cards(
        traj, lambda i: thumbnail(traj.images[i]), format_failure_card(failure or traj.meta.get("failure"))
    )
    drafts = sum(t.is_image for t in traj.turns)
    texts, steps = len(traj.turns) - drafts, (rec.get("cost") or {}).get("flow_steps", 0)
    summary = (f"PSIR stream: {drafts} draft{'s' if drafts != 1 else ''}, {texts} text turn{'s' if texts != 1 else ''}, "
               f"{steps:.0f} Euler steps; stopped: {traj.meta.get('stop_reason') or '?'}")  # fmt: skip
    return f"<details open><summary>{html.escape(summary)}</summary>{cards}</details>"


def side_by_side(runs: dict[str, Run]) -> str:
    """One row per ShapesEval prompt (its first sample): the base's image, the fine-tuned single-pass image and the
    fine-tuned PSIR final image, each with the judge's mark and reasons; the PSIR stream's strip below it."""
    by_key = {name: {r["key"]: r for r in run.records} for name, run in runs.items()}
    keys = sorted({k for recs in by_key.values() for k in recs if k.endswith("_00")})
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in COLUMNS)
    rows = [f"<table class='cmp'><tr><th>prompt</th>{head}</tr>"]
    for key in keys:
        rec = next(recs[key] for recs in by_key.values() if key in recs)
        cells = "".join(_judged(runs[n], by_key[n].get(key)) if n in runs else "<td class='note'>not run yet</td>"
                        for n, _ in COLUMNS)  # fmt: skip
        rows.append(f"<tr><td class='prompt'><b>{html.escape(rec['prompt'])}</b><br><small>{html.escape(rec['category'])}"
                    f" · {html.escape(key)}</small></td>{cells}</tr>")  # fmt: skip
        psir = by_key.get("finetuned-psir", {}).get(key)
        stream = stream_row(runs["finetuned-psir"], psir) if psir else ""
        if stream:
            rows.append(f"<tr class='stream'><td colspan='{len(COLUMNS) + 1}'>{stream}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def interval_table(runs: dict[str, Run]) -> tuple[list[str], list[list[str]]]:
    """Each run's images right, score and 95% Wilson interval (demo.reading)."""
    rows = []
    for name, run in runs.items():
        sc = score(run)
        lo, hi = wilson(sc.correct, sc.images)
        rows.append([name, f"{sc.correct} / {sc.images}", f"{100 * sc.rate:.1f}%", f"{100 * lo:.1f}–{100 * hi:.1f}%"])
    return ["run", "images right", "score", "95% interval (Wilson, over images)"], rows


def header(layout: Layout, settings: dict[str, Any], runs: list[Run], train: dict[str, Any]) -> str:
    """What ran, as far as the folder tells (demo.json, else the eval runs' config.json)."""
    config = runs[0].config if runs else {}
    limit, n, seed = (settings.get(k, config.get(c)) for k, c in (("eval_limit", "limit"), ("eval_n", "n"),
                                                                   ("eval_seed", "seed")))  # fmt: skip
    base = html.escape(str(settings.get("base") or "checkpoints/shapes-base"))
    text = f"Base <code>{base}</code>"
    if settings.get("train_config") or train.get("steps"):
        recipe = html.escape(Path(str(settings.get("train_config") or "the demo recipe")).name)
        text += (f" fine-tuned with <code>{recipe}</code> ({train.get('steps', 0)} steps, "
                 f"{train.get('tokens', 0):,} tokens seen)")  # fmt: skip
    if limit is not None:
        text += f"; ShapesEval on the first {limit} prompts of each category, {n} sample(s) each, seed {seed}"
    return text + f". Folder: <code>{html.escape(str(layout.root))}</code>."


# ---- the page ----------------------------------------------------------------------------------------------------
def write_report(root: str | Path) -> Path:
    """Write ROOT/report.html and ROOT/report.md from what the demo folder holds; returns the HTML path."""
    layout = Layout(Path(root))
    settings = json.loads(layout.settings.read_text()) if layout.settings.is_file() else {}
    runs = load_runs([layout.eval(name) for name, _, _ in EVAL_RUNS.values()
                      if (layout.eval(name) / "summary.json").is_file()])  # fmt: skip
    train = training_summary(layout.train)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>bagel-ft demo</title>"
        f"<style>{PAGE_STYLE}</style></head><body>",
        "<h1>bagel-ft demo: Plan → Sketch → Inspect → Refine on the shapes world</h1>",
        f"<p class='note'>{header(layout, settings, runs, train)}</p>",
    ]
    md = ["# bagel-ft demo", ""]

    def table(title: str, t: tuple[list[str], list[list[str]]] | None) -> None:
        if t is not None:
            parts.extend([f"<h3>{html.escape(title)}</h3>", html_table(*t)])
            md.extend([f"### {title}", "", markdown_table(*t), ""])

    named = {r.path.name: r for r in runs}  # eval run name (EVAL_RUNS) -> run
    held_out = read_jsonl(layout.psir / "records.jsonl")
    paragraphs = [" ".join(p) for p in reading(named, held_out)]
    parts += ["<h2>What the numbers say</h2>", *(f"<p class='reading'>{html.escape(p)}</p>" for p in paragraphs)]
    md += ["## What the numbers say", "", *(f"{p}\n" for p in paragraphs)]
    parts.append("<h2>ShapesEval: base vs fine-tuned</h2>")
    md.append("## ShapesEval: base vs fine-tuned\n")
    if runs:
        cats = list(dict.fromkeys(c for r in runs for c in r.summary["categories"]))
        series = {r.label: [r.summary["categories"].get(c, {}).get("score") for c in cats] + [r.summary["overall"]]
                  for r in runs}  # fmt: skip
        parts.append(svg_bars(cats + ["overall"], series, "accuracy per category (judge: exact scene match)"))
        table("Overall, with the spread at this n", interval_table(named))
        table("Scores by category (n = images judged)", score_table(runs))
        table("Sub-accuracies (n = checks)", score_table(runs, key="subscores"))
        table("Inference cost per prompt (images, Euler steps, text tokens, seconds)", cost_table(runs))
        parts.append("<h2>The same prompts, base and fine-tuned</h2>")
        parts.append("<p class='note'>Each ShapesEval prompt drawn by the base and the fine-tuned model (same seed), "
                     "marked by the judge with its reasons; below each row, the PSIR stream that made the last "
                     f"image.{' The first sample of each prompt is shown.' if (settings.get('eval_n') or 1) > 1 else ''}"
                     "</p>")  # fmt: skip
        parts.append(side_by_side(named))
    else:
        parts.append("<p class='note'>no eval run finished yet</p>")
    parts.append("<h2>PSIR on held-out prompts (fine-tuned model)</h2>")
    parts.append(
        "<p class='note'>Prompts outside the training data and ShapesEval; greedy text, the final image "
        "judged against the prompt's scene graph.</p>"
    )
    parts.extend(psir_strips(layout))
    parts.append("<h2>Training</h2>")
    parts.append(loss_curves(layout.train))
    table("Data (data_gen, offline shapes world)", data_table(layout))
    parts.append("<h3>What the model was trained on</h3>")
    parts.extend(data_examples(layout))
    table("Phases (wall time on this machine)", phase_table(layout))
    parts.append("</body></html>")
    page = layout.report
    write_text_atomic(page, "\n".join(parts))
    write_text_atomic(layout.root / "report.md", "\n".join(md))
    return page
