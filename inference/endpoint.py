"""The one client for OpenAI-compatible chat endpoints: counted retries, bounded concurrency, image parts,
structured JSON output and a content-addressed cache of replies (call_cache.py).

Users: data_gen (scene-graph extractor and VLM judge, async, JSON schema), eval.wise (the WISE judge,
from threads) and inference.verifiers (the `vlm` critic, synchronous). Their prompts, schemas and reply
parsers stay in their own modules; everything about talking to the server is here.

* The official `openai.AsyncOpenAI` with `max_retries=0`: retries happen here, so each is counted.
  429 / 5xx / 408 / 409 / timeouts / connection errors are retried with exponential backoff and jitter (a
  server's Retry-After is honoured, capped); other statuses fail at once (`CallFailed`), and 401/403/404
  stop the caller (`FatalError`): a wrong key, model or URL fails every request the same way.
* At most `EndpointConfig.concurrency` requests in flight (an asyncio semaphore); callers may await many.
  `SyncChatClient` is the same client for synchronous callers (any thread): it runs an event loop of its own.
* Structured output: `response_format={"type": "json_schema", ...}`; a server that refuses it (HTTP 400
  naming response_format) switches this client to `json_object` mode with the schema in the prompt.
* `complete_json` parses and validates a reply; an invalid reply is counted, answered with the error
  (repair), and after `repair_attempts` becomes `Rejected` — never a crash, never kept.
* Images go to a VLM as base64 PNG data URLs (`image_part` / `png_part`); the cache keys them by content hash.
* Replies are cached by request (`CallCache`, optional); `cache_when` keeps a reply out of the cache (a
  caller that re-asks the same request after a malformed reply, like WISE's judge).

The API key is read from the environment variable NAMED by `api_key_env`; it is never logged, cached or
written (`EndpointConfig` holds only the name). `openai` is imported on first use: importing this module
(and `inference.settings`, which holds the critic's `EndpointConfig`) stays light.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from PIL import Image

from bagel_ft.trajectory import image_to_png
from inference.call_cache import CallCache

T = TypeVar("T")
RETRY_STATUS = {408: "timeout", 409: "conflict", 429: "rate_limited"}  # plus every 5xx: "server_error"
FATAL_STATUS = {401, 403, 404}
STRUCTURED_MODES = ("json_schema", "json_object")
LOCAL_HOSTS = ("://127.0.0.1", "://localhost", "://0.0.0.0", "://[::1]")


# ---- how a call ends when it gives no usable reply ------------------------------------------------------
class ReasonedError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # short snake_case key of the callers' counters
        self.detail = detail


class InvalidReply(ReasonedError):
    """A reply that does not parse or validate (malformed_json, schema_violation, invalid_scene_graph, ...)."""


class Rejected(ReasonedError):
    """Drop this item on purpose (an invalid reply that repair could not fix, or a caller's own reason);
    data_gen counts it under `rejected`. Never retried: the run is deterministic."""


class CallFailed(ReasonedError):
    """A call failed for good (transient errors outlived the retries, or a non-retryable HTTP status);
    data_gen counts it under `failed` and retries the item in the next run."""


class FatalError(RuntimeError):
    """Stop the whole run (bad credentials, unknown model, a backend that cannot work)."""


class MissingAPIKey(ValueError):
    """`api_key_env` names an environment variable that is not set."""


# ---- configuration -------------------------------------------------------------------------------------
@dataclass
class EndpointConfig:
    """An OpenAI-compatible chat-completions server (data_gen's `endpoint:`, the `vlm` critic, WISE's judge)."""

    base_url: str = ""  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1; "" = no endpoint
    model: str = ""  # model name sent with every request
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var holding the key ("" = server needs none)
    timeout_s: float = 120.0  # per request, seconds
    max_attempts: int = 6  # tries per request on 429 / 5xx / timeout / connection error
    backoff_base_s: float = 1.0  # first backoff; doubles per attempt, with jitter
    backoff_max_s: float = 60.0  # cap of one backoff (and of a server's Retry-After)
    concurrency: int = 16  # requests in flight
    temperature: float = 0.0
    max_tokens: int = 2048
    structured_output: str = "json_schema"  # "json_schema" (falls back to "json_object" if refused) | "json_object"

    def problems(self, prefix: str = "endpoint") -> list[str]:
        """What is wrong with these values, one message per field (empty: valid)."""
        checks = [
            (
                self.structured_output in STRUCTURED_MODES,
                f"{prefix}.structured_output: expected json_schema | json_object, got {self.structured_output!r}",
            ),
            (self.concurrency >= 1, f"{prefix}.concurrency: expected >= 1, got {self.concurrency}"),
            (self.max_attempts >= 1, f"{prefix}.max_attempts: expected >= 1, got {self.max_attempts}"),
        ]
        return [msg for ok, msg in checks if not ok]


def is_local(url: str) -> bool:
    return any(h in url for h in LOCAL_HOSTS)


def resolve_api_key(api_key_env: str, base_url: str = "", *, optional_for_local: bool = False) -> str:
    """The key from $`api_key_env`. No variable named: no key. A named variable that is unset raises
    `MissingAPIKey`, unless `optional_for_local` and the server is on this machine (vLLM needs none)."""
    if not api_key_env:
        return "EMPTY"  # local servers (vLLM) accept any key
    key = os.environ.get(api_key_env)
    if key:
        return key
    if optional_for_local and is_local(base_url):
        return "EMPTY"
    raise MissingAPIKey(
        f"environment variable ${api_key_env} (api_key_env) is not set: set it to the API key of "
        f"{base_url or 'the endpoint'}"
    )


# ---- counters ------------------------------------------------------------------------------------------------
class Counters(Protocol):
    """Where the client counts: `requests` (per client name; first tries + retries), `retries` (per
    reason), `tokens` (prompt / completion of replies from the server), `invalid` (per reason).
    data_gen's `Summary` is one; `CallStats` is the plain one."""

    def count(self, counter: str, key: str = "", n: int = 1) -> None: ...


class CallStats:
    """Thread-safe counters by (counter, key)."""

    def __init__(self):
        self.counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def count(self, counter: str, key: str = "", n: int = 1) -> None:
        with self._lock:
            self.counts[counter, key] += n

    def total(self, counter: str) -> int:
        with self._lock:
            return sum(n for (c, _), n in self.counts.items() if c == counter)


# ---- messages -------------------------------------------------------------------------------------------------
def png_part(png: bytes) -> dict[str, Any]:
    """A chat message content part carrying PNG bytes as a base64 data URL."""
    url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def image_part(image: Image.Image) -> dict[str, Any]:
    """A chat message content part carrying `image` as a base64 PNG data URL."""
    return png_part(image_to_png(image))


@dataclass
class Reply:
    text: str
    usage: dict[str, int]
    finish_reason: str
    cached: bool


# ---- the client -------------------------------------------------------------------------------------------------
class ChatClient:
    """One endpoint: `await complete(messages)` / `await complete_json(...)`. Use it inside one event loop."""

    def __init__(
        self,
        cfg: EndpointConfig,
        cache: CallCache | None = None,
        counters: Counters | None = None,
        name: str = "chat",
        *,
        api_key: str | None = None,
        on_usage: Callable[[dict[str, int]], None] | None = None,
    ):
        """`api_key` None: `resolve_api_key(cfg.api_key_env)` (strict). `name` keys the cache and the
        `requests` counter. `on_usage(usage)` sees the usage of every reply, cached ones included."""
        import openai

        self.cfg, self.cache, self.name = cfg, cache, name
        self.counters = counters if counters is not None else CallStats()
        self.on_usage = on_usage
        self.mode = cfg.structured_output  # may fall back to "json_object" once per client
        key = api_key if api_key is not None else resolve_api_key(cfg.api_key_env, cfg.base_url)
        self._client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=0)
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self._fatal: str | None = None  # set by the first 401/403/404: later calls fail without a request
        self._jitter = random.Random()  # timing only; never touches the data

    def __repr__(self) -> str:  # never show the key
        return f"ChatClient(name={self.name!r}, base_url={self.cfg.base_url!r}, model={self.cfg.model!r})"

    async def close(self) -> None:
        await self._client.close()

    # ---- one request ---------------------------------------------------------------------------------
    async def complete(
        self,
        messages: list[dict],
        *,
        schema: dict | None = None,
        schema_name: str = "reply",
        seed: int | None = None,
        cache_when: Callable[[Reply], bool] | None = None,
    ) -> Reply:
        """The reply to `messages` from the cache, or from the server (retrying transient errors); a reply
        from the server is cached unless `cache_when(reply)` is false."""
        cfg = self.cfg
        request = {
            "base_url": cfg.base_url,
            "model": cfg.model,
            "messages": messages,
            "schema": schema,
            "seed": seed,
            "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens,
        }
        key, hit = self.cache.lookup(self.name, request) if self.cache is not None else (None, None)
        if hit is not None:
            self._usage(hit["usage"])
            return Reply(hit["text"], hit["usage"], hit["finish_reason"], cached=True)
        resp = await self._send(messages, schema, schema_name, seed)
        choice = resp.choices[0] if resp.choices else None
        usage = (
            {"prompt": resp.usage.prompt_tokens or 0, "completion": resp.usage.completion_tokens or 0}
            if resp.usage
            else {}
        )
        reply = Reply(
            text=(choice.message.content or "") if choice else "",
            usage=usage,
            finish_reason=(choice.finish_reason or "") if choice else "no_choices",
            cached=False,
        )
        for k, v in usage.items():
            self.counters.count("tokens", k, v)
        self._usage(usage)
        if self.cache is not None and (cache_when is None or cache_when(reply)):
            self.cache.put(key, {"text": reply.text, "usage": usage, "finish_reason": reply.finish_reason})
        return reply

    def _usage(self, usage: dict[str, int]) -> None:
        if self.on_usage is not None:
            self.on_usage(usage)

    async def _send(self, messages, schema, schema_name, seed):
        import openai

        cfg = self.cfg
        attempt = 0
        while True:
            kwargs = dict(model=cfg.model, messages=messages, temperature=cfg.temperature, max_tokens=cfg.max_tokens)
            if seed is not None:
                kwargs["seed"] = seed
            mode = self.mode
            if schema is not None:
                kwargs.update(self._structured(messages, schema, schema_name, mode))
            retry_after = None
            try:
                async with self._slots:
                    if self._fatal is not None:  # a call that waited for a slot while another one got a 401
                        raise FatalError(self._fatal)
                    self.counters.count("requests", self.name)
                    return await self._client.chat.completions.create(**kwargs)
            except openai.APIStatusError as e:
                status = e.status_code
                if status in FATAL_STATUS:
                    self._fatal = (
                        f"{self.name}: HTTP {status} from {cfg.base_url} (model {cfg.model!r}): {_short(e)}; "
                        f"check the endpoint's base_url, model and the key in ${cfg.api_key_env}"
                    )
                    raise FatalError(self._fatal) from e
                if status == 400 and schema is not None and mode == "json_schema" and _mentions_format(e):
                    self.mode = "json_object"  # the server has no json_schema support: ask for JSON in the prompt
                    continue
                if status not in RETRY_STATUS and status < 500:
                    raise CallFailed(f"http_{status}", _short(e)) from e
                reason = RETRY_STATUS.get(status, "server_error")
                retry_after = _retry_after(e)
            except openai.APITimeoutError:
                reason = "timeout"
            except openai.APIConnectionError:
                reason = "connection"
            attempt += 1
            if attempt >= cfg.max_attempts:
                raise CallFailed(reason, f"after {attempt} attempts")
            self.counters.count("retries", reason)
            await asyncio.sleep(self._backoff(attempt, retry_after))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with equal jitter: [d/2, d], d = base * 2^(attempt-1), capped."""
        d = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1))
        d = d / 2 + self._jitter.uniform(0, d / 2)
        return min(self.cfg.backoff_max_s, max(d, retry_after or 0.0))

    def _structured(self, messages: list[dict], schema: dict, name: str, mode: str) -> dict[str, Any]:
        if mode == "json_schema":
            spec = {"name": name, "schema": schema, "strict": _strict_compatible(schema)}
            return {"response_format": {"type": "json_schema", "json_schema": spec}}
        note = {
            "role": "system",
            "content": "Reply with one JSON object that matches this JSON schema:\n" + json.dumps(schema),
        }
        return {"response_format": {"type": "json_object"}, "messages": [note, *messages]}

    # ---- JSON replies with validation and repair --------------------------------------------------------
    async def complete_json(
        self,
        messages: list[dict],
        *,
        schema: dict,
        validate: Callable[[dict], T],
        repair_attempts: int,
        schema_name: str = "reply",
        seed: int | None = None,
    ) -> T:
        """`validate(parsed reply)`; an invalid reply (InvalidReply) is counted under `invalid`, shown to the
        model with its error for up to `repair_attempts` re-asks, then the item is `Rejected`."""
        messages = list(messages)
        for attempt in range(repair_attempts + 1):
            reply = await self.complete(messages, schema=schema, schema_name=schema_name, seed=seed)
            try:
                return validate(parse_json_reply(reply))
            except InvalidReply as e:
                self.counters.count("invalid", e.reason)
                if attempt == repair_attempts:
                    raise Rejected(e.reason, e.detail) from e
                messages += [
                    {"role": "assistant", "content": reply.text},
                    {
                        "role": "user",
                        "content": f"That reply is invalid ({e.reason}: {e.detail[:500]}). "
                        "Reply again with one corrected JSON object only.",
                    },
                ]
        raise AssertionError("unreachable")


class SyncChatClient:
    """`ChatClient` for synchronous callers, from any number of threads: the client lives on an event loop
    of its own (a daemon thread); `complete` blocks until the reply. Same arguments as `ChatClient`."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.client = ChatClient(*args, **kwargs)  # first: a bad key raises before a thread starts
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"endpoint-{self.client.name}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"Sync{self.client!r}"

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def complete(self, messages: list[dict], **kwargs: Any) -> Reply:
        return self._run(self.client.complete(messages, **kwargs))

    def complete_json(self, messages: list[dict], **kwargs: Any) -> Any:
        return self._run(self.client.complete_json(messages, **kwargs))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def parse_json_reply(reply: Reply) -> dict:
    """The JSON object in a reply (tolerating a ```json fence); InvalidReply when there is none."""
    if reply.finish_reason == "length":
        raise InvalidReply("truncated", "the reply hit max_tokens")
    text = reply.text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    if fenced:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidReply("malformed_json", f"{e.msg} at {e.pos}: {text[:80]!r}") from e
    if not isinstance(data, dict):
        raise InvalidReply("schema_violation", f"expected a JSON object, got {type(data).__name__}")
    return data


def _strict_compatible(schema: dict) -> bool:
    """OpenAI strict mode needs every object closed and every property required."""
    if schema.get("type") == "object":
        props = schema.get("properties", {})
        if schema.get("additionalProperties", True) is not False or set(schema.get("required", [])) != set(props):
            return False
        return all(_strict_compatible(p) for p in props.values())
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        return _strict_compatible(schema["items"])
    return True


def _mentions_format(e: Exception) -> bool:
    return bool(re.search(r"response_format|json_schema", str(e), flags=re.I))


def _retry_after(e: Any) -> float | None:
    try:
        return float(e.response.headers.get("retry-after", ""))
    except (ValueError, AttributeError):
        return None


def _short(e: Exception) -> str:
    return str(e)[:200]
