"""demo.reproduce's pieces without training: the phase order (the psir arm before the critiques it drafts), the
single-pass arm's t2i records, the ablation's sketches, the replay mixture, the bootstrap intervals and the
table (mean [95% interval], sub-accuracies ± half-range over seeds, tokens per arm)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from demo.reproduce import ARMS, Repro, ReproSettings, bootstrap_ci, markdown, phases, spread, write_sketches, write_t2i


def test_phase_order_trains_the_psir_arm_before_its_critiques_and_evaluates_every_arm():
    names = [p.name for p in phases(ReproSettings(out="x", seeds=[0, 1]))]
    assert names[:3] == ["data", "train-psir-s0", "critiques"]
    assert {f"train-{a}-s{s}" for a in ARMS for s in (0, 1)} <= set(names)
    assert max(i for i, n in enumerate(names) if n.startswith("train-")) < min(
        i for i, n in enumerate(names) if n.startswith("eval-")
    )
    assert {"eval-base-s0-single", "eval-single-s1-single", "eval-psir-s0-psir", "eval-psir_crit-s1-psir"} <= set(names)
    assert names[-1] == "table" and len(names) == len(set(names))


@pytest.fixture(scope="module")
def trajectories_dir(tmp_path_factory):
    from data_gen import trajectories
    from data_gen.config import load_config
    from data_gen.runner import run_pipeline

    out = tmp_path_factory.mktemp("traj")
    prompts = ["a red circle to the left of a blue square", "two green triangles"]
    cfg = load_config(None, ["pipeline.image_size=64"])
    asyncio.run(run_pipeline(trajectories.NAME, trajectories.build, cfg, prompts, out))
    return out


def test_sketches_keep_plans_and_images_and_only_the_closing_inspect(trajectories_dir, tmp_path):
    from training.data import RecordTable

    assert write_sketches(trajectories_dir, tmp_path / "sk") == 2
    traj, sk = RecordTable(trajectories_dir), RecordTable(tmp_path / "sk")
    by_prompt = {traj.get(i).prompt: traj.get(i) for i in range(len(traj))}
    for i in range(len(sk)):
        rec, full = sk.get(i), by_prompt[sk.get(i).prompt]
        assert sum(t.role == "inspect" for t in full.turns) > 1  # the full loop inspects every step
        assert [t.role for t in rec.turns if t.role != "inspect"] == [t.role for t in full.turns if t.role != "inspect"]
        assert [t.role for t in rec.turns].count("inspect") == 1 and rec.turns[-1].role == "inspect"
        assert len(rec.images) == len(full.images)


def test_replay_takes_its_share_of_every_arm(tmp_path):
    r = Repro.__new__(Repro)
    r.s = ReproSettings(out=tmp_path, replay=0.25)
    for arm in ARMS:
        sources = r.sources(arm)
        replay = [s for s in sources if s["path"].startswith("data/replay/")]
        assert abs(sum(s["weight"] for s in replay) - 0.25) < 1e-9 and abs(sum(s["weight"] for s in sources) - 1) < 1e-9
        assert {s["path"].split("/")[-1] for s in replay} >= {"t2i", "edit", "verdict"}
    r.s = ReproSettings(out=tmp_path, replay=0.0)
    assert r.sources("psir") == ARMS["psir"][0]


def test_bootstrap_interval_covers_the_mean_and_narrows_with_prompts():
    def records(n: int, k: int) -> list[dict]:  # n prompts per category, the first k of them right
        return [{"key": f"{c * 100 + i:05d}_00", "category": cat, "correct": i < k}
                for c, cat in enumerate(("a", "b")) for i in range(n)]  # fmt: skip

    small, large = bootstrap_ci({0: records(10, 5)}), bootstrap_ci({0: records(40, 20), 1: records(40, 20)})
    for ci in (small, large):
        assert ci["overall"][0] < 0.5 < ci["overall"][1] and ci["a"][0] <= 0.5 <= ci["a"][1]
    assert large["overall"][1] - large["overall"][0] < small["overall"][1] - small["overall"][0]
    assert bootstrap_ci({0: records(10, 10)})["overall"] == [1.0, 1.0]


def test_t2i_records_are_the_trajectories_final_images(trajectories_dir, tmp_path):
    from training.data import RecordTable

    assert write_t2i(trajectories_dir, tmp_path / "t2i") == 2
    traj, t2i = RecordTable(trajectories_dir), RecordTable(tmp_path / "t2i")
    by_prompt = {traj.get(i).prompt: traj.get(i) for i in range(len(traj))}
    for i in range(len(t2i)):
        rec = t2i.get(i)
        assert rec.subset == "t2i" and [t.role for t in rec.turns] == ["image"] and rec.turns[0].loss
        assert rec.images[0].tobytes() == by_prompt[rec.prompt].final_image().tobytes()


def test_table_reports_mean_and_half_range_over_seeds():
    def summary(overall: float, position: float) -> dict:
        return {"overall": overall, "categories": {"position": {"score": position}, "color_attr": {"score": 0.5}},
                "subscores": {"position": {"score": position}}}  # fmt: skip

    scores = spread({0: summary(0.2, 0.25), 1: summary(0.4, 0.75)})
    assert abs(scores["overall"]["mean"] - 0.3) < 1e-9 and abs(scores["overall"]["half_range"] - 0.1) < 1e-9
    assert scores["position"]["values"] == [0.25, 0.75] and scores["sub:position"]["mean"] == 0.5
    row = {"arm": "psir", "mode": "psir", "seeds": [0, 1], "scores": scores,
           "cost": {"images": 3.5, "flow_steps": 87.5}, "streams": {"no_image": 0.25, "format_failure": 0.0, "plan_ok": 0.5, "draws_plan": 0.5}, "train": {0: {"tokens": 1000}, 1: {"tokens": 1200}}}  # fmt: skip
    table = markdown({"rows": [row]})
    assert "| psir | psir | 30.0 | 50.0 | 50.0 |" in table  # no records: no interval
    row["ci"] = {"overall": [0.1, 0.5], "position": [0.0, 1.0]}
    assert "| psir | psir | 30.0 [10.0, 50.0] | 50.0 [0.0, 100.0] | 50.0 | — | 50.0 ± 25.0 |" in markdown(
        {"rows": [row]}
    )
    assert "3.50 | 88 | 1,000, 1,200 |" in table
    assert "| psir | 25% | 0% | 50% | 50% |" in table  # where the PSIR streams go wrong
    json.dumps(row)  # results.json stays serialisable


def test_runs_of_one_seed_each_merge_into_one_table(tmp_path):
    from demo.pipeline import DemoError, Layout
    from demo.reproduce import merge_runs

    def run(root, seed: int, steps: int = 800) -> None:
        settings = ReproSettings(out="", seeds=[seed], arms=["single"], steps=steps).identity()
        root.mkdir(parents=True)
        Layout(root).settings.write_text(json.dumps(settings))
        for arm in ("base", "single"):
            ev = root / "eval" / f"{arm}-s{seed}-single"
            ev.mkdir(parents=True)
            right = seed if arm == "single" else 0  # the single arm gets `seed` of its 2 prompts right
            recs = [{"key": f"{i:05d}_00", "category": "colors", "correct": i < right} for i in range(2)]
            (ev / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            summary = {"overall": right / 2, "categories": {"colors": {"score": right / 2}}, "subscores": {},
                       "cost_per_sample": {"images": 1.0, "flow_steps": 25.0}}  # fmt: skip
            (ev / "summary.json").write_text(json.dumps(summary))
        arm_dir = root / "arms" / f"single-s{seed}"
        arm_dir.mkdir(parents=True)
        metrics = {"step": 1, "tokens": 100 + seed, "ce_tokens": 1, "mse_tokens": 1, "ce": 1.0, "mse": 1.0,
                   "step_time_s": 1.0}  # fmt: skip
        (arm_dir / "metrics.jsonl").write_text(json.dumps(metrics) + "\n")

    run(tmp_path / "s0", 0)
    run(tmp_path / "s1", 1)
    results = merge_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    rows = {(r["arm"], r["mode"]): r for r in results["rows"]}
    assert rows[("single", "single")]["seeds"] == [0, 1]
    assert rows[("single", "single")]["scores"]["overall"]["values"] == [0.0, 0.5]
    assert "| single | single | 25.0 [" in (tmp_path / "merged" / "results.md").read_text()
    assert "100, 101" in (tmp_path / "merged" / "results.md").read_text()  # each seed's own training run
    run(tmp_path / "other", 2, steps=400)
    with pytest.raises(DemoError, match="steps"):
        merge_runs([tmp_path / "s0", tmp_path / "other"], tmp_path / "bad")


def test_stream_diagnostics_compare_first_and_final_drafts_and_grade_the_inspect_turns(tmp_path):
    """Two hand-made PSIR streams for "a red circle", drawn by the shapes world's exact renderer: one draws it
    first and then adds a square (the loop made it worse); one over-plans and says "consistent" of a wrong image."""
    from bagel_ft.trajectory import Trajectory, Turn, inspect_text
    from demo.reproduce import stream_diagnostics
    from eval.run_dir import save_trajectory
    from scene_graphs.shapes import parse_prompt, render

    def picture(text: str):
        return render(parse_prompt(text), 64, seed=0)[0]

    def plan(des: str) -> Turn:
        return Turn("plan", f"<ins>draw {des}</ins><des>{des}</des>")

    circle, both = picture("a red circle"), picture("a red circle and a blue square")
    worse = Trajectory("a red circle", [plan("a red circle"), Turn("image", image=0), Turn("inspect", inspect_text("consistent")),
                                        plan("a red circle and a blue square"), Turn("image", image=1),
                                        Turn("inspect", inspect_text("inconsistent", "a square is extra"))],
                       images=[circle, both])  # fmt: skip
    blind = Trajectory("a red circle", [plan("a red circle and a blue square"), Turn("image", image=0),
                                        Turn("inspect", inspect_text("consistent"))], images=[circle])  # fmt: skip
    rows = []
    for key, traj in (("a", worse), ("b", blind)):
        save_trajectory(tmp_path / f"{key}.traj", traj)
        rows.append({"key": key, "prompt": "a red circle", "trajectory": f"{key}.traj"})
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    d = stream_diagnostics(tmp_path)
    assert d["first_right"] == 1.0 and d["final_right"] == 0.5  # both first drafts are right; one final is not
    assert d["overplans"] == 0.5 and d["no_image"] == 0.0
    assert d["says_consistent"] == 2 / 3  # of 3 inspect turns
    # right: "consistent" of the circle under "a red circle"; wrong: "inconsistent" of the circle + square under the
    # plan naming both (the judge finds they agree), "consistent" of a lone circle under the plan naming both
    assert d["inspect_right"] == 1 / 3
    assert d["plan_ok"] == 0.0 and d["draws_plan"] == 0.5


def test_inspect_probe_grades_the_base_and_the_streams_on_the_same_pairs(tmp_path):
    """demo.inspect_probe on a hand-made PSIR run: one right and one wrong draft, both inspected "consistent"; the
    shipped base answers the verdict question about each (a real decode), graded against the exact judge."""
    from bagel_ft.trajectory import Trajectory, Turn, inspect_text
    from demo.inspect_probe import balanced, inspect_pairs, probe
    from eval.run_dir import save_trajectory
    from scene_graphs.shapes import parse_prompt, render

    circle = render(parse_prompt("a red circle"), 64, seed=0)[0]
    for key, des in (("right", "a red circle"), ("wrong", "a blue square")):
        turns = [Turn("plan", f"<ins>draw {des}</ins><des>{des}</des>"), Turn("image", image=0),
                 Turn("inspect", inspect_text("consistent"))]  # fmt: skip
        save_trajectory(tmp_path / f"{key}.traj", Trajectory("a red circle", turns, images=[circle]))
    rows = [{"key": k, "prompt": "a red circle", "trajectory": f"{k}.traj"} for k in ("right", "wrong")]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    pairs = inspect_pairs(tmp_path, limit=10)
    assert [(p["text"], p["truth"], p["stream"]) for p in pairs] == [
        ("a red circle", True, True),
        ("a blue square", False, True),
    ]
    assert balanced([True, True], [True, False]) == 0.5 and balanced([True, False], [True, False]) == 1.0
    r = probe(Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-base", tmp_path, limit=10)
    assert r["pairs"] == 2 and r["judges"]["stream's own inspect"]["balanced"] == 0.5
    assert set(r["judges"]) == {"base (verdict form)", "stream's own inspect", "always consistent"}
    assert r["unparsed_base_answers"] == 0  # the base answers in its verdict form
