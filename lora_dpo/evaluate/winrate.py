"""The win rate: how often the adapter's image beats the base's image from the same prompt and seed, with a
percentile bootstrap interval that resamples whole prompts (`WinRate`, `win_rate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class WinRate:
    """How often the adapter's image beats the base's image from the same prompt and seed.

    `rate` counts a tie as half a win; `low`, `high` are the bootstrap interval of the rate, `diff_low`,
    `diff_high` that of `mean_diff` (adapter minus base score)."""

    rate: float
    low: float
    high: float
    mean_diff: float
    diff_low: float
    diff_high: float
    wins: int
    ties: int
    losses: int
    n: int


def win_rate(adapter: Any, base: Any, groups: Any = None, *, draws: int = 2000, confidence: float = 0.95,
             seed: int = 0) -> WinRate:
    """Win rate of `adapter` scores over `base` scores, compared element by element, with a percentile
    bootstrap interval. `groups` (e.g. the prompt of each comparison) are resampled as whole clusters: the
    seeds of one prompt are not independent evidence, so they must not narrow the interval as if they were."""
    a, b = np.asarray(adapter, dtype=np.float64).ravel(), np.asarray(base, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two equal-length, non-empty score lists; got {a.size} and {b.size}")
    outcome = np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))  # (N,)
    diff = a - b
    _, group = np.unique(np.arange(a.size) if groups is None else np.asarray(groups).ravel(), return_inverse=True)
    if group.size != a.size:
        raise ValueError(f"got {group.size} group labels for {a.size} comparisons")
    G = int(group.max()) + 1
    counts = np.bincount(group, minlength=G).astype(np.float64)  # (G,) comparisons per group
    # Each draw takes G groups with replacement: how often each group is taken is multinomial.
    taken = np.random.default_rng(seed).multinomial(G, np.full(G, 1.0 / G), size=draws).astype(np.float64)
    total = taken @ counts  # (draws,)
    rates = taken @ np.bincount(group, outcome, G) / total
    diffs = taken @ np.bincount(group, diff, G) / total
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(rates, [tail, 1.0 - tail])
    diff_low, diff_high = np.quantile(diffs, [tail, 1.0 - tail])
    return WinRate(rate=float(outcome.mean()), low=float(low), high=float(high), mean_diff=float(diff.mean()),
                   diff_low=float(diff_low), diff_high=float(diff_high), wins=int((outcome == 1).sum()),
                   ties=int((outcome == 0.5).sum()), losses=int((outcome == 0).sum()), n=int(a.size))
