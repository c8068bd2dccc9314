"""A local OpenAI-compatible `/v1/chat/completions` server for tests: stdlib http.server in a thread on
127.0.0.1. It answers with a test-supplied function and injects faults from a script, so the REAL
`openai` client and the real pipelines run against it; the server only decides what goes wrong.

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
averaged over that span (requests in flight as the server sees them). HTTP/1.1 with keep-alive, as
providers serve.

`shapes_answer` answers like a perfect model of the shapes world: scene graphs by parsing the prompt,
judgements by running the pixel judge on the image the request carries.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MALFORMED = '{"objects": [{"name": "cube", "color": '  # cut off mid-object


def first_user_text(body: dict) -> str:
    for m in body.get("messages", []):
        if m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if p.get("type") == "text")
    return ""


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the listen backlog: 5 by default, too few for 32 connections opened at once


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
        self._httpd = _Server(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

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

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive; every answer has a Content-Length unless cut off

            def log_message(self, *args):  # keep test output clean
                pass

            def _cut_off(self, data: bytes, announce_length: bool) -> None:
                """Half of a 200's body, then the connection closes."""
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if announce_length:
                    self.send_header("Content-Length", str(len(data)))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.rfile.close()  # its reference keeps the socket open otherwise
                self.connection.close()  # with linger 0: a reset (RST), not a FIN

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout fault)
                    pass

            def _error(self, status: int, message: str, headers: dict | None = None) -> None:
                self._send(status, {"error": {"message": message, "type": "fake", "code": status}}, headers)

            def do_POST(self):
                server._handling(+1)
                try:
                    self._answer()
                finally:
                    server._handling(-1)

            def _answer(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not self.path.endswith("/chat/completions"):
                    return self._error(404, f"no route {self.path}")
                body = json.loads(raw)
                fault = server._next_fault(body, raw)
                if fault == "overflow":
                    return self._error(400, "fake server: request budget exhausted")
                if fault == "no_json_schema":
                    return self._error(400, "response_format json_schema is not supported by this server")
                if fault.startswith("429@"):
                    return self._error(429, "fake rate limit", {"Retry-After": fault[4:]})
                if fault == "quota":
                    return self._send(
                        429, {"error": {"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}}
                    )
                if fault == "reset":
                    return self._reset()
                if fault.isdigit():  # "429", "500", "401", ...
                    if fault != "429":
                        time.sleep(server.delay)  # a server error after the work
                    return self._error(
                        int(fault), f"fake HTTP {fault}", {"Retry-After": "0"} if fault == "429" else None
                    )
                if server.delay:
                    time.sleep(server.delay)
                if fault == "timeout":
                    time.sleep(server.timeout_sleep)
                    return self._error(500, "late")
                content = server.replies[fault] if fault in server.replies else server.answer(body)
                reply = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "fake"),
                    "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }
                if fault in ("cutoff", "cutoff_eof"):
                    return self._cut_off(json.dumps(reply).encode(), announce_length=fault == "cutoff")
                self._send(200, reply)

        return Handler


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
