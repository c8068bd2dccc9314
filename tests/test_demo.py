"""`bagel-ft demo` end to end at a micro size against a random checkpoint of the shapes-base architecture:
every phase runs, the report holds trajectory strips, scores and the loss plot; a re-run skips finished phases;
`--until` stops and the next run continues; an interrupted training resumes from its checkpoint."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from demo.pipeline import PHASE_NAMES, DemoError, DemoSettings, Layout, run_demo

REPO = Path(__file__).resolve().parents[1]

MICRO_TRAIN = ["train.steps=4", "train.save_every=2", "data.expected_num_tokens=384", "optim.warmup_steps=1",
               "data.prefetch=0"]  # fmt: skip
MICRO_INFERENCE = ["options.flow.num_timesteps=3", "options.text.max_tokens=12", "options.budget.max_steps=2",
                   "options.budget.max_images=1", "options.budget.max_tokens=24"]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Random weights of configs/model/shapes_base (+ a random AE, the byte tokenizer), official layout."""
    from bagel_ft.autoencoder import AutoEncoder
    from bagel_ft.config import BagelConfig
    from bagel_ft.modeling import Bagel
    from bagel_ft.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    cfg = BagelConfig.from_dir(REPO / "configs" / "model" / "shapes_base")
    out = tmp_path_factory.mktemp("base")
    Bagel(cfg).attach_vae(AutoEncoder(cfg.vae)).save_pretrained(out)
    ByteTokenizer().save_pretrained(out)
    return out


def micro(out: Path, base: Path, **kw) -> DemoSettings:
    return DemoSettings(out=out, base=base, train_overrides=list(MICRO_TRAIN), prompts=4, psir_prompts=2,
                        eval_limit=1, eval_subset=["position", "color_attr"], inference_overrides=list(MICRO_INFERENCE),
                        threads=1, progress=False, **{"replay": 0.0, **kw})  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory, base) -> tuple[Path, dict[str, list]]:
    """A micro demo run as a user might: stopped after training, killed mid-training (simulated), resumed to the
    end, then run once more. Returns the folder and what each run did."""
    out = tmp_path_factory.mktemp("demo")
    layout = Layout(out)
    runs: dict[str, list] = {"until_train": run_demo(micro(out, base), until="train", log=lambda _: None)}
    # a kill after the step-2 checkpoint: no marker, no export, no step-4 checkpoint
    layout.marker("train").unlink()
    shutil.rmtree(layout.export)
    checkpoints = sorted((layout.train / "checkpoints").iterdir())
    runs["checkpoints"] = [c.name for c in checkpoints]
    shutil.rmtree(checkpoints[-1])
    messages: list[str] = []
    runs["resumed"] = run_demo(micro(out, base), log=messages.append)
    runs["messages"] = messages
    runs["again"] = run_demo(micro(out, base), log=lambda _: None)
    return out, runs


def test_phases_run_once_resume_and_are_skipped(finished):
    out, runs = finished
    assert runs["until_train"] == ["data", "train"]
    assert runs["resumed"] == list(PHASE_NAMES[1:]) and runs["again"] == []
    assert any(m.startswith("[1/") and "data: finished before" in m for m in runs["messages"])
    layout = Layout(out)
    for name in PHASE_NAMES:
        marker = json.loads(layout.marker(name).read_text())
        assert marker["phase"] == name and marker["seconds"] >= 0
    assert not list(out.rglob(".tmp-*"))  # atomic writes left no debris


def test_interrupted_training_resumed_from_its_checkpoint(finished):
    out, runs = finished
    layout = Layout(out)
    assert runs["checkpoints"][-1].endswith("4")
    steps = [json.loads(line)["step"] for line in (layout.train / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 3, 4]  # continued after step 2, not from scratch
    assert json.loads(layout.marker("train").read_text())["result"]["steps"] == 4


def test_outputs_of_each_phase(finished):
    out, _ = finished
    layout = Layout(out)
    data = json.loads(layout.marker("data").read_text())["result"]
    assert set(data["subsets"]) == {"trajectories", "critiques", "alignment"} and data["canvas"] == 64
    assert all(v["records"] > 0 for v in data["subsets"].values())
    train = json.loads(layout.marker("train").read_text())["result"]
    assert train["steps"] == 4 and train["tokens"] > 0
    assert (layout.export / "ema.safetensors").is_file()
    psir = [json.loads(line) for line in (layout.psir / "records.jsonl").read_text().splitlines()]
    assert len(psir) == 2 and all(isinstance(r["correct"], bool) for r in psir)
    for name in ("base-single", "finetuned-single", "finetuned-psir"):
        summary = json.loads((layout.eval(name) / "summary.json").read_text())
        assert summary["total_images"] == 2 and set(summary["categories"]) == {"position", "color_attr"}
    assert json.loads((layout.eval("finetuned-psir") / "config.json").read_text())["mode"] == "psir"


def test_report_holds_strips_scores_and_loss_plot(finished):
    out, _ = finished
    page = Layout(out).report.read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert page.count('class="strip"') >= 3 + 2  # a training record per subset, the held-out PSIR streams
    assert "data:image/png;base64," in page and 'class="card plan"' in page  # images inlined, text cards
    assert "base-single" in page and "finetuned-psir" in page and "position" in page  # scores per category
    assert "cross-entropy" in page and "<polyline" in page  # loss curves as inline SVG
    assert "<rect" in page  # the per-category bar chart
    assert "src='http" not in page and 'src="http' not in page  # self-contained
    assert "| category |" in (out / "report.md").read_text()


def test_report_reads_as_a_person_would(finished):
    """The micro demo's real page: the paragraph's numbers are summary.json's, the base beside the fine-tuned
    images, wrapped strips, the psir phase's format failures as sentences (random weights break the format)."""
    import html
    import re

    from demo.report import rewrite_record
    from inference.psir import describe_failure

    out, _ = finished
    layout = Layout(out)
    page = layout.report.read_text()
    text = html.unescape(" ".join(re.findall(r"<p class='reading'>(.*?)</p>", page)))
    summary = json.loads((layout.eval("base-single") / "summary.json").read_text())
    n = summary["total_images"]
    assert (
        f"the base model got {round(summary['correct_images'] * n)} of {n} images right ({100 * summary['overall']:.1f}%"
        in text
    )
    assert "exact McNemar test" in text and "Wilson" in text
    table = re.search(r"<table class='cmp'>(.*?)</table>", page, re.S)[1]
    assert table.count("<img class='cmp'") == 3 * n  # base, fine-tuned single, fine-tuned PSIR per prompt
    assert re.search(r"\.strip \{[^}]*flex-wrap: wrap", page) and "overflow-x" not in page
    psir = [json.loads(line) for line in (layout.psir / "records.jsonl").read_text().splitlines()]
    assert any(r["failure"] for r in psir)  # 12-token text turns of random weights never close their tags
    for r in psir:
        if r["failure"]:
            assert html.escape(describe_failure(r["failure"])) in page
    assert "&quot;reason&quot;" not in page
    if rewrite_record(layout) is not None:  # 4 prompts may hold no rewrite; tests/test_demo_report.py forces one
        assert "<p class='why'>Step " in page


def test_other_settings_in_the_same_folder_are_refused(finished, base):
    out, _ = finished
    other = dataclasses.replace(micro(out, base), prompts=7)
    with pytest.raises(DemoError, match="prompts: 4 -> 7"):
        run_demo(other, log=lambda _: None)


def test_missing_base_says_how_to_build_it(tmp_path):
    with pytest.raises(DemoError, match="demo.base_model"):
        run_demo(DemoSettings(out=tmp_path, base=tmp_path / "nope", progress=False), log=lambda _: None)
