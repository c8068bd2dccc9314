"""Which faults of a chat request are retried, and how long the client waits before the next try
(common/endpoint.py runs the loop; this is the policy).

* An HTTP status: 401 / 403 / 404 and a 429 whose error code is `insufficient_quota` are fatal (every
  request would fail the same way); 408 / 409 / 5xx are transient, as are 429s (rate limited); any other
  status fails the call at once.
* Below HTTP: timeouts, connection errors (refused, reset, a body cut off before its Content-Length) and a
  200 whose body is not the JSON it announces (cut off with no Content-Length) are transient.
* `Attempts` bounds one request's retries: transient faults other than 429s up to `max_attempts` tries,
  each after an exponential backoff with jitter; 429s apart, each after at least the server's Retry-After,
  until the request has waited `rate_limit_wait_s` on them in all.
"""

from __future__ import annotations

import json
import random
from typing import Any

RETRY_STATUS = {408: "timeout", 409: "conflict", 429: "rate_limited"}  # plus every 5xx: "server_error"
FATAL_STATUS = {401, 403, 404}
TRANSPORT_MODULES = ("httpx", "httpx2", "httpcore", "h11", "anyio")  # their errors are all transport faults


class GiveUp(Exception):
    """The request has used up its retries (`Attempts.wait`); `reason` and `detail` as the caller counts them."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def status_reason(status: int, error_code: str) -> str:
    """ "fatal", "failed" (not worth a retry), or the retry reason of an HTTP error status."""
    if status in FATAL_STATUS or (status == 429 and error_code == "insufficient_quota"):
        return "fatal"
    if status not in RETRY_STATUS and status < 500:
        return "failed"
    return RETRY_STATUS.get(status, "server_error")


def transport_reason(e: Exception) -> str | None:
    """The retry reason of a fault below HTTP statuses; None for anything else (a bug: the caller raises).
    The openai client wraps most (APITimeoutError, APIConnectionError); a 200 whose body ends early with no
    Content-Length reaches the caller as the JSON decoder's error; some versions let transport errors
    through unwrapped."""
    import openai

    if isinstance(e, openai.APITimeoutError):
        return "timeout"
    if isinstance(e, openai.APIConnectionError):
        return "connection"
    if isinstance(e, (json.JSONDecodeError, openai.APIResponseValidationError)):
        return "bad_body"
    if type(e).__module__.split(".")[0] in TRANSPORT_MODULES or isinstance(e, (ConnectionError, TimeoutError)):
        return "connection"
    return None


def retry_after(e: Any) -> float | None:
    """The Retry-After header (seconds) of an HTTP error, if any."""
    try:
        return float(e.response.headers.get("retry-after", ""))
    except (ValueError, AttributeError):
        return None


class Attempts:
    """The retries of one request (module doc)."""

    def __init__(self, max_attempts: int, backoff_base_s: float, backoff_max_s: float, rate_limit_wait_s: float):
        self.max_attempts, self.base, self.cap, self.rate_limit_wait_s = (
            max_attempts,
            backoff_base_s,
            backoff_max_s,
            rate_limit_wait_s,
        )
        self.failures = 0  # transient faults other than 429s
        self.rate_limited = 0  # 429s in a row
        self.waited_on_429_s = 0.0
        self._jitter = random.Random()  # timing only; never touches the data

    def wait(self, reason: str, retry_after: float | None) -> float:
        """Seconds to wait before the next try after a fault of `reason`; `GiveUp` when there is none."""
        if reason == "rate_limited":
            self.rate_limited += 1
            seconds = self._backoff(self.rate_limited, retry_after)
            if self.waited_on_429_s + seconds > self.rate_limit_wait_s:
                raise GiveUp(reason, f"still rate limited after waiting {self.waited_on_429_s:.0f} s")
            self.waited_on_429_s += seconds
            return seconds
        self.rate_limited = 0
        self.failures += 1
        if self.failures >= self.max_attempts:
            raise GiveUp(reason, f"after {self.failures} attempts")
        return self._backoff(self.failures, retry_after)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with equal jitter: [d/2, d], d = base * 2^(attempt-1), capped; at least the
        server's Retry-After."""
        d = min(self.cap, self.base * 2 ** (attempt - 1))
        d = d / 2 + self._jitter.uniform(0, d / 2)
        return max(d, retry_after or 0.0)
