"""ShapesEval: the oracle generator scores 100% end to end, a wrong generator fails with reasons and the
right sub-accuracies, the summary matches hand-computed values, and generation resumes image by image."""

import json

import pytest
from PIL import Image

from commands.main import main as cli_main
from eval import shapes_eval
from eval.generator import Generation, ShapesOracleGenerator
from eval.run_dir import read_jsonl

shapes = pytest.importorskip("scene_graphs.shapes")


class WrongColorGenerator:
    """Draws the prompt's scene exactly, but every colored object in the wrong color."""

    name = "test:wrong-color"

    def __call__(self, prompt, seed):
        graph = shapes.parse_prompt(prompt)
        for obj in graph.objects:
            if "color" in obj.attributes:
                obj.attributes["color"] = "white" if obj.attributes["color"] != "white" else "black"
        image, _ = shapes.render(graph, size=64, seed=seed)
        return Generation(image=image, cost={"images": 1, "flow_steps": 25, "tokens": 0})


class CountingBlank:
    name = "test:blank"

    def __init__(self):
        self.calls = 0

    def __call__(self, prompt, seed):
        self.calls += 1
        return Generation(image=Image.new("RGB", (64, 64), (140, 140, 140)))


def test_prompt_set_is_the_fixed_published_one():
    prompts = shapes_eval.load_prompts()
    assert len(prompts) == len(shapes.shapes_eval_prompts())
    cats = [p["category"] for p in prompts]
    assert set(shapes.GENEVAL_CATEGORIES) <= set(cats) and set(cats) == set(shapes.CATEGORIES)
    assert shapes_eval.load_prompts() == prompts  # fixed: the same on every call
    sel = shapes_eval.select_prompts(prompts, subset=["counting", "position"], limit=3)
    assert [p["category"] for p in sel] == ["counting"] * 3 + ["position"] * 3
    with pytest.raises(ValueError, match="unknown ShapesEval categories"):
        shapes_eval.select_prompts(prompts, subset=["colours"])


def test_oracle_scores_everything_via_cli(tmp_path, capsys):
    out = tmp_path / "oracle"
    assert (
        cli_main(
            ["eval", "shapes", "--ckpt", "oracle:shapes", "--out", str(out), "--n", "2", "--limit", "2", "--quiet"]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["categories"]) == set(shapes.CATEGORIES)
    assert all(c["n"] == 4 and c["score"] == 1.0 for c in summary["categories"].values())  # 2 prompts x 2 samples
    assert summary["overall"] == 1.0 and summary["total_images"] == 40
    assert all(v["score"] == 1.0 for v in summary["subscores"].values())
    assert set(summary["subscores"]) == {"shape", "color", "count", "position"}
    assert set(summary["geneval_rule"]) == set(shapes.GENEVAL_CATEGORIES)
    assert all(c["score"] == 1.0 for c in summary["geneval_rule"].values())
    records = read_jsonl(out / "records.jsonl")
    assert len(records) == 40 and records[0]["key"] == "00000_00" and records[0]["seed"] == 0
    assert json.loads((out / "config.json").read_text())["generator"] == "oracle:shapes"
    assert "overall" in capsys.readouterr().out


def test_wrong_colors_fail_with_reasons(tmp_path):
    prompts = shapes_eval.select_prompts(shapes_eval.load_prompts(), subset=["colors", "two_object"], limit=2)
    out = tmp_path / "wrong"
    shapes_eval.generate_shapes(WrongColorGenerator(), prompts, out, n=1, progress=False)
    summary = shapes_eval.score_shapes(out, prompts, n=1, progress=False)
    assert summary["categories"]["colors"]["score"] == 0.0
    assert summary["categories"]["two_object"]["score"] == 1.0  # no colors asked: nothing wrong
    assert summary["subscores"]["color"] == {"score": 0.0, "n": 2}
    assert summary["subscores"]["shape"] == {"score": 1.0, "n": 2 + 4}
    bad = [r for r in read_jsonl(out / "records.jsonl") if not r["correct"]]
    assert len(bad) == 2 and all(r["reasons"] for r in bad)
    assert summary["cost_per_sample"]["flow_steps"] == 25


def test_summary_by_hand():
    def rec(cat, ok, checks, rule=None):
        r = {"category": cat, "correct": ok, "score": 1.0 if ok else 0.5, "checks": checks}
        if rule is not None:
            r["geneval_rule_correct"] = rule
        return r

    records = [
        rec("counting", True, {"shape": [True], "count": [True]}, rule=True),
        rec("counting", False, {"shape": [True], "count": [False]}, rule=True),
        rec("position", False, {"shape": [True, False], "count": [True, False], "position": [False]}, rule=False),
    ]
    s = shapes_eval.summarize(records)
    assert s["categories"]["counting"] == {"score": 0.5, "correct": 1, "n": 2}
    assert s["overall"] == pytest.approx((0.5 + 0.0) / 2)  # mean over categories, not images
    assert s["correct_images"] == pytest.approx(1 / 3)
    assert s["subscores"]["shape"] == {"score": 0.75, "n": 4}
    assert s["subscores"]["count"] == {"score": 0.5, "n": 4}
    assert s["subscores"]["position"] == {"score": 0.0, "n": 1} and "color" not in s["subscores"]
    assert s["geneval_rule"]["counting"]["score"] == 1.0 and s["mean_requirement_score"] == pytest.approx(2 / 3)


def test_generation_resumes_image_by_image(tmp_path):
    prompts = shapes_eval.select_prompts(shapes_eval.load_prompts(), limit=1)
    out = tmp_path / "run"
    first = CountingBlank()
    shapes_eval.generate_shapes(first, prompts, out, n=2, progress=False)
    assert first.calls == 2 * len(prompts)
    (out / "images" / "00000_01.png").unlink()  # as if killed before this PNG was renamed into place
    (out / "images" / ".tmp-debris").write_bytes(b"half a png")
    again = CountingBlank()
    stats = shapes_eval.generate_shapes(again, prompts, out, n=2, progress=False)
    assert again.calls == 1 and stats["skipped"] == 2 * len(prompts) - 1
    assert not list((out / "images").glob(".tmp-*"))


def test_oracle_generator_is_deterministic():
    gen = ShapesOracleGenerator()
    a, b = gen("two red circles above a blue square", 3), gen("two red circles above a blue square", 3)
    assert a.image.tobytes() == b.image.tobytes()
