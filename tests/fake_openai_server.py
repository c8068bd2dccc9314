"""A local OpenAI-compatible `/v1/chat/completions` server for tests and benchmarks: HTTP/1.1 on asyncio
streams (one event loop in a thread, on 127.0.0.1). It answers with a test-supplied function and injects
faults from a script, so the REAL `openai` client and the real pipelines run against it; the server only
decides what goes wrong. One thread, whatever the concurrency: latency is `asyncio.sleep`, so a loaded
machine does not starve 32 server threads fighting for the GIL (which showed as half the requests "in
flight" going unhandled in benchmarks/data_synthesis.py).

Script: {key: [fault, fault, ...]} where key is the text of a request's first user message (the prompt)
and each request with that key takes the next fault; when the list is used up the request is answered
normally ("ok"). Faults:
  "429", "500", any HTTP status   an error with an OpenAI-style body (Retry-After: 0 on 429)
  "429@S"       a 429 with Retry-After: S seconds
  "quota"       a 429 whose error code is insufficient_quota (the account's quota is used up)
  "timeout"     sleep `timeout_sleep` seconds before answering, past the client's timeout
  "cutoff"      200 announcing the whole body (Content-Length), half of it sent, connection closed
  "cutoff_eof"  200 without Content-Length, half the body sent, connection closed (the body ends early)
  "reset"       the connection reset (RST) instead of an answer
  "malformed"   200 with content that is not JSON
  any name in `replies`   200 with that content (e.g. a schema-violating scene graph)
`rates` ({fault: probability}, seeded by `seed`) adds random faults to requests the script says nothing
about (benchmarks/data_synthesis.py). `requests_per_s` rate-limits like a provider: a token bucket of
that rate holding `burst` requests; a request finding it empty gets a 429 with Retry-After 1/rate.

Every request is logged (key, fault, sha256 of the body, arrival time). At most `max_requests` are
answered; later ones get HTTP 400 and set `overflow`. `delay` slows every answer with a body (a model's
latency; 429s are immediate, as a provider's are). `mean_in_flight(t0, t1)`: the requests being handled,
averaged over that span (requests in flight as the server sees them, from the request line read to the
answer written). HTTP/1.1 with keep-alive, as providers serve.

`shapes_answer` answers like a perfect model of the shapes world: scene graphs by parsing the prompt,
judgements by running the pixel judge on the image the request carries.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from http import HTTPStatus

MALFORMED = '{"objects": [{"name": "cube", "color": '  # cut off mid-object


def first_user_text(body: dict) -> str:
    for m in body.get("messages", []):
        if m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if p.get("type") == "text")
    return ""


class FakeOpenAIServer:
    def __init__(
        self,
        answer: Callable[[dict], str],
        script: dict[str, list[str]] | None = None,
        replies: dict[str, str] | None = None,
        key: Callable[[dict], str] = first_user_text,
        timeout_sleep: float = 1.0,
        max_requests: int = 2000,
        json_schema_supported: bool = True,
        delay: float = 0.0,
        rates: dict[str, float] | None = None,
        seed: int = 0,
        requests_per_s: float | None = None,
        burst: float = 1.0,
    ):
        self.answer, self.key, self.timeout_sleep, self.delay = answer, key, timeout_sleep, delay
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.replies = {"malformed": MALFORMED, **(replies or {})}
        self.max_requests, self.json_schema_supported = max_requests, json_schema_supported
        self.rates, self._rng = dict(rates or {}), random.Random(seed)
        self.requests_per_s = requests_per_s
        self.burst = burst
        self._bucket, self._bucket_t = burst, time.monotonic()
        self.log: list[dict] = []
        self.overflow = False
        self._lock = threading.Lock()
        self.events: list[tuple[float, int]] = [(time.monotonic(), 0)]  # (time, requests being handled from then)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-openai", daemon=True)
        self._server: asyncio.Server | None = None
        self._port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        start = asyncio.start_server(self._connection, "127.0.0.1", 0, backlog=256)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result()
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        async def close() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:  # the open connections
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def faults(self) -> dict[str, int]:
        """How many requests got each fault."""
        counts: dict[str, int] = {}
        for entry in self.log:
            counts[entry["fault"]] = counts.get(entry["fault"], 0) + 1
        return counts

    def mean_in_flight(self, t0: float, t1: float) -> float:
        """Requests being handled, averaged over [t0, t1] (time.monotonic() seconds)."""
        with self._lock:
            events = list(self.events)
        total = 0.0
        for (t, n), (t_next, _) in zip(events, [*events[1:], (t1, 0)], strict=True):
            total += n * max(0.0, min(t_next, t1) - max(t, t0))
        return total / (t1 - t0)

    def _handling(self, delta: int) -> None:
        with self._lock:
            self.events.append((time.monotonic(), self.events[-1][1] + delta))

    def _next_fault(self, body: dict, raw: bytes) -> str:
        key = self.key(body)
        fmt = (body.get("response_format") or {}).get("type")
        with self._lock:
            if len(self.log) >= self.max_requests:
                self.overflow, fault = True, "overflow"
            elif fmt == "json_schema" and not self.json_schema_supported:
                fault = "no_json_schema"  # the scripted fault waits for the client's json_object retry
            elif self.script.get(key):
                fault = self.script[key].pop(0)
            elif self.requests_per_s is not None and not self._take_token():
                fault = f"429@{1 / self.requests_per_s:.3f}"
            else:
                fault = self._random_fault()
            entry = {"key": key, "fault": fault, "sha": hashlib.sha256(raw).hexdigest(), "format": fmt}
            self.log.append({**entry, "t": time.monotonic()})
        return fault

    def _take_token(self) -> bool:  # under the lock
        now = time.monotonic()
        rate = self.requests_per_s
        self._bucket = min(self.burst, self._bucket + (now - self._bucket_t) * rate)
        self._bucket_t = now
        if self._bucket >= 1.0:
            self._bucket -= 1.0
            return True
        return False

    def _random_fault(self) -> str:  # under the lock
        u = self._rng.random()
        for fault, p in self.rates.items():
            if u < p:
                return fault
            u -= p
        return "ok"

    # ---- HTTP/1.1 ---------------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests of one keep-alive connection, one after the other."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self._handling(+1)
                try:
                    keep = await self._request(head, reader, writer)
                finally:
                    self._handling(-1)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client closed the connection (or gave up waiting: the timeout fault)
        finally:
            writer.close()

    async def _request(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close."""
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        raw = await reader.readexactly(int(headers.get("content-length", 0)))
        if not path.endswith("/chat/completions"):
            return await self._error(writer, 404, f"no route {path}")
        body = json.loads(raw)
        fault = self._next_fault(body, raw)
        if fault == "overflow":
            return await self._error(writer, 400, "fake server: request budget exhausted")
        if fault == "no_json_schema":
            return await self._error(writer, 400, "response_format json_schema is not supported by this server")
        if fault.startswith("429@"):
            return await self._error(writer, 429, "fake rate limit", {"Retry-After": fault[4:]})
        if fault == "quota":
            error = {"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}
            return await self._send(writer, 429, {"error": error})
        if fault == "reset":  # linger 0, then close: a reset (RST), not a FIN
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if fault.isdigit():  # "429", "500", "401", ...
            if fault != "429":
                await asyncio.sleep(self.delay)  # a server error after the work
            return await self._error(
                writer, int(fault), f"fake HTTP {fault}", {"Retry-After": "0"} if fault == "429" else None
            )
        await asyncio.sleep(self.delay)
        if fault == "timeout":
            await asyncio.sleep(self.timeout_sleep)
            return await self._error(writer, 500, "late")
        if fault in self.replies:
            content = self.replies[fault]
        else:  # the test's model; off the loop, so a slow one (the pixel judge) holds up no other request
            content = await asyncio.get_running_loop().run_in_executor(None, self.answer, body)
        reply = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
        if fault in ("cutoff", "cutoff_eof"):  # half the body, then the connection closes
            data = json.dumps(reply).encode()
            length = {"Content-Length": str(len(data))} if fault == "cutoff" else {"Connection": "close"}
            writer.write(_head(200, length) + data[: len(data) // 2])
            await writer.drain()
            return False
        return await self._send(writer, 200, reply)

    async def _error(
        self, writer: asyncio.StreamWriter, status: int, message: str, headers: dict | None = None
    ) -> bool:
        return await self._send(
            writer, status, {"error": {"message": message, "type": "fake", "code": status}}, headers
        )

    async def _send(
        self, writer: asyncio.StreamWriter, status: int, payload: dict, headers: dict | None = None
    ) -> bool:
        data = json.dumps(payload).encode()
        writer.write(_head(status, {"Content-Length": str(len(data)), **(headers or {})}) + data)
        await writer.drain()
        return True


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# ---- a perfect shapes-world model ---------------------------------------------------------------------------
def scene_graph_reply(prompt: str) -> dict:
    """The extraction form (SCENE_GRAPH_JSON_SCHEMA) of a shapes prompt's graph."""
    from scene_graphs.shapes import parse_prompt

    graph = parse_prompt(prompt)
    objects = [
        {
            "id": o.id,
            "name": o.name,
            "count": o.count,
            "color": o.attributes.get("color"),
            "size": o.attributes.get("size"),
            "material": None,
        }
        for o in graph.objects
    ]
    return {"objects": objects, "relations": [r.to_json() for r in graph.relations]}


def judgement_reply(body: dict) -> dict:
    import base64
    import io

    from PIL import Image

    from scene_graphs.shapes import check, parse_prompt

    parts = next(m["content"] for m in body["messages"] if m["role"] == "user")
    text = " ".join(p["text"] for p in parts if p["type"] == "text")
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    verdict = check(image, parse_prompt(text.split("The whole scene should now be:", 1)[1].strip()))
    if verdict.consistent:
        return {"verdict": "consistent", "analysis": "", "fix": ""}
    return {"verdict": "inconsistent", "analysis": "; ".join(verdict.reasons), "fix": "redraw it as described"}


def shapes_answer(body: dict) -> str:
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    if isinstance(user, list) and any(p.get("type") == "image_url" for p in user):
        return json.dumps(judgement_reply(body))
    return json.dumps(scene_graph_reply(first_user_text(body)))
