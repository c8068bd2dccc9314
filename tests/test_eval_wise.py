"""WISE: WiScore and the overall against hand-computed values, the judge's reply parsing, and an end-to-end
run against a local OpenAI-compatible fake server (rubric scores, one 429, malformed replies)."""

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from commands.main import main as cli_main
from eval import wise
from eval.generator import NoiseGenerator
from eval.run_dir import read_jsonl

SHARED_WISE = Path(__file__).resolve().parent.parent.parent / "shared" / "benchmarks" / "wise"
API_KEY = "sk-test-do-not-log-4242"


def test_wiscore_by_hand():
    assert wise.wiscore(2, 2, 2) == pytest.approx(1.0)
    assert wise.wiscore(0, 0, 0) == 0.0
    assert wise.wiscore(1, 0, 2) == pytest.approx((0.7 + 0.0 + 0.2) / 2)  # 0.45
    assert wise.wiscore(2, 1, 0) == pytest.approx(0.8)


def _rec(pid, score):
    return {"key": str(pid), "category": wise.category_of(pid), "score": score}


def test_overall_by_hand():
    records = [
        _rec(1, 0.5),
        _rec(400, 0.5),
        _rec(401, 0.4),
        _rec(568, 0.3),
        _rec(701, 0.2),
        _rec(801, 0.1),
        _rec(901, 0.0),
        _rec(902, None),
    ]
    s = wise.summarize(records)
    assert s["categories"]["culture"] == {"score": 0.5, "n": 2}
    assert s["categories"]["chemistry"] == {"score": 0.0, "n": 1}  # the unscored image is not a zero
    # 0.4*0.5 + 0.167*0.4 + 0.133*0.3 + 0.1*(0.2 + 0.1 + 0.0)
    assert s["overall"] == pytest.approx(0.2 + 0.0668 + 0.0399 + 0.03)
    assert s["unscored"] == ["902"] and s["judged"] == 7
    partial = wise.summarize([_rec(1, 0.5), _rec(401, 0.2)])
    assert partial["overall"] is None
    assert partial["overall_partial"] == pytest.approx((0.4 * 0.5 + 0.167 * 0.2) / 0.567)
    assert sum(wise.WEIGHTS.values()) == pytest.approx(1.0)


def test_category_boundaries():
    cases = {
        1: "culture",
        400: "culture",
        401: "time",
        567: "time",
        568: "space",
        700: "space",
        701: "biology",
        800: "biology",
        801: "physics",
        900: "physics",
        901: "chemistry",
        1000: "chemistry",
    }
    assert {pid: wise.category_of(pid) for pid in cases} == cases
    with pytest.raises(ValueError):
        wise.category_of(1001)


def test_extract_scores():
    assert wise.extract_scores("Consistency: 2\nRealism: 1\nAesthetic Quality: 0") == {
        "consistency": 2.0,
        "realism": 1.0,
        "aesthetic_quality": 0.0,
    }
    assert wise.extract_scores("**Consistency**: 1\n**Realism**：2\naesthetic quality 1")["realism"] == 2.0
    assert wise.extract_scores("Consistency: 2\nRealism: 1") is None  # a score missing
    assert wise.extract_scores("Consistency: 5\nRealism: 1\nAesthetic Quality: 0") is None  # outside 0-2
    assert wise.extract_scores("") is None


@pytest.mark.skipif(not SHARED_WISE.exists(), reason="shared benchmark data not present")
def test_shared_prompt_files():
    prompts = wise.load_prompts(SHARED_WISE)
    assert [p["prompt_id"] for p in prompts] == list(range(1, 1001))
    counts = {}
    for p in prompts:
        counts[wise.category_of(p["prompt_id"])] = counts.get(wise.category_of(p["prompt_id"]), 0) + 1
    assert counts == {"culture": 400, "time": 167, "space": 133, "biology": 100, "physics": 100, "chemistry": 100}
    assert len(wise.select_prompts(prompts, subset=["time", "space"], limit=3)) == 6


# ---- end to end against a fake OpenAI-compatible server ------------------------------------------------
PROMPTS = [  # one per category, so the overall is defined
    {
        "prompt_id": 1,
        "Prompt": "Traditional food of the Mid-Autumn Festival",
        "Explanation": "mooncakes",
        "Category": "Cultural knowledge",
        "Subcategory": "Festival",
    },
    {
        "prompt_id": 401,
        "Prompt": "A clock tower at noon",
        "Explanation": "short shadows",
        "Category": "time",
        "Subcategory": "Horizontal time",
    },
    {
        "prompt_id": 568,
        "Prompt": "A view from below a bridge",
        "Explanation": "looking up",
        "Category": "space",
        "Subcategory": "Perspective",
    },
    {
        "prompt_id": 701,
        "Prompt": "An apple tree in autumn",
        "Explanation": "yellow leaves",
        "Category": "Biology",
        "Subcategory": "State",
    },
    {
        "prompt_id": 801,
        "Prompt": "Ice floating in water",
        "Explanation": "ice floats",
        "Category": "Physics",
        "Subcategory": "Mechanics",
    },
    {
        "prompt_id": 901,
        "Prompt": "Copper burning in a flame",
        "Explanation": "green flame",
        "Category": "Chemistry",
        "Subcategory": "Combustion",
    },
]
RUBRIC = {  # prompt -> (consistency, realism, aesthetic)
    "Traditional food of the Mid-Autumn Festival": (2, 1, 1),
    "A clock tower at noon": (1, 1, 1),
    "A view from below a bridge": (0, 2, 1),
    "An apple tree in autumn": (2, 2, 2),
    "Ice floating in water": (1, 0, 0),
    "Copper burning in a flame": (2, 0, 1),
}
RATE_LIMITED_ONCE = "A clock tower at noon"
SERVER_ERROR_ONCE = "A view from below a bridge"
TIMEOUT_ONCE = "Copper burning in a flame"
MALFORMED_ONCE = "An apple tree in autumn"
ALWAYS_MALFORMED = "Ice floating in water"


class FakeJudge(BaseHTTPRequestHandler):
    seen: list = []  # (prompt, auth header, body) per request
    counts: dict = {}

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][1]["content"][0]["text"]
        prompt = text.split('PROMPT: "')[1].split('"\n')[0]
        FakeJudge.seen.append((prompt, self.headers.get("Authorization"), body))
        k = FakeJudge.counts[prompt] = FakeJudge.counts.get(prompt, 0) + 1
        if prompt == RATE_LIMITED_ONCE and k == 1:
            return self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}}, {"retry-after": "0"})
        if prompt == SERVER_ERROR_ONCE and k == 1:
            return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
        if prompt == TIMEOUT_ONCE and k == 1:
            time.sleep(2.5)  # past the client's timeout_s (2 s: ample for a normal answer on a loaded machine)
        if (prompt == MALFORMED_ONCE and k == 1) or prompt == ALWAYS_MALFORMED:
            reply = "This image is lovely and I would rate it highly."
        else:
            c, r, a = RUBRIC[prompt]
            reply = f"**Consistency**: {c}\nRealism: {r}\nAesthetic Quality: {a}"
        self._send(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_server():
    FakeJudge.seen, FakeJudge.counts = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_end_to_end_with_fake_judge(tmp_path, fake_server, monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", API_KEY)
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(PROMPTS))
    prompts = wise.load_prompts(prompts_file)
    out = tmp_path / "run"
    assert wise.generate_wise(NoiseGenerator(size=16), prompts, out, progress=False)["generated"] == 6
    config = wise.JudgeConfig(
        base_url=fake_server,
        model="fake-vlm",
        api_key_env="FAKE_JUDGE_KEY",
        backoff_s=0.01,
        max_workers=3,
        timeout_s=2.0,
    )
    summary = wise.judge_wise(out, prompts, config, progress=False)

    # the request is WISE's: model, temperature 0, system + protocol text + the PNG as a data URL
    prompt, auth, body = next(s for s in FakeJudge.seen if s[0] == PROMPTS[0]["Prompt"])
    assert auth == f"Bearer {API_KEY}" and body["model"] == "fake-vlm" and body["temperature"] == 0.0
    assert body["messages"][0]["content"][0]["text"] == wise.SYSTEM_TEXT
    assert 'EXPLANATION: "mooncakes"' in body["messages"][1]["content"][0]["text"]
    url = body["messages"][1]["content"][1]["image_url"]["url"]
    assert base64.b64decode(url.split(",", 1)[1]) == (out / "images" / "1.png").read_bytes()

    stats = summary["judge_stats"]
    assert stats["retries"] == 3  # the 429, the 500 and the timeout
    assert stats["malformed_replies"] == 3  # apple tree once, ice twice (1 + malformed_retries)
    assert summary["unscored"] == ["801"] and summary["judged"] == 5
    cats = summary["categories"]
    assert cats["culture"] == {"score": pytest.approx(wise.wiscore(2, 1, 1)), "n": 1}
    assert cats["biology"]["score"] == pytest.approx(1.0) and "physics" not in cats
    assert summary["overall"] is None  # physics unscored: not all six categories
    expected_partial = sum(wise.WEIGHTS[c] * cats[c]["score"] for c in cats) / sum(wise.WEIGHTS[c] for c in cats)
    assert summary["overall_partial"] == pytest.approx(expected_partial)

    records = {r["key"]: r for r in read_jsonl(out / "records.jsonl")}
    assert records["568"]["correct"] is False and records["568"]["consistency"] == 0  # rejected
    assert records["801"]["score"] is None and "malformed" in records["801"]["reasons"][0]
    scores = {r["prompt_id"]: r for r in read_jsonl(out / "scores_results.jsonl")}
    assert scores[801]["consistency"] == wise.MISSING and scores[1]["consistency"] == 2

    # resuming: cached replies are not re-asked; only the malformed one is
    before = len(FakeJudge.seen)
    again = wise.judge_wise(out, prompts, config, progress=False)
    assert len(FakeJudge.seen) - before == 2 and again["judge_stats"]["cache_hits"] == 5
    assert again["categories"] == summary["categories"]

    # the key is never written anywhere in the run
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            assert API_KEY not in path.read_text()


def test_cli_wise_end_to_end(tmp_path, fake_server, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_JUDGE_KEY", API_KEY)
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps([p for p in PROMPTS if p["Prompt"] != ALWAYS_MALFORMED]))
    judge_yaml = tmp_path / "judge.yaml"
    judge_yaml.write_text(f"base_url: {fake_server}\nmodel: fake-vlm\napi_key_env: FAKE_JUDGE_KEY\nbackoff_s: 0.01\n")
    out = tmp_path / "run"
    args = [
        "eval",
        "wise",
        "--ckpt",
        "debug:noise",
        "--out",
        str(out),
        "--prompts-dir",
        str(prompts_file),
        "--judge-config",
        str(judge_yaml),
        "--label",
        "noise",
        "--quiet",
    ]
    assert cli_main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["judged"] == 5 and summary["overall"] is None and summary["overall_partial"] is not None
    config = json.loads((out / "config.json").read_text())
    assert (
        config["judge"]["model"] == "fake-vlm" and config["label"] == "noise" and config["generator"] == "debug:noise"
    )
    assert "overall (partial)" in capsys.readouterr().out


def test_missing_key_for_remote_judge_fails_fast(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(RuntimeError, match=r"\$NO_SUCH_KEY"):
        wise.JudgeConfig(api_key_env="NO_SUCH_KEY").api_key()
    assert wise.JudgeConfig(base_url="http://127.0.0.1:9/v1", api_key_env="NO_SUCH_KEY").api_key() == "EMPTY"


def test_shipped_judge_configs_parse():
    paths = sorted((Path(__file__).resolve().parent.parent / "configs" / "eval").glob("wise_*.yaml"))
    assert paths
    for path in paths:
        config = wise.JudgeConfig.from_yaml(path)
        assert config.model and config.base_url.startswith("http") and config.temperature == 0.0


def test_wrong_key_aborts_instead_of_failing_every_image(tmp_path, monkeypatch):
    class Unauthorized(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            data = json.dumps({"error": {"message": "bad key", "type": "invalid_request_error"}}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = wise.JudgeConfig(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key_env="NONE")
        judge = wise.Judge(config, tmp_path / "cache")
        with pytest.raises(Exception, match="bad key"):
            judge.judge(PROMPTS[0], b"not really a png")
    finally:
        server.shutdown()
        server.server_close()
