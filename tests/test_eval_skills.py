"""`bagel-ft eval skills` on a tiny checkpoint: every skill runs, scores land in [0, 1] under their names, a rerun
resumes (nothing is redone), and the held-out scenes are the ones training data skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bagel_ft.cli import main as cli_main
from scene_graphs.shapes.edits import EDIT_OPS

REPO = Path(__file__).resolve().parent.parent
TINY = REPO.parent / "shared" / "reference" / "tiny"
TINY_YAML = REPO / "configs" / "eval" / "inference_tiny_cpu.yaml"


@pytest.mark.skipif(not TINY.exists(), reason="shared reference checkpoint not present")
def test_skills_on_a_tiny_checkpoint(tmp_path):
    out = tmp_path / "skills"
    args = ["eval", "skills", "--ckpt", str(TINY), "--limit", "1", "--inference-config", str(TINY_YAML),
            "--out", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    for skill in ("t2i", "edit", "verdict", "caption"):
        assert 0.0 <= summary[skill] <= 1.0, skill
    assert set(summary["edit_ops"]) == set(EDIT_OPS)
    assert summary["verdict_detail"]["n"] == 2 and summary["caption_detail"]["n"] == 1
    assert summary["config"]["num_timesteps"] == 4  # the inference YAML's options.flow
    lines = {f.name: f.read_text() for f in out.glob("*.jsonl")}
    assert set(lines) == {"t2i.jsonl", "edit.jsonl", "verdict.jsonl", "caption.jsonl"}
    assert len(lines["edit.jsonl"].splitlines()) == len(EDIT_OPS)
    assert len(list((out / "images").glob("edit_*.png"))) == len(EDIT_OPS)
    assert cli_main(args) == 0  # resumed: every item was done, nothing appended
    assert {f.name: f.read_text() for f in out.glob("*.jsonl")} == lines


def test_skills_refuse_an_unknown_subset_and_a_bad_limit(tmp_path, capsys):
    with pytest.raises(SystemExit, match="expected some of"):
        cli_main(["eval", "skills", "--ckpt", str(TINY), "--subset", "draw", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="--limit must be >= 1"):
        cli_main(["eval", "skills", "--ckpt", str(TINY), "--limit", "0", "--out", str(tmp_path / "b")])
