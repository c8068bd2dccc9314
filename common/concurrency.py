"""How many requests an endpoint client keeps in flight: a limit that adapts to the server's rate limiting.

AIMD, as TCP does with congestion, but reacting to *sustained* rate limiting only:
* additive increase: every successful reply raises the limit by 1/limit (about +1 per round trip), up to
  the configured concurrency (other faults leave it alone);
* multiplicative decrease: a 429 lowers it by `DECREASE` when 429s make up more than `RATE_LIMITED_SHARE`
  of recent replies (an average over about two round trips of replies), at most once per round trip (the
  mean seconds of a successful request), and never for a 429 to a request sent before the last decrease
  (one of the same burst: what paces the decreases before any request has succeeded).
A few percent of 429s (a provider's noise) leave the limit where it is — each such request waits its own
Retry-After (endpoint.py); a server that rate-limits a large share of requests gets fewer of them, and the
limit recovers when the 429s stop.

The limiter also integrates requests in flight and the limit over time (`means`) and keeps the lowest limit
it came down to (`lowest`), for the run's summary and benchmarks/data_synthesis.py.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

DECREASE = 0.7  # limit multiplier on sustained rate limiting
RATE_LIMITED_SHARE = 0.25  # 429s among recent replies above which the limit decreases


class AdaptiveLimit:
    """An asyncio limiter (`async with limit:`) of at most `allowed` holders, FIFO, adapting as above.
    One event loop; `record` is called with the outcome of every request."""

    def __init__(self, maximum: int, minimum: int = 1):
        self.maximum, self.minimum = maximum, min(minimum, maximum)
        self.limit = float(maximum)
        self.in_flight = 0
        self.rate_limited_share = 0.0  # exponential average of 429s among replies
        self.round_trip_s = 0.0  # exponential average of a successful request's seconds
        self.lowest = self.allowed  # the lowest limit so far
        self._waiters: deque[asyncio.Future] = deque()
        self._last_decrease = -math.inf
        self._t0 = self._t = time.monotonic()
        self._in_flight_s = self._allowed_s = 0.0  # time integrals

    @property
    def allowed(self) -> int:
        return max(self.minimum, int(self.limit))

    # ---- holding a slot ----------------------------------------------------------------------------------
    async def __aenter__(self) -> AdaptiveLimit:
        if self.in_flight < self.allowed and not self._waiters:
            self._enter()
            return self
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # `_wake` counts us in before it resolves the future
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a slot just as we were cancelled: pass it on
                self._leave()
            else:
                self._waiters.remove(waiter)
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        self._leave()

    def _enter(self) -> None:
        self._tick()
        self.in_flight += 1

    def _leave(self) -> None:
        self._tick()
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.allowed:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._enter()
                waiter.set_result(None)

    # ---- adapting ------------------------------------------------------------------------------------------
    def record(self, outcome: str, seconds: float) -> None:
        """The outcome of one request ("ok", "rate_limited" or any other fault) and how long it took."""
        self._tick()
        weight = 1.0 / (2 * self.allowed)  # averages over about two round trips of replies
        rate_limited = outcome == "rate_limited"
        self.rate_limited_share += weight * (float(rate_limited) - self.rate_limited_share)
        if outcome == "ok":
            self.round_trip_s += 0.1 * (seconds - self.round_trip_s) if self.round_trip_s else seconds
            self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
            self._wake()
        now = time.monotonic()
        sent = now - seconds
        if (
            rate_limited
            and self.rate_limited_share > RATE_LIMITED_SHARE
            and sent >= self._last_decrease
            and now - self._last_decrease >= self.round_trip_s
        ):
            self.limit = max(float(self.minimum), self.limit * DECREASE)
            self.lowest = min(self.lowest, self.allowed)
            self._last_decrease = now

    # ---- what happened -----------------------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        dt, self._t = now - self._t, now
        self._in_flight_s += dt * self.in_flight
        self._allowed_s += dt * self.allowed

    def means(self) -> tuple[float, float]:
        """(mean requests in flight, mean limit) since the limiter was made."""
        self._tick()
        span = max(self._t - self._t0, 1e-9)
        return self._in_flight_s / span, self._allowed_s / span
