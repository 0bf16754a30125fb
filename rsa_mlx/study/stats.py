"""Statistics for comparing methods across seeds: intervals, Pareto fronts,
interpolation along a front, and dominance within intervals.

An interval is the Student-t 95% interval of a mean over seeds. For a
quantity that cannot leave a range (a probability: [0, 1]) it is clipped to
that range: the true mean lies in the range, so clipping never drops it from
the interval and the coverage stays that of the t-interval, while no
interval shows a negative probability. (With 2-5 seeds a bootstrap interval
covers far less than 95%, and a Wilson interval needs counts of trials,
which an exact probability or a mean over seeds does not have.)

Pure functions of numbers (no MLX): the sweep report (:mod:`rsa_mlx.report`)
builds on them, and each is tested against a closed form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Two-sided 95% quantiles t_{0.975, df} of Student's t, df = 1..30.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622,
    2.2281, 2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009,
    2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518,
    2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959964


def t_quantile(df: int) -> float:
    """``t_{0.975, df}``: exact table to df = 30, then the Cornish-Fisher
    expansion ``z + (z^3 + z) / (4 df) + (5z^5 + 16z^3 + 3z) / (96 df^2)``."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


PROBABILITY = (0.0, 1.0)  # the range of a probability or a rate
NONNEGATIVE = (0.0, math.inf)  # e.g. a KL divergence


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds and its 95% confidence interval [lo, hi]."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.4g}"
        below, above = self.mean - self.lo, self.hi - self.mean
        if math.isclose(below, above, rel_tol=1e-9, abs_tol=1e-12 * abs(self.mean)):
            return f"{self.mean:.4g} ± {self.half:.2g}"
        # clipped to its range: the two sides differ
        return f"{self.mean:.4g} [{self.lo:.2g}, {self.hi:.2g}]"


def mean_ci(
    values: Sequence[float], bounds: tuple[float, float] | None = None
) -> Interval:
    """Mean and Student-t 95% interval of finite ``values``:
    ``mean ± t_{0.975, n-1} · s / sqrt(n)`` with ``s`` the sample standard
    deviation (``n - 1`` in the denominator). One value: a zero-width
    interval (``n = 1`` says there is no spread to measure). None of them
    finite: NaN.

    ``bounds``: the range the quantity cannot leave (:data:`PROBABILITY`,
    :data:`NONNEGATIVE`); the interval is clipped to it (see the module
    doc)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    lo, hi = bounds or (-math.inf, math.inf)
    mean = min(max(math.fsum(xs) / n, lo), hi)  # a sum's rounding only
    if n == 1:
        return Interval(mean, mean, mean, 1)
    s = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1) * s / math.sqrt(n)
    return Interval(mean, max(mean - half, lo), min(mean + half, hi), n)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when ``x`` is maximised and ``y``
    minimised (``q`` dominates ``p`` if ``q.x >= p.x``, ``q.y <= p.y`` and
    one is strict), sorted by ``x``. Duplicates are all kept."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (qx >= x and qy <= y) and (qx > x or qy < y)
            for j, (qx, qy) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """Piecewise-linear ``y(x)`` through points sorted by ``x``; ``None``
    outside ``[xs[0], xs[-1]]`` (no extrapolation)."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0]  # a single point


def better(a: Interval, b: Interval, higher: bool) -> int:
    """+1 if ``a`` is better than ``b`` beyond both intervals (they do not
    overlap), -1 if worse, 0 if the intervals overlap. Without intervals
    (one seed) the means decide."""
    if higher:
        a, b = (
            Interval(-a.mean, -a.hi, -a.lo, a.n),
            Interval(-b.mean, -b.hi, -b.lo, b.n),
        )
    if a.hi < b.lo or (a.n < 2 and b.n < 2 and a.mean < b.mean):
        return 1
    if b.hi < a.lo or (a.n < 2 and b.n < 2 and b.mean < a.mean):
        return -1
    return 0


def beats(
    a: dict[str, Interval], b: dict[str, Interval], helpful: str, harm: str
) -> bool:
    """``a`` dominates ``b`` within the intervals: not worse on helpfulness
    (↑) or on harm (↓), and better on at least one."""
    h, s = better(a[helpful], b[helpful], True), better(a[harm], b[harm], False)
    return h >= 0 and s >= 0 and (h > 0 or s > 0)
