"""How a data_gen run proceeds against an OpenAI-compatible server (the real client and pipeline, a local
fake server): the sliding window around retries, adaptive concurrency under rate limits, budgets that stop
cleanly and resume, progress lines without a terminal. Ctrl-C and SIGKILL: tests/test_data_gen_resume.py."""

from __future__ import annotations

import asyncio
import re

import pytest
from fake_openai_server import FakeOpenAIServer, shapes_answer
from test_data_gen_api import KEY_ENV, api_config, records_of, run

from scene_graphs.shapes import generate_prompts

PROMPTS = [p.text for p in generate_prompts(16, seed=11, categories=("position", "color_attr"))]


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")


@pytest.mark.timeout(60)
def test_a_prompt_waiting_on_retry_after_holds_back_no_other(tmp_path):
    """One prompt is told to come back in 3 s; the others (in the same chunk and later ones) go on. The
    window holds 8 items (concurrency 4), so the last 8 prompts start only as earlier ones end: with the
    waiting one holding its place they could not all be asked before its retry. (The 15 others take ~0.4 s
    here at 64 px: 3 s leaves a loaded machine ample room.)"""
    script = {PROMPTS[0]: ["429@3"]}
    overrides = {"pipeline.chunk_size": 4, "pipeline.image_size": 64}
    with FakeOpenAIServer(shapes_answer, script, delay=0.02) as server:
        result = run(api_config(server, tmp_path, **overrides), tmp_path / "out", prompts=PROMPTS)
        log = list(server.log)
    assert result.complete and result.total.kept == len(PROMPTS)
    retry = max(i for i, e in enumerate(log) if e["key"] == PROMPTS[0])
    assert retry == len(log) - 1  # every other prompt was asked before the waiting one's retry
    assert log[retry]["t"] - log[0]["t"] >= 3.0  # and its Retry-After was honoured
    assert {e["key"] for e in log[:retry]} == set(PROMPTS)


@pytest.mark.timeout(60)
def test_sustained_rate_limiting_lowers_concurrency_and_fails_no_prompt(tmp_path):
    """A server that takes 20 requests/s from a client allowed 8 in flight (40/s at its latency): the
    client lowers its limit, and every prompt still becomes a record."""
    with FakeOpenAIServer(shapes_answer, delay=0.2, requests_per_s=20) as server:
        cfg = api_config(server, tmp_path, **{"endpoint.concurrency": 8, "backends.judge": "vlm"})
        result = run(cfg, tmp_path / "out", prompts=PROMPTS[:12])
        answered = sum(e["fault"] == "ok" for e in server.log)
    summary = result.this_run
    assert result.complete and result.total.kept == 12 and not result.total.failed
    assert (
        summary.retries["rate_limited"] >= 5 and summary.requests["chat"] == answered + summary.retries["rate_limited"]
    )
    assert result.in_flight["lowest_allowed"] < 8  # lowered from 8 while the 429s lasted


@pytest.mark.timeout(60)
def test_request_budget_stops_cleanly_and_resumes_when_raised(tmp_path):
    with FakeOpenAIServer(shapes_answer) as server:
        ref_cfg = api_config(server, tmp_path, cache_dir=str(tmp_path / "ref-cache"))
        reference = run(ref_cfg, tmp_path / "ref", prompts=PROMPTS[:12])
        assert reference.complete
        sent = len(server.log)
        capped = api_config(server, tmp_path, **{"run.max_requests": 5, "pipeline.chunk_size": 2})
        first = run(capped, tmp_path / "out", prompts=PROMPTS[:12])
        assert first.stopped.startswith("budget") and "max_requests=5" in first.stopped and not first.complete
        assert len(server.log) - sent == 5 == first.spent["requests"]  # not one request past the cap
        again = run(capped, tmp_path / "out", prompts=PROMPTS[:12])  # the same cap: nothing more is sent
        assert again.stopped.startswith("budget") and len(server.log) - sent == 5
        raised = api_config(server, tmp_path, **{"run.max_requests": 100, "pipeline.chunk_size": 2})
        done = run(raised, tmp_path / "out", prompts=PROMPTS[:12])
        asked = [e["sha"] for e in server.log[sent:]]
    assert done.complete and not done.stopped and done.total.kept == 12
    assert done.spent["requests"] == 12 and len(asked) == len(set(asked)) == 12  # no answered call asked twice
    assert records_of(tmp_path / "out") == records_of(tmp_path / "ref")


@pytest.mark.timeout(60)
def test_cost_cap_from_the_models_price(tmp_path):
    # 10 prompt + 5 completion tokens per reply at $1000 / $2000 per 1M tokens: $0.02 per request
    prices = {"run.prices": {"fake-gpt": {"prompt": 1000, "completion": 2000}}, "endpoint.concurrency": 1}
    with FakeOpenAIServer(shapes_answer) as server:
        first = run(api_config(server, tmp_path, **prices, **{"run.max_cost": 0.1}), tmp_path / "out", prompts=PROMPTS)
        assert first.stopped.startswith("budget") and "max_cost=0.1" in first.stopped
        assert len(server.log) == 5  # the 5th reply reached $0.10; one request in flight at a time
        done = run(api_config(server, tmp_path, **prices, **{"run.max_cost": 1.0}), tmp_path / "out", prompts=PROMPTS)
    assert done.complete and done.spent["requests"] == len(PROMPTS) == len(server.log)
    assert done.spent == {"requests": 16, "prompt_tokens": 160, "completion_tokens": 80}


def test_a_cost_cap_needs_a_price(tmp_path):
    from data_gen.config import ConfigError

    with (
        FakeOpenAIServer(shapes_answer) as server,
        pytest.raises(ConfigError, match=r"run.max_cost needs the price of endpoint.model 'fake-gpt'"),
    ):
        api_config(server, tmp_path, **{"run.max_cost": 1.0})


@pytest.mark.timeout(60)
def test_progress_lines_without_a_terminal(tmp_path, capsys):
    prices = {"run.prices": {"fake-gpt": {"prompt": 2.5, "completion": 10}}, "run.progress_every_s": 0.2}
    with FakeOpenAIServer(shapes_answer, delay=0.1) as server:
        run(api_config(server, tmp_path, **prices, **{"endpoint.concurrency": 2}), tmp_path / "out", prompts=PROMPTS)
    lines = capsys.readouterr().err.splitlines()
    pattern = (
        r"trajectories 0/1: (\d+)/16 prompts \([\d.]+%\), [\d.]+/s, ETA \S+ \| requests \d+ \(in flight \d+/2\), "
        r"retries 0, tokens \d+, est\. \$[\d.]+"
    )
    done = [int(m.group(1)) for m in map(re.compile(pattern).match, lines) if m]
    assert len(done) >= 3 and done[-1] == 16 and done == sorted(done)  # lines during the run, and a last one


@pytest.mark.timeout(60)
def test_a_prompt_rate_limited_past_its_patience_fails_and_a_rerun_retries_it(tmp_path):
    script = {PROMPTS[0]: ["429@0.2"] * 8}  # more than 0.5 s of Retry-After
    with FakeOpenAIServer(shapes_answer, script) as server:
        cfg = api_config(server, tmp_path, **{"endpoint.rate_limit_wait_s": 0.5})
        first = run(cfg, tmp_path / "out", prompts=PROMPTS[:4])
        assert first.total.failed == {"rate_limited": 1} and not first.complete
        assert len(server.log) == 3 + 3  # 2 waits of 0.2 s fit in 0.5 s: 3 tries; the 3 other prompts
        again = run(cfg, tmp_path / "out", prompts=PROMPTS[:4])  # the re-run tries again (5 429s left)
        assert again.complete is False and len(server.log) == 6 + 3
        third = run(cfg, tmp_path / "out", prompts=PROMPTS[:4])
    assert third.complete and third.total.kept == 4


def test_a_chunk_that_cannot_be_written_stops_the_run_with_its_error(tmp_path, monkeypatch):
    from data_gen import trajectories
    from data_gen.config import load_config
    from data_gen.runner import run_pipeline
    from data_gen.shards import ShardOutput

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardOutput, "write_chunk", disk_full)
    cfg = load_config(None, ["pipeline.chunk_size=2"])  # the offline shapes world
    with pytest.raises(OSError, match="No space left"):
        asyncio.run(run_pipeline(trajectories.NAME, trajectories.build, cfg, PROMPTS[:6], tmp_path / "out"))
