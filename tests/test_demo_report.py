"""The demo report as a person reads it, on real pages written from a demo folder: the eval runs are real
ShapesEval runs (images, judge, records.jsonl, summary.json) whose images come from stand-in generators (the
shapes oracle as "the base", noise as "fine-tuned single", scripted PSIR streams: a long one, one that broke the
format after a draft, one that broke it at once), and the training data is data_gen's offline trajectories.

Checked: strips wrap and show every draft; format failures read as sentences with their reason; the side-by-side
rows and their judge marks; the paragraph's numbers equal summary.json; the remove / swap example says why;
a partial folder still gives a page."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from bagel_ft.trajectory import Trajectory, Turn, inspect_text, plan_text
from demo.pipeline import Layout, build_subset, data_config, eval_prompt_texts, shapes_eval_run, training_prompts
from demo.report import rewrite_record, write_report
from eval.generator import Generation, NoiseGenerator, ShapesOracleGenerator
from eval.intervals import mcnemar, wilson
from inference.psir import classify, describe_failure
from scene_graphs import SceneGraph
from scene_graphs.describe import explain_rewrite

SUBSET, LIMIT = ["position", "color_attr", "counting"], 2  # 6 ShapesEval prompts, one image each
NAMES = {"base-single": "the base model", "finetuned-single": "the fine-tuned model in a single pass",
         "finetuned-psir": "the fine-tuned model with the PSIR loop"}  # fmt: skip


class ScriptedPsir:
    """PSIR-like streams, one kind per call in turn: (0) five drafts with a plan and an inspect each, the oracle's
    picture last; (1) one draft, then a plan turn with an unbalanced <ins> (the reason from inference.psir's own
    classify); (2) an untagged first turn: nothing kept, no image."""

    name = "test:scripted-psir"

    def __init__(self):
        self.calls, self.oracle = 0, ShapesOracleGenerator(size=64)

    def __call__(self, prompt: str, seed: int) -> Generation:
        kind, self.calls = self.calls % 3, self.calls + 1
        final = self.oracle(prompt, seed).image
        if kind == 0:
            images = [Image.new("RGB", (64, 64), (50 * i, 90, 120)) for i in range(4)] + [final]
            turns = []
            for i in range(5):
                verdict = (
                    inspect_text("consistent") if i == 4 else inspect_text("inconsistent", f"draft {i + 1} is off")
                )
                turns += [
                    Turn("plan", plan_text(f"step {i + 1}", prompt)),
                    Turn("image", image=i),
                    Turn("inspect", verdict),
                ]
            traj = Trajectory(prompt, turns, images, meta={"stop_reason": "end_of_text"})
            return Generation(final, traj, {"images": 5, "flow_steps": 120, "tokens": 300})
        text = "<ins>draw a " + prompt if kind == 1 else prompt
        failure = {"step": 1 if kind == 1 else 0, "reason": classify(text)[1], "text": text}
        turns = [Turn("plan", plan_text("draw it", prompt)), Turn("image", image=0)] if kind == 1 else []
        traj = Trajectory(
            prompt, turns, [final] if turns else [], meta={"stop_reason": "format_failure", "failure": failure}
        )
        return Generation(final if turns else None, traj, {"images": len(turns) // 2, "flow_steps": 0, "tokens": 20})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo-report")
    layout = Layout(root)
    prompts = training_prompts(6, 0, eval_prompt_texts())
    build_subset("trajectories", prompts, layout.data("trajectories"), data_config(64, ["pipeline.edit_prob=1.0"]), 0)
    for name, mode, gen in (("base-single", "single", ShapesOracleGenerator(size=64)),
                            ("finetuned-single", "single", NoiseGenerator(size=64)),
                            ("finetuned-psir", "psir", ScriptedPsir())):  # fmt: skip
        shapes_eval_run(Path("stand-in"), mode, layout.eval(name), {}, LIMIT, 1, 0, name, SUBSET, False, gen)
    write_report(root)
    return root


def page_of(root: Path) -> str:
    return Layout(root).report.read_text()


def records(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (Layout(root).eval(name) / "records.jsonl").read_text().splitlines()]


def test_strips_wrap_and_show_every_draft(folder):
    page = page_of(folder)
    assert re.search(r"\.strip \{[^}]*flex-wrap: wrap", page) and "overflow-x" not in page
    long = next(s for s in re.findall(r"<details open>(.*?)</details>", page, re.S) if "5 drafts" in s)
    assert "PSIR stream: 5 drafts, 10 text turns" in long
    assert [f">draft {i}<" in long for i in range(1, 6)] == [True] * 5 and long.count("<img") == 5
    assert long.count('class="card inspect"') == 5 and long.count('class="card plan"') == 5


def test_format_failures_read_as_sentences_with_their_reason(folder):
    page = page_of(folder)
    psir = records(folder, "finetuned-psir")
    failures = [r["failure"] for r in psir if r.get("failure")]
    assert len(failures) == 4  # kinds 1 and 2 of 6 streams; recorded even when the stream kept no turn
    for f in failures:
        assert html.escape(describe_failure(f)) in page
    assert html.escape("The stream stopped at text turn 2: the turn opened <ins> once but closed it 0 times.") in page
    assert html.escape("The stream stopped at text turn 1: the turn had none of the PSIR tags") in page
    assert "&quot;reason&quot;" not in page and '"reason":' not in page  # no JSON


def test_side_by_side_rows_mark_each_image_as_judged(folder):
    page = page_of(folder)
    table = re.search(r"<table class='cmp'>(.*?)</table>", page, re.S)[1]
    runs = {name: records(folder, name) for name in NAMES}
    keys = sorted(r["key"] for r in runs["base-single"])
    assert len(keys) == LIMIT * len(SUBSET) and all(html.escape(k) in table for k in keys)
    assert table.count("<img class='cmp'") == 3 * len(keys)  # base, fine-tuned single, fine-tuned PSIR per prompt
    right = sum(r["correct"] for recs in runs.values() for r in recs)
    assert table.count("✓ correct") == right and table.count("✗ wrong") == 3 * len(keys) - right
    assert table.count("<tr class='stream'>") == len(keys)  # every PSIR record has a stream or a failure to show


def test_paragraph_numbers_match_summary_json(folder):
    text = html.unescape(" ".join(re.findall(r"<p class='reading'>(.*?)</p>", page_of(folder))))
    runs = {name: records(folder, name) for name in NAMES}
    for name, said in NAMES.items():
        summary = json.loads((Layout(folder).eval(name) / "summary.json").read_text())
        m = re.search(rf"{said} got (\d+) of (\d+) images right \(([\d.]+)%, 95% interval (\d+)–(\d+)%\)", text)
        k, n = int(m[1]), int(m[2])
        assert n == summary["total_images"] and k == round(summary["correct_images"] * n)
        assert m[3] == f"{100 * summary['overall']:.1f}"  # equal prompts per category: overall = k / n
        assert (int(m[4]), int(m[5])) == tuple(round(100 * x) for x in wilson(k, n))
    assert "at n = 6 one image is 16.7 points" in text
    base = {r["key"]: r["correct"] for r in runs["base-single"]}
    wins = sum(r["correct"] and not base[r["key"]] for r in runs["finetuned-single"])
    losses = sum(base[r["key"]] and not r["correct"] for r in runs["finetuned-single"])
    assert f"the single pass against the base {100 * (wins - losses) / 6:+.1f} points ({wins} vs {losses}, " \
           f"p = {mcnemar(wins, losses):.2f})".replace("-", "−") in text  # fmt: skip
    significant = mcnemar(wins, losses) < 0.05 and wins != losses
    assert ("the single pass loses against the base by more than chance" in text) == (significant and losses > wins)
    assert ("None of these differences is larger than chance" in text) != ("Only the " in text)
    assert "4 of its 6 streams stopped on a format failure and 2 drew no image" in text
    from demo.reading import FULL_SHAPES_EVAL
    from eval.shapes_eval import load_prompts

    assert FULL_SHAPES_EVAL == len(load_prompts()) == 40 * 10  # "--eval-limit 40" in the closing sentence
    md = (folder / "report.md").read_text()
    assert "## What the numbers say" in md and "95% interval" in md


def test_the_remove_or_swap_example_says_why_each_rewrite_is_there(folder):
    page = page_of(folder)
    traj = rewrite_record(Layout(folder))
    steps = [(s["op"], SceneGraph.from_json(s["graph"])) for s in traj.meta["steps"]]
    assert {"remove", "swap"} & {op for op, _ in steps}  # edit_prob=1: the data holds such a record
    assert html.escape(traj.prompt) in page
    for k, (op, _) in enumerate(steps):
        if op != "add":
            why = explain_rewrite(steps, k)
            assert f"so that step {k + 1} can teach" in why and f"<p class='why'>{html.escape(why)}</p>" in page


def test_a_partial_folder_still_gives_a_page(folder, tmp_path):
    layout = Layout(tmp_path)
    shutil.copytree(Layout(folder).eval("base-single"), layout.eval("base-single"))
    page = write_report(tmp_path).read_text()
    assert page.rstrip().endswith("</html>") and "not run yet" in page
    assert "the data phase has not run yet" in page and "the psir phase has not run yet" in page
    text = html.unescape(" ".join(re.findall(r"<p class='reading'>(.*?)</p>", page)))
    assert text.startswith("On 6 ShapesEval prompts") and "McNemar" not in text  # one run: nothing to compare


def test_eval_report_shows_the_same_failures_as_sentences(folder, tmp_path):
    from eval.report import write_report as write_eval_report

    _, page = write_eval_report([Layout(folder).eval(n) for n in NAMES], tmp_path)
    text = page.read_text()
    for f in (r["failure"] for r in records(folder, "finetuned-psir") if r.get("failure")):
        assert html.escape(describe_failure(f)) in text


def test_data_table_lists_the_replayed_base_records(tmp_path):
    """The demo's data phase records the replayed base records (`--replay`) by their count only."""
    from demo.report import data_table

    layout = Layout(tmp_path)
    layout.marker("data").parent.mkdir(parents=True)
    subsets = {
        "trajectories": {"prompts": 4, "records": 3, "rejected": {"plan_too_short": 1}},
        "replay": {"records": 40},
    }
    layout.marker("data").write_text(json.dumps({"result": {"subsets": subsets}}))
    head, rows = data_table(layout)
    assert rows == [["trajectories", "4", "3", '{"plan_too_short": 1}'], ["replay", "—", "40", "—"]]
