"""Batched and data-parallel evaluation write the run of a single process drawing one sample at a time.

  * `--batch-size`: the same images (within one 8-bit level: packed matmuls reassociate sums) and seeds;
  * `torchrun --nproc_per_node 2` (gloo, CPU): the ranks split the prompts into one run folder and write
    exactly the files of a single-process run (byte for byte at equal batch size 1: every sample alone);
    rank 0 scores once, after both ranks are done;
  * `--shard I/N` launches, then `--stage score`: the same run again.
The model is the tiny reference checkpoint with the tiny CPU inference YAML (32 px, 3 Euler steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from commands.main import main as cli_main
from eval.run_dir import read_jsonl

pytest.importorskip("scene_graphs.shapes")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "reference" / "tiny"
TINY_YAML = ROOT / "configs" / "eval" / "inference_tiny_cpu.yaml"
SUBSET = "single_object,colors,position"
pytestmark = pytest.mark.skipif(not TINY.exists(), reason="shared reference checkpoint not present")


def eval_args(out: Path, *extra: str) -> list[str]:
    return [
        "shapes",
        "--ckpt",
        str(TINY),
        "--mode",
        "single",
        "--n",
        "2",
        "--limit",
        "2",
        "--subset",
        SUBSET,
        "--inference-config",
        str(TINY_YAML),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def images(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "images").glob("*.png"))}


def verdicts(run: Path) -> list[tuple]:
    return [(r["key"], r["correct"], r["score"], r["seed"]) for r in read_jsonl(run / "records.jsonl")]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, one sample at a time."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert cli_main(["eval", *eval_args(out, "--batch-size", "1")]) == 0
    assert len(images(out)) == 3 * 2 * 2
    return out


def test_batched_eval_draws_the_images_of_batch_one(single, tmp_path):
    out = tmp_path / "batched"
    assert cli_main(["eval", *eval_args(out, "--batch-size", "5")]) == 0
    one, many = images(single), images(out)
    assert sorted(one) == sorted(many)
    for name in one:
        a = np.asarray(Image.open(single / "images" / name), dtype=int)
        b = np.asarray(Image.open(out / "images" / name), dtype=int)
        assert np.abs(a - b).max() <= 1, name
    for key in (p.stem for p in (single / "gen").glob("*.json")):
        a, b = (json.loads((run / "gen" / f"{key}.json").read_text()) for run in (single, out))
        assert a["seed"] == b["seed"] and a["cost"]["flow_steps"] == b["cost"]["flow_steps"]


def test_two_torchrun_ranks_write_exactly_the_single_process_run(single, tmp_path):
    out = tmp_path / "ranks"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "commands.eval",
        "--",
        *eval_args(out, "--batch-size", "1"),
    ]  # "--": torchrun would take --n
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert images(out) == images(single)  # byte for byte, every file, nothing more
    seeds = {p.name: json.loads(p.read_text())["seed"] for p in (out / "gen").glob("*.json")}
    assert seeds == {p.name: json.loads(p.read_text())["seed"] for p in (single / "gen").glob("*.json")}
    assert verdicts(out) == verdicts(single)
    assert run.stdout.count("overall") == 1  # the summary, printed by rank 0 only, after both ranks finished
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_images"] == 12 and summary["missing_images"] == 0


def test_shard_launches_then_score_write_the_single_process_run(single, tmp_path, capsys):
    out = tmp_path / "shards"
    for shard in ("1/2", "0/2"):
        assert cli_main(["eval", *eval_args(out, "--batch-size", "1", "--shard", shard)]) == 0
        assert "--stage score" in capsys.readouterr().out and not (out / "summary.json").exists()
    assert images(out) == images(single)
    assert cli_main(["eval", "shapes", "--out", str(out), "--stage", "score", "--quiet"]) == 0
    assert verdicts(out) == verdicts(single)
    assert cli_main(["eval", *eval_args(out, "--shard", "2/2")]) == 2
    assert "0 <= I < N" in capsys.readouterr().err
