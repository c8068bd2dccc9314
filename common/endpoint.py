"""The one client for OpenAI-compatible chat endpoints: counted retries, adaptive concurrency, image parts,
structured JSON output and a content-addressed cache of replies (call_cache.py).

Users: data_gen (scene-graph extractor and VLM judge, async, JSON schema), eval.wise (the WISE judge,
from threads) and inference.verifiers (the `vlm` critic, synchronous). Their prompts, schemas and reply
parsers stay in their own modules; everything about talking to the server is here.

* The official `openai.AsyncOpenAI` with `max_retries=0`: retries happen here, so each is counted, by
  reason, never a traceback (the policy: retries.py). Transient faults — 5xx / 408 / 409, timeouts,
  connection errors (refused, reset, a body cut off midway), a 200 whose body is not JSON — are retried
  with backoff up to `max_attempts` tries; 429s each wait at least the server's Retry-After, until a
  request has waited `rate_limit_wait_s` on them (a rate limit slows a run down, it does not fail its
  prompts). Other statuses fail at once (`CallFailed`); 401/403/404 and a used-up quota stop the caller
  (`FatalError`): a wrong key, model or URL fails every request the same way.
* Requests in flight: at most `EndpointConfig.concurrency`, lowered under sustained rate limiting and
  recovered after it (AIMD, concurrency.py). Callers may await any number of calls. A call sleeping before
  a retry runs `backoff_hook` (a context variable: data_gen's window frees the item's place meanwhile).
  `SyncChatClient` is the same client for synchronous callers (any thread): it runs an event loop of its own.
* Identical requests in flight at once are sent once (single flight): the others await the first's reply.
* `stop(reason)` (Ctrl-C, a budget; `budget()` is asked before every request) sends nothing more: calls
  waiting for a slot or sleeping before a retry raise `Stopped`; requests already sent finish and are cached.
* Structured output: `response_format={"type": "json_schema", ...}`; a server that refuses it (HTTP 400
  naming response_format) switches this client to `json_object` mode with the schema in the prompt.
* `complete_json` parses and validates a reply; an invalid reply is counted, answered with the error
  (repair), and after `repair_attempts` becomes `InvalidAfterRepair` (a `Rejected`) — never a crash,
  never kept: the exchange's replies are dropped from the cache, so a re-run asks again.
* Images go to a VLM as base64 PNG data URLs (`image_part` / `png_part`); the cache keys them by content hash.
* Replies are cached by request (`CallCache`, optional); `cache_when` keeps a reply out of the cache (a
  caller that re-asks the same request after a malformed reply, like WISE's judge). Token usage of every
  reply from the server (repairs and unusable replies included) goes to the `tokens` counter.

The API key is read from the environment variable NAMED by `api_key_env`; it is never logged, cached or
written (`EndpointConfig` holds only the name). `openai` is imported on first use: importing this module
(and `inference.settings`, which holds the critic's `EndpointConfig`) stays light.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from PIL import Image

from common.call_cache import CallCache, request_key
from common.concurrency import AdaptiveLimit
from common.images import image_to_png
from common.retries import Attempts, GiveUp, retry_after, status_reason, transport_reason

T = TypeVar("T")
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
    data_gen counts it under `rejected`. Not retried in the run: the run is deterministic."""


class InvalidAfterRepair(Rejected):
    """A reply that stayed invalid after every repair: rejected in this run, but not cached, so a re-run
    asks again (data_gen redoes its chunk)."""

    replayed = False  # every reply of the exchange came without a request (from the cache)


class CallFailed(ReasonedError):
    """A call failed for good (transient errors outlived the retries, or a non-retryable HTTP status);
    data_gen counts it under `failed` and retries the item in the next run."""


class FatalError(RuntimeError):
    """Stop the whole run (bad credentials, unknown model, a used-up quota, a backend that cannot work)."""


class Stopped(ReasonedError):
    """The client was stopped (`ChatClient.stop`: Ctrl-C, a budget) before this call was sent; a re-run
    makes it."""


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
    max_attempts: int = 6  # tries per request on 5xx / timeout / connection error / cut-off body
    backoff_base_s: float = 1.0  # first backoff; doubles per attempt, with jitter
    backoff_max_s: float = 60.0  # cap of one backoff (a server's longer Retry-After is still honoured)
    rate_limit_wait_s: float = 900.0  # a request retries 429s until it has waited this long on them in all
    concurrency: int = 16  # most requests in flight (fewer while the server rate-limits, see concurrency.py)
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
            (
                self.rate_limit_wait_s >= 0,
                f"{prefix}.rate_limit_wait_s: expected >= 0, got {self.rate_limit_wait_s}",
            ),
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
    cached: bool  # from the cache, or the reply of an identical request in flight (no request of its own)
    key: str = ""  # the request's cache key


# A context manager factory entered while a call sleeps before a retry (the call holds no request slot then):
# data_gen's window lets another item start meanwhile. Set per task; None: nothing to do.
backoff_hook: ContextVar[Callable[[], AbstractAsyncContextManager] | None] = ContextVar("backoff_hook", default=None)


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
        budget: Callable[[], str | None] | None = None,
    ):
        """`api_key` None: `resolve_api_key(cfg.api_key_env)` (strict). `name` keys the cache and the
        `requests` counter. `budget()`, asked before every request, returns why no more may be sent (then
        the client stops) or None."""
        import openai

        self.cfg, self.cache, self.name = cfg, cache, name
        self.counters = counters if counters is not None else CallStats()
        self.budget = budget
        self.mode = cfg.structured_output  # may fall back to "json_object" once per client
        key = api_key if api_key is not None else resolve_api_key(cfg.api_key_env, cfg.base_url)
        self._client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=0)
        self.limit = AdaptiveLimit(cfg.concurrency)
        self._in_flight: dict[str, asyncio.Future] = {}  # request key -> its reply, while it is being fetched
        self._fatal: str | None = None  # set by the first 401/403/404: later calls fail without a request
        self.stopped: str | None = None  # why the client sends nothing more (`stop`)
        self._stop_event: asyncio.Event | None = None  # made on the client's loop (`_sleep`)

    def __repr__(self) -> str:  # never show the key
        return f"ChatClient(name={self.name!r}, base_url={self.cfg.base_url!r}, model={self.cfg.model!r})"

    async def close(self) -> None:
        await self._client.close()

    def stop(self, reason: str) -> None:
        """Send nothing more (call on the client's loop): waiting calls raise `Stopped(reason)`."""
        if self.stopped is None:
            self.stopped = reason
            if self._stop_event is not None:
                self._stop_event.set()

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
        """The reply to `messages` from the cache, from an identical request in flight, or from the server
        (retrying transient errors); a reply from the server is cached unless `cache_when(reply)` is false."""
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
        key = request_key({"endpoint": self.name, **request})
        shared = self._in_flight.get(key)
        if shared is not None:  # single flight: this request is being sent already
            if self.cache is not None:
                self.cache.count(self.name, hit=True)
            return dataclasses.replace(await asyncio.shield(shared), cached=True)
        hit = self.cache.get(key) if self.cache is not None else None
        if self.cache is not None:
            self.cache.count(self.name, hit is not None)
        if hit is not None:
            return Reply(hit["text"], hit["usage"], hit["finish_reason"], cached=True, key=key)
        future = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            reply = await self._fetch(key, messages, schema, schema_name, seed, cache_when)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        else:
            future.set_result(reply)
        finally:
            del self._in_flight[key]
        return reply

    async def _fetch(self, key, messages, schema, schema_name, seed, cache_when) -> Reply:
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
            key=key,
        )
        for k, v in usage.items():
            self.counters.count("tokens", k, v)
        if self.cache is not None and (cache_when is None or cache_when(reply)):
            self.cache.put(key, {"text": reply.text, "usage": usage, "finish_reason": reply.finish_reason})
        return reply

    async def _send(self, messages, schema, schema_name, seed):
        """One reply from the server, retrying as retries.py decides."""
        import openai

        cfg = self.cfg
        attempts = Attempts(cfg.max_attempts, cfg.backoff_base_s, cfg.backoff_max_s, cfg.rate_limit_wait_s)
        while True:
            kwargs = dict(model=cfg.model, messages=messages, temperature=cfg.temperature, max_tokens=cfg.max_tokens)
            if seed is not None:
                kwargs["seed"] = seed
            mode = self.mode
            if schema is not None:
                kwargs.update(self._structured(messages, schema, schema_name, mode))
            wait_at_least = None
            async with self.limit:
                self._check_sendable()
                self.counters.count("requests", self.name)
                started = time.monotonic()
                try:
                    resp = await self._post(kwargs)
                    self.limit.record("ok", time.monotonic() - started)
                    return resp
                except openai.APIStatusError as e:
                    self.limit.record("rate_limited" if e.status_code == 429 else "error", time.monotonic() - started)
                    reason = self._status_reason(e, schema is not None and mode == "json_schema")
                    if reason is None:  # switched to json_object mode: ask again at once
                        continue
                    wait_at_least = retry_after(e)
                except Exception as e:
                    reason = transport_reason(e)
                    if reason is None:
                        raise
                    self.limit.record(reason, time.monotonic() - started)
            try:
                seconds = attempts.wait(reason, wait_at_least)
            except GiveUp as e:
                raise CallFailed(e.reason, e.detail) from None
            self.counters.count("retries", reason)
            await self._sleep(seconds)

    async def _post(self, body: dict[str, Any]):
        """POST /chat/completions -> `ChatCompletion`. The client's generic `post` (openai's way to call any
        endpoint) rather than `chat.completions.create`: the same request and parsing without `create`'s
        recursive transform of the parameters (plain dicts here, nothing to transform), which cost ~0.6 ms
        of CPU per request with a JSON schema, ~15% of data_gen's whole CPU per request."""
        from openai.types.chat import ChatCompletion

        return await self._client.post("/chat/completions", cast_to=ChatCompletion, body=body)

    def _check_sendable(self) -> None:
        """Raise instead of sending: a 401 seen by another call, a stop, a budget used up."""
        if self._fatal is not None:  # a call that waited for a slot while another one got a 401
            raise FatalError(self._fatal)
        if self.stopped is None and self.budget is not None:
            reason = self.budget()
            if reason is not None:
                self.stop(reason)
        if self.stopped is not None:
            raise Stopped(self.stopped)

    def _status_reason(self, e, json_schema_mode: bool) -> str | None:
        """The retry reason of an HTTP error (None: retry at once in json_object mode); raises for errors
        a retry cannot fix."""
        cfg, status = self.cfg, e.status_code
        reason = status_reason(status, str(getattr(e, "code", "") or ""))
        if reason == "fatal":
            self._fatal = f"{self.name}: HTTP {status} from {cfg.base_url} (model {cfg.model!r}): {_short(e)}; " + (
                "the account's quota is used up"
                if status == 429
                else f"check the endpoint's base_url, model and the key in ${cfg.api_key_env}"
            )
            raise FatalError(self._fatal) from e
        if status == 400 and json_schema_mode and _mentions_format(e):
            self.mode = "json_object"  # the server has no json_schema support: ask for JSON in the prompt
            return None
        if reason == "failed":
            raise CallFailed(f"http_{status}", _short(e)) from e
        return reason

    async def _sleep(self, seconds: float) -> None:
        """Sleep before a retry, in `backoff_hook`'s context; `Stopped` as soon as the client is stopped."""
        if self._stop_event is None:
            self._stop_event = asyncio.Event()
        hook = backoff_hook.get()
        async with hook() if hook is not None else contextlib.nullcontext():
            if self.stopped is None:
                try:
                    await asyncio.wait_for(self._stop_event.wait(), seconds)
                except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11
                    pass
        if self.stopped is not None:
            raise Stopped(self.stopped)

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
        model with its error for up to `repair_attempts` re-asks, then the item is `InvalidAfterRepair` and
        the exchange's replies leave the cache (a re-run asks again). An exchange replayed from the cache
        that ends invalid (cached by an earlier version, or a stricter `validate`) is asked again at once."""
        args = (messages, schema, validate, repair_attempts, schema_name, seed)
        try:
            return await self._json_exchange(*args)
        except InvalidAfterRepair as e:
            if not e.replayed:
                raise
            return await self._json_exchange(*args)

    async def _json_exchange(self, messages, schema, validate, repair_attempts, schema_name, seed):
        messages, replies = list(messages), []
        for attempt in range(repair_attempts + 1):
            reply = await self.complete(messages, schema=schema, schema_name=schema_name, seed=seed)
            replies.append(reply)
            try:
                return validate(parse_json_reply(reply))
            except InvalidReply as e:
                self.counters.count("invalid", e.reason)
                if attempt == repair_attempts:
                    if self.cache is not None:
                        self.cache.delete([r.key for r in replies])
                    failure = InvalidAfterRepair(e.reason, e.detail)
                    failure.replayed = all(r.cached for r in replies)
                    raise failure from e
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


def _short(e: Exception) -> str:
    return str(e)[:200]
