"""How far a score from few images can be trusted: a 95% interval for one accuracy and an exact test for
two models judged on the same samples.

    wilson(k=3, n=30)             # (0.035, 0.256): 3 of 30 images right
    mcnemar(wins=4, losses=0)     # 0.125: 4 samples right only with model B, none only with A -> not significant

The Wilson score interval stays inside [0, 1] and keeps its coverage at small n and at 0 or n successes, where
the normal approximation (p ± 1.96 sqrt(p(1-p)/n)) collapses to a point. McNemar's exact test looks only at the
discordant pairs (right with one model, wrong with the other) of two models on the same prompts and seeds;
under "no difference" each is a fair coin, so the two-sided p-value is a binomial tail.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (default 95%) of a proportion with `k` successes out of `n` trials."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson: expected 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)  # exact at the ends


def mcnemar(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: `wins` samples right only with the second model,
    `losses` right only with the first (1.0 when there are none)."""
    if wins < 0 or losses < 0:
        raise ValueError(f"mcnemar: expected counts >= 0, got wins={wins}, losses={losses}")
    m = wins + losses
    tail = sum(math.comb(m, i) for i in range(min(wins, losses) + 1)) / 2**m
    return min(1.0, 2 * tail)
