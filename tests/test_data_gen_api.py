"""data_gen against an OpenAI-compatible server: the REAL openai client and pipelines, a local fake server
(tests/fake_openai_server.py) that only decides which request fails and how."""

from __future__ import annotations

import asyncio
import json

import pytest
from fake_openai_server import FakeOpenAIServer, shapes_answer

from data_gen import alignment, trajectories
from data_gen.config import load_config
from data_gen.errors import FatalError
from data_gen.runner import run_pipeline
from data_gen.shards import merge
from scene_graphs.shapes import generate_prompts

KEY_ENV, KEY = "BAGEL_FT_TEST_KEY", "sk-test-do-not-write-me-0123456789"
PROMPTS = [p.text for p in generate_prompts(12, seed=3, categories=("relations3", "counting_colors"))]


def api_config(server: FakeOpenAIServer, tmp_path, **overrides):
    sets = {
        "endpoint.base_url": server.url,
        "endpoint.model": "fake-gpt",
        "endpoint.api_key_env": KEY_ENV,
        "endpoint.timeout_s": 5.0,  # generous: a loaded 2-core CI box must not time out a normal answer
        "endpoint.max_attempts": 3,
        "endpoint.backoff_base_s": 0.01,
        "endpoint.backoff_max_s": 0.05,
        "endpoint.concurrency": 4,
        "backends.extractor": "llm",
        "pipeline.min_steps": 1,
        "pipeline.repair_attempts": 1,
        "cache_dir": str(tmp_path / "cache"),
        **overrides,
    }
    return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in sets.items()])


def run(cfg, out, module=trajectories, prompts=PROMPTS):
    return asyncio.run(run_pipeline(module.NAME, module.build, cfg, prompts, out))


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def records_of(out) -> list[dict]:
    return merge([out]).to_list()


@pytest.mark.timeout(60)
def test_faults_are_counted_retried_and_records_equal_a_fault_free_run(tmp_path, key):
    bad_graph = {
        "objects": [{"id": "o0", "name": "circle", "count": 1, "color": None, "size": None, "material": None}],
        "relations": [{"subject": "o0", "predicate": "left of", "object": "o9"}],
    }  # o9 does not exist
    script = {
        PROMPTS[0]: ["429", "429"],  # retried twice, then kept
        PROMPTS[1]: ["500"],
        PROMPTS[2]: ["timeout"],  # the server answers after the client's timeout
        PROMPTS[3]: ["malformed"],  # repaired by re-asking: kept
        PROMPTS[4]: ["malformed", "malformed"],  # repair fails: rejected now, asked again by the re-run
        PROMPTS[5]: ["schema", "schema"],
        PROMPTS[6]: ["bad_graph", "bad_graph"],
        PROMPTS[7]: ["429", "429", "429", "429"],  # 429s do not use up max_attempts (3): kept
        PROMPTS[8]: ["500", "500", "500"],  # retries exhausted: failed, retried by the re-run
        PROMPTS[9]: ["cutoff", "cutoff_eof"],  # a body cut off (with and without Content-Length): retried
        PROMPTS[10]: ["reset"],  # the connection reset: retried
    }
    replies = {"schema": json.dumps({"objects": "three circles", "relations": []}), "bad_graph": json.dumps(bad_graph)}
    overrides = {"pipeline.chunk_size": 4}  # chunks P0-3 (all kept), P4-7 (3 to ask again), P8-11 (1 failed)
    with FakeOpenAIServer(shapes_answer, script, replies=replies, timeout_sleep=10.0, max_requests=60) as server:
        first = run(api_config(server, tmp_path, **overrides), tmp_path / "run")
        assert len(server.log) == 29 and not server.overflow
        t = first.total
        assert t.items == 12 and t.kept == 8
        assert dict(t.rejected) == {"malformed_json": 1, "schema_violation": 1, "invalid_scene_graph": 1}
        assert dict(t.failed) == {"server_error": 1}
        assert dict(t.invalid) == {"malformed_json": 3, "schema_violation": 2, "invalid_scene_graph": 2}
        assert dict(t.retries) == {"rate_limited": 6, "server_error": 3, "timeout": 1, "connection": 2, "bad_body": 1}
        assert dict(t.requests) == {"chat": 29} and t.tokens["prompt"] == 10 * 15  # the 15 bodies that arrived
        assert first.spent == {"requests": 29, "prompt_tokens": 150, "completion_tokens": 75}
        assert not first.complete  # one item failed: a re-run retries it, and re-asks the 3 rejected ones

        # the re-run redoes the two unfinished chunks: only the 4 prompts without an answer are asked (their
        # faults are used up), every other reply comes from the cache
        second = run(api_config(server, tmp_path, **overrides), tmp_path / "run")
        assert len(server.log) == 33 and second.this_run.requests["chat"] == 4
        assert second.complete and second.total.kept == 12 and not second.total.rejected
        assert second.spent["requests"] == 33  # over both runs
        # everything is cached now: another output directory costs no call at all
        third = run(api_config(server, tmp_path), tmp_path / "again")
        assert len(server.log) == 33 and third.this_run.total("requests") == 0 and third.cache["chat"]["misses"] == 0
        # the faults are used up: a run with a cache of its own meets none
        run(api_config(server, tmp_path, cache_dir=str(tmp_path / "clean-cache")), tmp_path / "clean")
        assert len(server.log) == 33 + 12 and {e["fault"] for e in server.log[33:]} == {"ok"}
    # the same records, byte for byte, as a run that met no fault (no token counts or retries in them)
    assert records_of(tmp_path / "run") == records_of(tmp_path / "again") == records_of(tmp_path / "clean")
    for path in tmp_path.rglob("*"):  # the key is read from the environment and written nowhere
        assert not path.is_file() or KEY.encode() not in path.read_bytes()


def test_json_schema_refused_falls_back_to_json_object(tmp_path, key):
    with FakeOpenAIServer(shapes_answer, json_schema_supported=False) as server:
        result = run(api_config(server, tmp_path), tmp_path / "out", prompts=PROMPTS[:3])
    assert result.total.kept == 3 and not result.total.failed
    formats = [e["format"] for e in server.log]  # refusals of the requests in flight, then JSON mode only
    assert formats.count("json_object") == 3 and set(formats[formats.index("json_object") :]) == {"json_object"}


def test_bad_credentials_stop_the_run(tmp_path, key):
    with FakeOpenAIServer(shapes_answer, {p: ["401"] for p in PROMPTS}) as server:
        with pytest.raises(FatalError, match="HTTP 401"):
            run(api_config(server, tmp_path), tmp_path / "out")
        assert len(server.log) <= 4  # no retries of a 401: at most the requests already in flight


def test_a_used_up_quota_stops_the_run(tmp_path, key):
    with FakeOpenAIServer(shapes_answer, {p: ["quota"] for p in PROMPTS}) as server:
        with pytest.raises(FatalError, match="quota is used up"):
            run(api_config(server, tmp_path), tmp_path / "out")
        assert len(server.log) <= 4  # a 429 that no wait can fix is not retried


def test_missing_key_env_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with FakeOpenAIServer(shapes_answer) as server, pytest.raises(ValueError, match=KEY_ENV):
        run(api_config(server, tmp_path), tmp_path / "out")


def test_vlm_judge_sees_the_image_and_alignment_keeps_its_ratio(tmp_path, key):
    with FakeOpenAIServer(shapes_answer) as server:
        result = run(
            api_config(server, tmp_path, **{"backends.judge": "vlm"}), tmp_path / "out", alignment, PROMPTS[:4]
        )
        judged = [e for e in server.log if e["key"].startswith("Instruction:")]
    ds = merge([tmp_path / "out"])
    assert result.total.kept == len(ds) == 12 and sorted(ds["label"]).count("inconsistent") == 8
    assert len(judged) >= 12  # one VLM call per kept pair, each carrying its image as a data URL
