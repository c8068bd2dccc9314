"""Compare eval runs: one markdown file of tables and one self-contained HTML page.

For each benchmark among the runs: a table with a row per category (and the overall) and a column per
run, each cell the score and the number of images behind it; the sub-accuracies when the benchmark has
them (ShapesEval); the inference cost per sample when the runs recorded it. The HTML page repeats the
tables and adds, per run, sample trajectories (strips of drafts with their plan / inspect / refine text)
and failures (images the judge rejected, with its reasons). Images are inlined as small thumbnails, so
the page is one file that opens anywhere.

A run is a directory written by `bagel-ft eval` (config.json + summary.json + records.jsonl, see
eval/run_dir.py); rows are labelled by `run_label` (the run's --label, else `<ckpt name>/<mode>`).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from eval.run_dir import (
    RECORDS_FILE,
    SUMMARY_FILE,
    load_trajectory,
    read_config,
    read_jsonl,
    run_label,
    write_text_atomic,
)
from inference.html import CARD_STYLE, data_url, format_failure_card, trajectory_cards
from inference.psir import describe_failure

BENCHMARK_TITLES = {"geneval": "GenEval", "wise": "WISE", "shapes": "ShapesEval"}
PERCENT_BENCHMARKS = ("geneval", "shapes")  # accuracies; WISE reports WiScore in [0, 1]
COST_COLUMNS = (("images", "images"), ("flow_steps", "flow steps"), ("tokens", "tokens"), ("wall_s", "wall s"))
THUMB = 160  # px, longest side of an inlined image


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""

    @property
    def benchmark(self) -> str:
        return self.summary.get("benchmark") or self.config.get("benchmark", "?")


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / SUMMARY_FILE).exists():
        raise FileNotFoundError(f"{path}: no {SUMMARY_FILE} (not an eval run directory, or not scored yet)")
    config = read_config(path)
    return Run(
        path,
        config,
        json.loads((path / SUMMARY_FILE).read_text()),
        read_jsonl(path / RECORDS_FILE),
        run_label(config, path),
    )


def load_runs(paths: list[str | Path]) -> list[Run]:
    runs = [load_run(p) for p in paths]
    labels = [r.label for r in runs]
    for r in runs:  # two runs with one label would be indistinguishable columns
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.path.name})"
    return runs


# ---- tables --------------------------------------------------------------------------------------------
def _fmt(value: float | None, benchmark: str) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}%" if benchmark in PERCENT_BENCHMARKS else f"{value:.3f}"


def _cell(entry: dict | None, benchmark: str) -> str:
    return "—" if not entry else f"{_fmt(entry.get('score'), benchmark)} (n={entry.get('n', 0)})"


def score_table(runs: list[Run], key: str = "categories") -> tuple[list[str], list[list[str]]]:
    """(header, rows): a row per category of `summary[key]` (first-seen order), a column per run."""
    bench = runs[0].benchmark
    names: list[str] = []
    for r in runs:
        names += [c for c in (r.summary.get(key) or {}) if c not in names]
    rows = [[c] + [_cell((r.summary.get(key) or {}).get(c), bench) for r in runs] for c in names]
    if key == "categories":
        rows.append(["**overall**"] + [_overall(r) for r in runs])
    return ["category" if key != "subscores" else "check"] + [r.label for r in runs], rows


def _overall(run: Run) -> str:
    s = run.summary
    if s.get("overall") is not None:
        return f"**{_fmt(s['overall'], run.benchmark)}**"
    if s.get("overall_partial") is not None:  # WISE on a subset of categories
        return f"{_fmt(s['overall_partial'], run.benchmark)} (partial)"
    return "—" if s.get("scored", True) else "not scored"


def cost_table(runs: list[Run]) -> tuple[list[str], list[list[str]]] | None:
    if not any(r.summary.get("cost_per_sample") for r in runs):
        return None
    header = ["run", "samples"] + [f"{title} / sample" for _, title in COST_COLUMNS]
    rows = []
    for r in runs:
        cost = r.summary.get("cost_per_sample") or {}
        n = len(r.records) or r.summary.get("total_images") or "—"
        rows.append([r.label, str(n)] + [f"{cost[k]:.4g}" if k in cost else "—" for k, _ in COST_COLUMNS])
    return header, rows


def config_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    keys = ("ckpt", "mode", "generator", "n", "seed", "limit", "subset")

    def show(v: Any) -> str:
        return "—" if v is None else ",".join(map(str, v)) if isinstance(v, list) else str(v)

    return ["run", *keys], [[r.label] + [show(r.config.get(k)) for k in keys] for r in runs]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(tag: str, text: str) -> str:
        bold = text.startswith("**") and text.endswith("**")
        body = html.escape(text.strip("*") if bold else text)
        return f"<{tag}>{'<b>' + body + '</b>' if bold else body}</{tag}>"

    head = "".join(cell("th", h) for h in header)
    body = "".join("<tr>" + "".join(cell("td", c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _sections(runs: list[Run]) -> list[tuple[str, list[tuple[str, tuple]]]]:
    """(benchmark title, [(table title, (header, rows)), ...]) per benchmark, in first-seen order."""
    by_bench: dict[str, list[Run]] = {}
    for r in runs:
        by_bench.setdefault(r.benchmark, []).append(r)
    sections = []
    for bench, group in by_bench.items():
        tables = [("Scores by category (n = images judged)", score_table(group))]
        if any(r.summary.get("subscores") for r in group):
            tables.append(("Sub-accuracies (n = checks)", score_table(group, key="subscores")))
        if any(r.summary.get("geneval_rule") for r in group):
            tables.append(
                ("GenEval's decision rule on the same images (n = images)", score_table(group, key="geneval_rule"))
            )
        cost = cost_table(group)
        if cost:
            tables.append(("Inference cost per sample (one prompt drawn once)", cost))
        tables.append(("Runs", config_table(group)))
        sections.append((BENCHMARK_TITLES.get(bench, bench), tables))
    return sections


def markdown_report(runs: list[Run]) -> str:
    out = ["# Eval report", ""]
    for title, tables in _sections(runs):
        out += [f"## {title}", ""]
        for name, (header, rows) in tables:
            out += [f"### {name}", "", markdown_table(header, rows), ""]
    return "\n".join(out)


# ---- HTML -----------------------------------------------------------------------------------------------
STYLE = (
    """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f3f3f3; }
.fail { display: inline-block; vertical-align: top; width: 200px; margin: 4px; font-size: 0.8em; }
.reason { color: #b00020; white-space: pre-wrap; } img { image-rendering: pixelated; }
"""
    + CARD_STYLE
)


def thumbnail(image: Image.Image, size: int = THUMB) -> str:
    """A data URL of `image` scaled so its longest side is `size` px."""
    return data_url(image, size)


def trajectory_strip(run: Run, rec: dict[str, Any]) -> str:
    try:
        traj = load_trajectory(run.path / rec["trajectory"])
    except (OSError, ValueError) as e:  # FormatError is a ValueError: show it, keep the report
        return f"<p class='reason'>{html.escape(rec['key'])}: trajectory unreadable: {html.escape(str(e))}</p>"
    verdict = {True: "judged correct", False: "judged wrong", None: "not judged"}[rec.get("correct")]
    return (
        f"<p><b>{html.escape(rec['prompt'])}</b> <small>({html.escape(rec['key'])}, {verdict})</small></p>"
        + trajectory_cards(traj, lambda i: thumbnail(traj.images[i]), format_failure_card(traj.meta.get("failure")))
    )


def failure_card(run: Run, rec: dict[str, Any]) -> str:
    path = run.path / rec["image"]
    img = f"<img src='{thumbnail(Image.open(path))}'>" if path.exists() else "<i>image missing</i>"
    reasons = html.escape("\n".join(rec.get("reasons") or []))
    if rec.get("failure"):  # the PSIR stream broke the format: say how, in words
        reasons += f"\n{html.escape(describe_failure(rec['failure']))}"
    return (
        f"<div class='fail'>{img}<div><b>{html.escape(rec['prompt'])}</b> <small>[{html.escape(rec['category'])}"
        f" {html.escape(rec['key'])}]</small></div><div class='reason'>{reasons}</div></div>"
    )


def html_report(runs: list[Run], max_trajectories: int = 4, max_failures: int = 12) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>bagel-ft eval report</title>",
        f"<style>{STYLE}</style></head><body><h1>Eval report</h1>",
    ]
    for title, tables in _sections(runs):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        for name, (header, rows) in tables:
            parts += [f"<h3>{html.escape(name)}</h3>", html_table(header, rows)]
    for run in runs:
        parts.append(f"<h2>{html.escape(run.label)} <small>{html.escape(str(run.path))}</small></h2>")
        with_traj = [r for r in run.records if r.get("trajectory")][:max_trajectories]
        if with_traj:
            parts.append("<h3>Sample trajectories</h3>")
            parts += [trajectory_strip(run, r) for r in with_traj]
        failures = [r for r in run.records if r.get("correct") is False]
        parts.append(
            f"<h3>Failures ({len(failures)} of {len(run.records)} images; first {min(len(failures), max_failures)})</h3>"
        )
        parts += [failure_card(run, r) for r in failures[:max_failures]]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dirs: list[str | Path], out: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html into `out`; returns their paths."""
    runs = load_runs(run_dirs)
    out = Path(out)
    md, page = out / "report.md", out / "report.html"
    write_text_atomic(md, markdown_report(runs))
    write_text_atomic(page, html_report(runs))
    return md, page
