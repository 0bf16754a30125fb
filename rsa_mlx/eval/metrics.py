"""Tail metrics of per-response costs (docs/method.md §6): exact CVaR of a sample or of
a discrete distribution, and the unsafe rate, mean, CVaR_0.9, CVaR_0.99 and
worst case of a model's costs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["cvar", "tail_metrics", "weighted_cvar"]


def cvar(values: Sequence[float], level: float) -> float:
    """Mean of the worst ``1 - level`` fraction of ``values`` (upper tail).

    Exact for a finite sample: the values sorted from the largest, weighted
    ``1/n`` each, with the boundary value taking its fractional share, so
    ``cvar(x, 0) == mean(x)`` and ``cvar(x, level)`` tends to ``max(x)``.
    """
    x = np.sort(np.asarray(values, np.float64))[::-1]
    if x.size == 0:
        return float("nan")
    tail = (1.0 - level) * x.size  # how many (fractional) values are in the tail
    whole = math.floor(tail)
    total = x[:whole].sum() + (tail - whole) * (x[whole] if whole < x.size else 0.0)
    return float(total / tail) if tail > 0 else float(x[0])


def weighted_cvar(
    values: Sequence[float], weights: Sequence[float], level: float
) -> float:
    """CVaR at ``level`` of a discrete distribution: the mean of its upper
    ``1 - level`` probability mass, the boundary value taking its share."""
    v, w = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    order = np.argsort(-v, kind="stable")
    v, w = v[order], w[order] / w.sum()
    tail, taken, total = 1.0 - level, 0.0, 0.0
    for value, weight in zip(v, w):
        share = min(weight, tail - taken)
        if share <= 0:
            break
        total += share * value
        taken += share
    return float(total / tail) if tail > 0 else float(v[0])


def tail_metrics(
    costs: Sequence[float], unsafe: Sequence[bool] | None = None
) -> dict[str, float]:
    """Unsafe rate, mean cost, CVaR_0.9, CVaR_0.99 and the worst cost.

    ``unsafe`` flags each response as the scorer defines it; without it a
    response is unsafe when its cost is above 0.
    """
    c = np.asarray(costs, np.float64)
    flags = c > 0 if unsafe is None else np.asarray(unsafe, bool)
    return {
        "unsafe_rate": float(flags.mean()) if c.size else float("nan"),
        "mean_cost": float(c.mean()) if c.size else float("nan"),
        "cvar_0.9": cvar(c, 0.9),
        "cvar_0.99": cvar(c, 0.99),
        "worst": float(c.max()) if c.size else float("nan"),
    }
