"""The shared OpenAI-compatible client (common/endpoint.py) on its own: key rules, the synchronous
client from many threads against a local fake server (counted retries, cache_when), single flight, and the
adaptive concurrency limit (common/concurrency.py). Its callers' own tests: tests/test_data_gen_api.py
(async, JSON schema, every fault), tests/test_data_gen_run.py, tests/test_eval_wise.py, tests/test_scaling.py."""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from fake_openai_server import FakeOpenAIServer

from common.call_cache import CallCache
from common.concurrency import AdaptiveLimit
from common.endpoint import (
    CallStats,
    ChatClient,
    EndpointConfig,
    MissingAPIKey,
    Reply,
    SyncChatClient,
    resolve_api_key,
)


def test_api_key_rules(monkeypatch):
    monkeypatch.setenv("EP_TEST_KEY", "sk-x")
    monkeypatch.delenv("EP_NO_KEY", raising=False)
    assert resolve_api_key("", "https://api.example.com/v1") == "EMPTY"  # no variable named: no key
    assert resolve_api_key("EP_TEST_KEY", "https://api.example.com/v1") == "sk-x"
    with pytest.raises(MissingAPIKey, match=r"\$EP_NO_KEY"):
        resolve_api_key("EP_NO_KEY", "http://127.0.0.1:8000/v1")  # named but unset: an error (data_gen)
    assert resolve_api_key("EP_NO_KEY", "http://127.0.0.1:8000/v1", optional_for_local=True) == "EMPTY"
    with pytest.raises(MissingAPIKey):
        resolve_api_key("EP_NO_KEY", "https://api.example.com/v1", optional_for_local=True)


def test_sync_client_from_threads(tmp_path):
    prompts = [f"prompt {i}" for i in range(8)]

    def answer(body: dict) -> str:
        text = body["messages"][0]["content"]
        return "bad" if text == "prompt 7" else f"good {text}"

    script = {"prompt 0": ["429"], "prompt 1": ["500", "500"]}
    cfg = EndpointConfig(model="fake", api_key_env="", backoff_base_s=0.01, max_attempts=3, concurrency=2)
    with FakeOpenAIServer(answer, script) as server:
        cfg.base_url = server.url
        cache, stats = CallCache(tmp_path), CallStats()
        client = SyncChatClient(cfg, cache, stats, "t")

        def ask(p: str) -> str:
            reply = client.complete([{"role": "user", "content": p}], cache_when=lambda r: r.text != "bad")
            return reply.text

        with ThreadPoolExecutor(4) as pool:
            first = list(pool.map(ask, prompts))
            again = list(pool.map(ask, prompts))
        client.close()
    assert first == again == [f"good {p}" for p in prompts[:7]] + ["bad"]
    assert stats.counts[("retries", "rate_limited")] == 1 and stats.counts[("retries", "server_error")] == 2
    assert stats.total("requests") == 8 + 3 + 1  # first round with its 3 retries, then only the uncached reply
    assert cache.stats()["t"] == {"hits": 7, "misses": 9}
    assert len(server.log) == 12


def test_identical_requests_in_flight_are_sent_once(tmp_path):
    async def ask_five(cfg: EndpointConfig, cache: CallCache) -> list[Reply]:
        client = ChatClient(cfg, cache)
        same = [{"role": "user", "content": "the same question"}]
        replies = await asyncio.gather(*(client.complete(same) for _ in range(5)))
        await client.close()
        return replies

    with FakeOpenAIServer(lambda body: "one answer", delay=0.2) as server:
        cfg = EndpointConfig(base_url=server.url, model="fake", api_key_env="", concurrency=4)
        cache = CallCache(tmp_path)
        replies = asyncio.run(ask_five(cfg, cache))
    assert len(server.log) == 1 and [r.text for r in replies] == ["one answer"] * 5
    assert sum(not r.cached for r in replies) == 1 and cache.stats()["chat"] == {"hits": 4, "misses": 1}


def test_concurrency_limit_backs_off_on_sustained_429s_only_and_recovers():
    async def adapt() -> list[int]:
        limit, rng, seen = AdaptiveLimit(32), random.Random(0), []
        for share in (0.1, 0.5, 0.0):  # sporadic 429s, sustained rate limiting, none
            for _ in range(2000):
                limit.record("rate_limited" if rng.random() < share else "ok", 0.0)
            seen.append(limit.allowed)
        return seen

    sporadic, sustained, after = asyncio.run(adapt())
    assert sporadic >= 29 and sustained <= 2 and after == 32


def test_a_burst_of_429s_lowers_the_limit_once():
    """Ten requests sent together, all rate limited (each took 0.05 s): one decrease, not ten; a 429 to a
    request sent after that decrease lowers it again."""
    limit = AdaptiveLimit(8)
    for _ in range(10):
        limit.record("rate_limited", 0.05)
    assert limit.allowed == limit.lowest == 5  # 8 x 0.7
    limit.record("rate_limited", 0.0)  # sent just now, after the decrease
    assert limit.allowed == limit.lowest == 3  # 5.6 x 0.7


def test_the_limit_holds_callers_in_order():
    async def hold() -> tuple[list[int], int]:
        limit, order, peak = AdaptiveLimit(2), [], 0

        async def caller(i: int) -> None:
            nonlocal peak
            async with limit:
                peak = max(peak, limit.in_flight)
                order.append(i)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(caller(i) for i in range(6)))
        return order, peak

    order, peak = asyncio.run(hold())
    assert order == list(range(6)) and peak == 2
