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
PROMPTS = [p.text for p in generate_prompts(10, seed=3, categories=("relations3", "counting_colors"))]


def api_config(server: FakeOpenAIServer, tmp_path, **overrides):
    sets = {
        "endpoint.base_url": server.url,
        "endpoint.model": "fake-gpt",
        "endpoint.api_key_env": KEY_ENV,
        "endpoint.timeout_s": 2.0,  # generous: a loaded 2-core CI box must not time out a normal answer
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


def test_faults_are_counted_exactly_retried_and_never_kept(tmp_path, key):
    bad_graph = {
        "objects": [{"id": "o0", "name": "circle", "count": 1, "color": None, "size": None, "material": None}],
        "relations": [{"subject": "o0", "predicate": "left of", "object": "o9"}],
    }  # o9 does not exist
    script = {
        PROMPTS[0]: ["429", "429"],  # retried twice, then kept
        PROMPTS[1]: ["500"],
        PROMPTS[2]: ["timeout"],  # the server answers after the client's timeout
        PROMPTS[3]: ["malformed"],  # repaired by re-asking: kept
        PROMPTS[4]: ["malformed", "malformed"],  # repair fails: rejected
        PROMPTS[5]: ["schema", "schema"],
        PROMPTS[6]: ["bad_graph", "bad_graph"],
        PROMPTS[7]: ["429", "429", "429"],  # retries exhausted: failed
        PROMPTS[8]: ["500", "500", "500"],
    }
    replies = {"schema": json.dumps({"objects": "three circles", "relations": []}), "bad_graph": json.dumps(bad_graph)}
    with FakeOpenAIServer(shapes_answer, script, replies=replies, timeout_sleep=3.0) as server:
        first = run(api_config(server, tmp_path), tmp_path / "run1")
        assert len(server.log) == 22 and not server.overflow
        t = first.total
        assert t.items == 10 and t.kept == 5
        assert dict(t.rejected) == {"malformed_json": 1, "schema_violation": 1, "invalid_scene_graph": 1}
        assert dict(t.failed) == {"rate_limited": 1, "server_error": 1}
        assert dict(t.invalid) == {"malformed_json": 3, "schema_violation": 2, "invalid_scene_graph": 2}
        assert dict(t.retries) == {"rate_limited": 4, "server_error": 3, "timeout": 1}
        assert dict(t.requests) == {"chat": 22} and t.tokens["prompt"] == 10 * 12  # usage of the 12 answered requests
        assert not first.complete  # two items failed: a re-run retries them
        kept = set(merge([tmp_path / "run1"], allow_partial=True)["prompt"])
        assert kept == {PROMPTS[i] for i in (0, 1, 2, 3, 9)}

        # same cache, new output: only the two failed prompts are asked again (their faults are used up)
        second = run(api_config(server, tmp_path), tmp_path / "run2")
        assert len(server.log) == 24 and second.this_run.requests["chat"] == 2
        assert second.complete and second.total.kept == 7
        assert dict(second.total.rejected) == dict(t.rejected)  # cached invalid replies: same rejections, no calls
        # everything is cached now: a third run makes no call at all
        third = run(api_config(server, tmp_path), tmp_path / "run3")
        assert len(server.log) == 24 and sum(third.this_run.requests.values()) == 0 and third.total.kept == 7
        assert third.cache["chat"]["misses"] == 0
    assert merge([tmp_path / "run3"]).to_list() == merge([tmp_path / "run2"]).to_list()
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
