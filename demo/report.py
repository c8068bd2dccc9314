"""The demo's report: one self-contained HTML page (and the tables as markdown) from a demo folder.

    from demo.report import write_report
    write_report("runs/demo")            # -> runs/demo/report.html (+ report.md)

Sections: what ran (phase wall times, data, training); ShapesEval base vs fine-tuned (per-category scores as a
bar chart and tables, sub-accuracies, inference cost per prompt — eval.report's tables); the training loss
curves (inline SVG drawn here); the PSIR trajectories on held-out prompts as strips with their plan / inspect /
refine text (eval.report's strips), and a few ShapesEval position / attribute-binding trajectories. Everything
is read from disk (demo.pipeline.Layout), so the page can be rebuilt from a finished or partial folder.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from bagel_ft.trajectory import Trajectory
from demo.pipeline import EVAL_RUNS, PHASES, Layout, training_summary
from eval.report import STYLE, Run, cost_table, html_table, load_runs, markdown_table, score_table, thumbnail
from eval.run_dir import load_trajectory, read_jsonl, write_text_atomic
from inference.html import trajectory_cards

COLORS = ("#9aa0a6", "#4285f4", "#ea4335", "#34a853", "#fbbc04", "#a142f4")  # series colours, in order
PAGE_STYLE = (
    STYLE
    + """
body { max-width: 1200px; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.plots { display: flex; gap: 16px; flex-wrap: wrap; } svg text { font: 11px system-ui, sans-serif; fill: #333; }
.note { color: #555; font-size: 0.9em; max-width: 900px; } .failure { background: #fdecea; }
.card img { width: 128px; } .ok { color: #188038; } .wrong { color: #b00020; }
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
    left, right, top, bottom = 44, 10, 40, 56
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
    rows = [[name, str(v["prompts"]), str(v["records"]), json.dumps(v["rejected"]) if v["rejected"] else "—"]
            for name, v in subsets.items()]  # fmt: skip
    return ["subset", "prompts", "records", "rejected (reason: prompts)"], rows


def strip(traj: Trajectory | None, title: str, note: str = "", failure: dict | None = None) -> str:
    """A trajectory as a row of cards in stream order (`inference.html.trajectory_cards`), ending with the
    format failure that ended the stream, if any, and the text the model wrote."""
    extra = ""
    if failure:
        extra = (f"<div class='card failure'><div class='role'>format failure</div><pre>"
                 f"{html.escape(failure.get('reason', ''))}\n\nwrote: {html.escape(failure.get('text', '')[:300])!s}"
                 f"</pre></div>")  # fmt: skip
    cards = trajectory_cards(traj, lambda i: thumbnail(traj.images[i]), extra)
    return f"<p><b>{html.escape(title)}</b> <small>{note}</small></p>{cards}"


def _verdict(correct: bool | None) -> str:
    return {True: "<span class='ok'>judged correct</span>", False: "<span class='wrong'>judged wrong</span>",
            None: "not judged"}[correct]  # fmt: skip


def data_examples(layout: Layout) -> list[str]:
    """One training record per subset, preferring the instructive ones: a trajectory with a modify / swap /
    remove edit, an inconsistent critique (inspect -> refine -> corrected image), an inconsistent alignment pair."""
    import pyarrow.parquet as pq

    from bagel_ft.trajectory import normalize_row

    def wanted(t: Trajectory) -> bool:
        if t.subset == "trajectory":
            return any(s["op"] in ("modify", "swap", "remove") for s in t.meta.get("steps", []))
        return t.label == "inconsistent"

    out = []
    for name in ("trajectories", "critiques", "alignment"):
        files = sorted(layout.data(name).glob("*.parquet"))
        rows = pq.read_table(files[0]).to_pylist()[:64] if files else []
        records = [Trajectory.from_row(normalize_row(r)) for r in rows]
        if records:
            t = next((r for r in records if wanted(r)), records[0])
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


def eval_strips(run: Run, categories: tuple[str, ...] = ("position", "color_attr"), per_category: int = 2) -> list[str]:
    out = []
    for c in categories:
        recs = [r for r in run.records if r["category"] == c and r.get("trajectory")][:per_category]
        for r in recs:
            traj = load_trajectory(run.path / r["trajectory"])
            out.append(strip(traj, r["prompt"], f"[{c}] {_verdict(r.get('correct'))}", traj.meta.get("failure")))
    return out or ["<p class='note'>no PSIR trajectory in these categories (the streams wrote nothing valid)</p>"]


# ---- the page ----------------------------------------------------------------------------------------------------
def write_report(root: str | Path) -> Path:
    """Write ROOT/report.html and ROOT/report.md from what the demo folder holds; returns the HTML path."""
    layout = Layout(Path(root))
    settings = json.loads(layout.settings.read_text()) if layout.settings.is_file() else {}
    runs = load_runs([layout.eval(name) for name, _, _ in EVAL_RUNS.values()
                      if (layout.eval(name) / "summary.json").is_file()])  # fmt: skip
    train = training_summary(layout.train)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>bagel-ft demo</title>"
             f"<style>{PAGE_STYLE}</style></head><body>",
             "<h1>bagel-ft demo: Plan → Sketch → Inspect → Refine on the shapes world</h1>",
             f"<p class='note'>Base <code>{html.escape(str(settings.get('base') or 'checkpoints/shapes-base'))}</code>"
             f" fine-tuned with <code>{html.escape(Path(str(settings.get('train_config', ''))).name)}</code> "
             f"({train.get('steps', 0)} steps, {train.get('tokens', 0):,} tokens seen); ShapesEval on the first "
             f"{settings.get('eval_limit')} prompts of each category, {settings.get('eval_n')} sample(s) each, "
             f"seed {settings.get('eval_seed')}. Folder: <code>{html.escape(str(layout.root))}</code>.</p>"]  # fmt: skip
    md = ["# bagel-ft demo", ""]

    def table(title: str, t: tuple[list[str], list[list[str]]] | None) -> None:
        if t is not None:
            parts.extend([f"<h3>{html.escape(title)}</h3>", html_table(*t)])
            md.extend([f"### {title}", "", markdown_table(*t), ""])

    parts.append("<h2>ShapesEval: base vs fine-tuned</h2>")
    md.append("## ShapesEval: base vs fine-tuned\n")
    if runs:
        cats = list(dict.fromkeys(c for r in runs for c in r.summary["categories"]))
        series = {r.label: [r.summary["categories"].get(c, {}).get("score") for c in cats] + [r.summary["overall"]]
                  for r in runs}  # fmt: skip
        parts.append(svg_bars(cats + ["overall"], series, "accuracy per category (judge: exact scene match)"))
        table("Scores by category (n = images judged)", score_table(runs))
        table("Sub-accuracies (n = checks)", score_table(runs, key="subscores"))
        table("Inference cost per prompt (images, Euler steps, text tokens, seconds)", cost_table(runs))
    else:
        parts.append("<p class='note'>no eval run finished yet</p>")
    parts.append("<h2>PSIR on held-out prompts (fine-tuned model)</h2>")
    parts.append(
        "<p class='note'>Prompts outside the training data and ShapesEval; greedy text, the final image "
        "judged against the prompt's scene graph.</p>"
    )
    parts.extend(psir_strips(layout))
    psir_run = next((r for r in runs if r.config.get("mode") == "psir"), None)
    if psir_run is not None:
        parts.append("<h2>ShapesEval trajectories: position and attribute binding</h2>")
        parts.extend(eval_strips(psir_run))
    parts.append("<h2>Training</h2>")
    parts.append(loss_curves(layout.train))
    table("Data (data_gen, offline shapes world)", data_table(layout))
    parts.append("<h3>What the model was trained on (one record per subset)</h3>")
    parts.extend(data_examples(layout))
    table("Phases (wall time on this machine)", phase_table(layout))
    parts.append("</body></html>")
    page = layout.report
    write_text_atomic(page, "\n".join(parts))
    write_text_atomic(layout.root / "report.md", "\n".join(md))
    return page
