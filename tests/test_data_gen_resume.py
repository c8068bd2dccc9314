"""Crash safety: `bagel-ft data` killed with SIGKILL midway, or stopped with Ctrl-C, and re-run gives exactly
the uninterrupted run's dataset, repeating no call whose reply had arrived."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_openai_server import FakeOpenAIServer, shapes_answer

from data_gen import trajectories
from data_gen.config import load_config
from data_gen.runner import read_prompts, run_pipeline
from data_gen.shards import merge, read_manifests
from scene_graphs.shapes import generate_prompts

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "BAGEL_FT_TEST_KEY"
CONCURRENCY = 2


def chunks_done(out: Path) -> int:
    try:
        return len(read_manifests(out, allow_partial=True)[0]["chunks"])
    except FileNotFoundError:
        return 0


# `bagel-ft data` in a subprocess that sends itself SIGNAL right after writing its first chunk: the signal lands
# at the same point on any machine (no polling, no timing)
SIGNAL_AFTER_FIRST_CHUNK = """
import os, sys
from data_gen.shards import ShardOutput
write, sent = ShardOutput.write_chunk, []
def write_chunk(self, *args, **kwargs):
    write(self, *args, **kwargs)
    if not sent:
        sent.append(True)
        os.kill(os.getpid(), int(os.environ["SIGNAL"]))
ShardOutput.write_chunk = write_chunk
from commands.main import main
sys.exit(main(["data", *sys.argv[1:]]))
"""


def interrupt_midway(tmp_path: Path, monkeypatch, sig: signal.Signals) -> dict:
    """The uninterrupted run, then `bagel-ft data` sent `sig` after its first chunk, then a re-run."""
    monkeypatch.setenv(KEY_ENV, "sk-test")
    prompts = [p.text for p in generate_prompts(24, seed=5, categories=("position", "color_attr", "counting_colors"))]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    with FakeOpenAIServer(shapes_answer) as server:
        config = {
            "endpoint": {"base_url": server.url, "model": "fake-gpt", "api_key_env": KEY_ENV, "backoff_base_s": 0.01},
            "backends": {"extractor": "llm"},
            "pipeline": {"min_steps": 1, "chunk_size": 3},
        }
        config_file = tmp_path / "fake.yaml"
        config_file.write_text(yaml.safe_dump(config))
        cfg = load_config(config_file, [f"endpoint.concurrency={CONCURRENCY}"])
        asyncio.run(run_pipeline(trajectories.NAME, trajectories.build, cfg, prompts, tmp_path / "reference"))
        reference_calls = [e["sha"] for e in server.log]

        out = tmp_path / "run"
        server.delay = 0.2  # slow replies: requests are in flight when the signal lands
        cmd = [sys.executable, "-c", SIGNAL_AFTER_FIRST_CHUNK, "trajectories", "--out", str(out), "--prompts",
               str(prompt_file), "--config", str(config_file), "--concurrency", str(CONCURRENCY)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "SIGNAL": str(int(sig))}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = proc.communicate(timeout=100)
        done_at_signal = chunks_done(out)
        signalled_at = len(server.log)
        server.delay = 0.0

        # the re-run (in-process, to spare a second start-up: the same code as the CLI's)
        rerun = asyncio.run(run_pipeline(trajectories.NAME, trajectories.build, cfg, read_prompts(prompt_file), out))
        calls = [e["sha"] for e in server.log[len(reference_calls) :]]
    assert rerun.complete and 0 < rerun.this_run.items < len(prompts)
    assert chunks_done(out) == 8 and signalled_at < len(server.log)
    assert 1 <= done_at_signal < 8, done_at_signal  # stopped midway: 8 chunks of 3 prompts
    assert merge([out]).to_list() == merge([tmp_path / "reference"]).to_list()
    # every request of the uninterrupted run was made
    assert set(calls) == set(reference_calls) and len(reference_calls) == len(set(reference_calls))
    return {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr, "repeated": len(calls) - len(set(calls))}


@pytest.mark.timeout(120)
def test_sigkill_midway_then_rerun_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    killed = interrupt_midway(tmp_path, monkeypatch, signal.SIGKILL)
    assert killed["returncode"] == -signal.SIGKILL
    assert killed["repeated"] <= CONCURRENCY  # only requests in flight at the kill can be made twice


@pytest.mark.timeout(120)
def test_ctrl_c_stops_cleanly_then_rerun_resumes(tmp_path, monkeypatch):
    stopped = interrupt_midway(tmp_path, monkeypatch, signal.SIGINT)
    assert stopped["returncode"] == 130
    assert "Traceback" not in stopped["stderr"] and "interrupted" in stopped["stderr"]
    assert "records kept from" in stopped["stdout"] and "stopped: interrupted" in stopped["stdout"]
    assert stopped["repeated"] == 0  # the requests in flight finished and were cached: nothing asked twice
