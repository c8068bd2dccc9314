"""Reports: markdown tables per benchmark (n per cell, cost), HTML with trajectory strips and failures."""

import json
import re

import pytest
from PIL import Image

from bagel_ft.cli import main as cli_main
from bagel_ft.trajectory import Trajectory, Turn, inspect_text, plan_text, refine_text
from eval import geneval
from eval.generator import Generation
from eval.run_dir import prepare_run_dir, read_jsonl

LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "counting", "include": [{"class": "clock", "count": 2}], "prompt": "a photo of two clocks"}',
]


class PsirGenerator:
    """Two drafts per prompt: a wrong one, an inspect/refine, a right one; reports its cost."""

    name = "test:psir"

    def __call__(self, prompt, seed):
        wrong, right = Image.new("RGB", (16, 16), (0, 0, 255)), Image.new("RGB", (16, 16), (255, 0, 0))
        turns = [
            Turn("plan", plan_text("draw it", prompt)),
            Turn("image", image=0),
            Turn("inspect", inspect_text("inconsistent", "it is blue")),
            Turn("refine", refine_text("make it red")),
            Turn("image", image=1),
            Turn("inspect", inspect_text("consistent")),
        ]
        traj = Trajectory(prompt=prompt, turns=turns, images=[wrong, right], meta={"seed": seed})
        return Generation(image=right, trajectory=traj, cost={"images": 2, "flow_steps": 100, "tokens": 40})


class SingleGenerator:
    name = "test:single"

    def __call__(self, prompt, seed):
        return Generation(
            image=Image.new("RGB", (16, 16), (0, 0, 255)), cost={"images": 1, "flow_steps": 50, "tokens": 0}
        )


def _geneval_run(tmp_path, name, generator, correct_tags, label):
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(LINES) + "\n")
    out = tmp_path / name
    prepare_run_dir(
        out,
        {
            "benchmark": "geneval",
            "ckpt": f"ckpts/{name}",
            "mode": name,
            "seed": 0,
            "n": 2,
            "label": label,
            "generator": generator.name,
        },
    )
    geneval.generate_geneval(generator, meta, out, n=2, progress=False)
    rows = []
    for p in sorted(out.glob("[0-9]*/samples/*.png")):
        m = json.loads((p.parent.parent / "metadata.jsonl").read_text())
        ok = m["tag"] in correct_tags
        rows.append(
            {
                "filename": str(p),
                "tag": m["tag"],
                "prompt": m["prompt"],
                "correct": ok,
                "reason": "" if ok else "expected clock>=2, found 1",
                "metadata": json.dumps(m),
            }
        )
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    geneval.score_geneval(out, log=lambda s: None)
    return out


def test_report_compares_runs(tmp_path):
    base = _geneval_run(tmp_path, "single", SingleGenerator(), {"single_object"}, label="base single")
    psir = _geneval_run(tmp_path, "psir", PsirGenerator(), {"single_object", "counting"}, label=None)
    assert read_jsonl(psir / "records.jsonl")[0]["trajectory"] == "00000/trajectories/0000.traj"
    out = tmp_path / "report"
    assert cli_main(["report", str(base), str(psir), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## GenEval" in md
    assert "| category | base single | psir/psir |" in md  # labels: --label, else <ckpt name>/<mode>
    assert "| single_object | 100.0% (n=2) | 100.0% (n=2) |" in md
    assert "| counting | 0.0% (n=2) | 100.0% (n=2) |" in md
    assert "| **overall** | **50.0%** | **100.0%** |" in md
    assert "| base single | 4 | 1 | 50 | 0 |" in md  # samples, images, flow steps, tokens per sample
    assert "| psir/psir | 4 | 2 | 100 | 40 |" in md
    page = (out / "report.html").read_text()
    assert "<h3>Sample trajectories</h3>" in page and "&lt;inspect&gt;inconsistent&lt;/inspect&gt;" in page
    assert page.count("draft 2") >= 1 and "Failures (2 of 4 images" in page
    assert "expected clock&gt;=2, found 1" in page
    assert not re.search(r"src=['\"](?!data:)", page)  # every image inlined: the page is self-contained


def test_report_marks_unscored_and_partial_runs(tmp_path):
    from eval.report import load_runs, markdown_report

    run = tmp_path / "wise"
    prepare_run_dir(run, {"benchmark": "wise", "ckpt": "x", "mode": "single", "seed": 0, "label": "w"})
    (run / "summary.json").write_text(
        json.dumps(
            {
                "benchmark": "wise",
                "categories": {"culture": {"score": 0.5, "n": 3}},
                "overall": None,
                "overall_partial": 0.5,
            }
        )
    )
    un = tmp_path / "gen"
    prepare_run_dir(un, {"benchmark": "geneval", "ckpt": "y", "mode": "single", "seed": 0})
    (un / "summary.json").write_text(json.dumps({"benchmark": "geneval", "scored": False, "cost_per_sample": None}))
    md = markdown_report(load_runs([run, un]))
    assert "| culture | 0.500 (n=3) |" in md and "| **overall** | 0.500 (partial) |" in md
    assert "| **overall** | not scored |" in md


def test_report_shapes_sections(tmp_path):
    import pytest

    pytest.importorskip("scene_graphs.shapes")
    runs = []
    for ckpt in ("oracle:shapes", "debug:noise"):
        out = tmp_path / ckpt.replace(":", "-")
        args = ["eval", "shapes", "--ckpt", ckpt, "--out", str(out), "--n", "1", "--limit", "1", "--quiet"]
        assert cli_main(args) == 0
        runs.append(str(out))
    assert cli_main(["report", *runs, "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## ShapesEval" in md and "| category | oracle:shapes/single | debug:noise/single |" in md
    assert "| **overall** | **100.0%** | **0.0%** |" in md
    assert "### Sub-accuracies (n = checks)" in md and "### GenEval's decision rule" in md
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Failures (10 of 10 images" in page  # every noise image rejected, with the judge's reasons


def test_wilson_interval_and_exact_mcnemar_test():
    from eval.intervals import mcnemar, wilson

    lo, hi = wilson(3, 30)  # textbook values (Newcombe 1998, method 3)
    assert abs(lo - 0.0346) < 1e-4 and abs(hi - 0.2562) < 1e-4
    assert wilson(0, 30)[0] == 0.0 and 0.11 < wilson(0, 30)[1] < 0.12  # never the collapsed [0, 0] of p ± 1.96 se
    assert wilson(30, 30)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)
    assert mcnemar(4, 0) == mcnemar(0, 4) == 0.125  # 4 discordant pairs, all one way: not significant
    assert mcnemar(6, 0) == 2 / 64 and mcnemar(0, 0) == 1.0
    assert abs(mcnemar(10, 3) - 2 * 378 / 8192) < 1e-12
    for bad in ((4, 3), (-1, 3)):
        with pytest.raises(ValueError, match="wilson"):
            wilson(*bad)
