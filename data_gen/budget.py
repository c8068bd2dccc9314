"""What a shard has spent over all its runs, and its caps (`run.max_requests`, `run.max_cost`).

Spend = HTTP requests sent (retries included) and tokens of the server's replies (repairs and unusable
replies included; cache hits cost nothing). Earlier runs' spend is in the shard's manifest (shards.py:
added at every chunk written and when a run ends — a SIGKILL loses the unrecorded part, so a cap may then
be passed by that much); this run's is its summary's counters. Cost = tokens x `run.prices[endpoint.model]`
(USD per million tokens); no price: no cost shown.

The endpoint client asks `exceeded()` before every request; at a cap it sends nothing more, requests already
sent finish (so the cost may pass its cap by what they cost), and the run stops cleanly; a re-run with the
cap raised continues where it stopped.
"""

from __future__ import annotations

from data_gen.config import RunConfig
from data_gen.summary import Summary


class Budget:
    def __init__(self, cfg: RunConfig, model: str, before: dict[str, int], this_run: Summary):
        """`before`: what earlier runs spent (`ShardOutput.spent()`); `this_run`: this run's counters."""
        self.cfg, self.before, self.this_run = cfg, before, this_run
        self.price = cfg.prices.get(model)

    def this_run_spend(self) -> dict[str, int]:
        """This run's spend in the manifest's terms (`ShardOutput.record_spend`)."""
        s = self.this_run
        return {
            "requests": s.total("requests"),
            "prompt_tokens": s.total("tokens", "prompt"),
            "completion_tokens": s.total("tokens", "completion"),
        }

    def spent(self) -> dict[str, int]:
        """Every run's spend, this one's included."""
        now = self.this_run_spend()
        return {k: self.before.get(k, 0) + v for k, v in now.items()}

    def cost(self, spent: dict[str, int] | None = None) -> float | None:
        """Estimated USD of `spent` (default: every run's); None without a price for the model."""
        if self.price is None:
            return None
        spent = spent or self.spent()
        return (
            spent["prompt_tokens"] * self.price["prompt"] + spent["completion_tokens"] * self.price["completion"]
        ) / 1e6

    def exceeded(self) -> str | None:
        """Why no further request may be sent, or None."""
        spent = self.spent()
        cap = self.cfg.max_requests
        if cap and spent["requests"] >= cap:
            return f"budget: {spent['requests']} requests sent, run.max_requests={cap}"
        cost = self.cost(spent)
        if self.cfg.max_cost and cost is not None and cost >= self.cfg.max_cost:
            return f"budget: ${cost:.4f} spent, run.max_cost={self.cfg.max_cost:g}"
        return None
