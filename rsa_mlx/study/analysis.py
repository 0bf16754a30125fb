"""Read a sweep's results: intervals over seeds, Pareto fronts, matched
helpfulness, dominance verdicts with collapse detected, a plot and a report.

The settings, their intervals and their flags are
:mod:`rsa_mlx.study.settings`'s: a flagged setting (collapsed, or below the
base model's helpfulness) is listed with its numbers but never on a front,
never "the safest", never a winner.

Per method, the front is the Pareto front of its remaining settings in
(helpfulness ↑, harm ↓). Method A *beats* a setting of B when one of A's
settings is at least as helpful and as safe within the intervals and better
on one of them beyond them (:func:`rsa_mlx.study.stats.beats`); the verdict counts
such wins both ways, and compares harm at matched helpfulness (interpolated
along each front) and model shift at matched harm.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from rsa_mlx.study.plot import PALETTE, Chart, Series, write_figure
from rsa_mlx.study.settings import (
    COLLAPSE_KEYS,
    HELPFUL,
    LABELS,
    NO_HELPFULNESS,
    RANGES,
    SHIFT,
    UNITS,
    Setting,
    aggregate,
    check_harms,
    flag,
)
from rsa_mlx.study.stats import Interval, beats, better, interpolate, pareto_front
from rsa_mlx.util.atomic import save_json, save_text

# The sweep's reading: the settings (from rsa_mlx.study.settings), then these.
__all__ = [
    "FLAGGED",
    "Setting",
    "aggregate",
    "chart",
    "compare_methods",
    "flag",
    "fronts",
    "matched",
    "report",
    "table",
    "verdict",
]


def fronts(settings: list[Setting], harm: str) -> dict[str, list[Setting]]:
    """Each method's Pareto front (helpfulness ↑, ``harm`` ↓) of the
    settings that are not flagged, sorted by helpfulness."""
    out = {}
    for method in dict.fromkeys(s.method for s in settings):
        ok = [
            s for s in settings
            if s.method == method and s.flag is None and _has(s, HELPFUL, harm)
        ]  # fmt: skip
        points = [(s.metrics[HELPFUL].mean, s.metrics[harm].mean) for s in ok]
        out[method] = [ok[i] for i in pareto_front(points)]
    return out


def _has(setting: Setting, *keys: str) -> bool:
    return all(k in setting.metrics for k in keys)


def along(front: list[Setting], x_key: str, y_key: str, x: float) -> Interval | None:
    """``y`` at ``x`` along a front sorted by ``x`` (mean and both interval
    ends interpolated linearly); ``None`` outside the front's range."""
    pts = sorted(
        (s for s in front if x_key in s.metrics and y_key in s.metrics),
        key=lambda s: s.metrics[x_key].mean,
    )
    xs = [s.metrics[x_key].mean for s in pts]
    parts = []
    for attr in ("mean", "lo", "hi"):
        parts.append(interpolate(xs, [getattr(s.metrics[y_key], attr) for s in pts], x))
    if parts[0] is None:
        return None
    return Interval(*parts, min(s.metrics[y_key].n for s in pts))


def matched(a: list[Setting], b: list[Setting], x_key: str, y_key: str, levels=3):
    """``[(x, y_a, y_b)]`` at ``levels`` points spread over the overlap of
    the two fronts' ``x`` ranges (empty when they do not overlap)."""
    ranges = []
    for front in (a, b):
        xs = [s.metrics[x_key].mean for s in front if x_key in s.metrics]
        if not xs:
            return []
        ranges.append((min(xs), max(xs)))
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    if lo > hi:
        return []
    points = (
        [lo] if hi == lo else [lo + (hi - lo) * i / (levels - 1) for i in range(levels)]
    )
    out = []
    for x in points:
        ya, yb = along(a, x_key, y_key, x), along(b, x_key, y_key, x)
        if ya is not None and yb is not None:
            out.append((x, ya, yb))
    return out


def compare_methods(settings: list[Setting], harm: str, a: str, b: str) -> str:
    """One plain-language verdict of ``a`` against ``b`` on ``harm``."""
    ok = {m: [s for s in settings if s.method == m and s.flag is None] for m in (a, b)}
    front = fronts(settings, harm)
    if not front.get(a) or not front.get(b):
        lost = [m for m in (a, b) if not front.get(m)]
        return (
            f"{a} vs {b} on {LABELS.get(harm, harm)}: no comparison "
            f"({', '.join(lost)}: every setting flagged)."
        )
    a_wins = [
        t
        for t in front[b]
        if any(beats(s.metrics, t.metrics, HELPFUL, harm) for s in ok[a])
    ]
    b_wins = [
        t
        for t in front[a]
        if any(beats(s.metrics, t.metrics, HELPFUL, harm) for s in ok[b])
    ]
    na, nb = len(front[a]), len(front[b])
    if len(a_wins) == nb and not b_wins:
        head = f"{a} DOMINATES {b}: each of {b}'s {nb} front settings is beaten by one of {a}'s, and none of {a}'s by {b}"
    elif len(b_wins) == na and not a_wins:
        head = f"{b} DOMINATES {a}: each of {a}'s {na} front settings is beaten by one of {b}'s, and none of {b}'s by {a}"
    elif a_wins and not b_wins:
        head = f"{a} is better where they differ: it beats {len(a_wins)} of {b}'s {nb} front settings, {b} beats none of {a}'s"
    elif b_wins and not a_wins:
        head = f"{b} is better where they differ: it beats {len(b_wins)} of {a}'s {na} front settings, {a} beats none of {b}'s"
    elif a_wins and b_wins:
        head = f"mixed: {a} beats {len(a_wins)} of {b}'s {nb} front settings and {b} beats {len(b_wins)} of {a}'s {na}"
    else:
        head = "neither beats the other: no setting of one is better than a front setting of the other beyond the 95% intervals"
    text = f"{a} vs {b} on {LABELS.get(harm, harm)}: {head}."
    name = LABELS.get(harm, harm)
    pairs = matched(front[a], front[b], HELPFUL, harm)
    if pairs:
        parts = [f"{x:.3f}: {ya} {_sign(ya, yb)} {yb}" for x, ya, yb in pairs]
        text += (
            f" {name} at matched helpfulness ({a} vs {b}; < and > only beyond "
            "the intervals): " + "; ".join(parts) + "."
        )
    else:
        spans = [
            f"{m}'s front spans helpfulness {_span(front[m], HELPFUL)}" for m in (a, b)
        ]
        text += f" No matched comparison: {' and '.join(spans)}."
    shift = matched(front[a], front[b], harm, SHIFT, levels=2)
    if shift:
        parts = [f"at {x:.4g}: {ya} {_sign(ya, yb)} {yb}" for x, ya, yb in shift]
        text += f" KL shift at matched {name} ({a} vs {b}): " + "; ".join(parts) + "."
    return text


def _sign(a: Interval, b: Interval) -> str:
    order = better(a, b, False)
    return "<" if order > 0 else ">" if order < 0 else "≈"


def _span(front: list[Setting], key: str) -> str:
    xs = [s.metrics[key].mean for s in front]
    return f"{min(xs):.4f}" if min(xs) == max(xs) else f"{min(xs):.4f}-{max(xs):.4f}"


def verdict(
    settings: list[Setting], harm: str, methods: list[str], flagged: bool = True
) -> list[str]:
    """Pairwise verdicts, RSA methods against the baselines first; with
    ``flagged``, the collapsed settings counted first and listed last."""
    order = sorted(methods, key=lambda m: (not m.startswith("rsa"), methods.index(m)))
    lines = []
    for a, b in itertools.combinations(order, 2):
        lines.append(compare_methods(settings, harm, a, b))
    flagged = [s for s in settings if s.flag] if flagged else []
    if flagged:
        counts = []
        for m in order:
            own = [s for s in settings if s.method == m]
            counts.append(f"{m} {sum(s.flag is not None for s in own)} of {len(own)}")
        lines.insert(
            0,
            "Settings that collapsed or fell below the base model's helpfulness "
            f"(a model shift too far), by method: {', '.join(counts)}. They are "
            "excluded from the fronts and comparisons below.",
        )
        lines.append(
            "Flagged: "
            + "; ".join(f"{s.label}: {s.flag}" for s in flagged[:12])
            + (" ..." if len(flagged) > 12 else "")
        )
    return lines


def chart(
    settings: list[Setting], base: dict, harm: str, ranges: dict | None = None
) -> Chart:
    """Every setting with its 95% intervals; each method's front as a line
    in the method's colour; flagged settings grey."""
    series, flagged = [], []
    front = fronts(settings, harm)
    for i, method in enumerate(dict.fromkeys(s.method for s in settings)):
        color = PALETTE[i % len(PALETTE)]
        own = [s for s in settings if s.method == method and _has(s, HELPFUL, harm)]
        if ok := [s for s in own if s.flag is None]:
            series.append(_points(method, ok, harm, color))
        if len(front.get(method, [])) > 1:
            f = front[method]
            series.append(Series(method, [s.metrics[HELPFUL].mean for s in f],
                                 [s.metrics[harm].mean for s in f], style="line", color=color))  # fmt: skip
        flagged += [s for s in own if s.flag is not None]
    if flagged:  # one grey entry, beneath the others
        series.append(_points(FLAGGED, flagged, harm, GREY, zorder=1.0))
    if HELPFUL in base and harm in base:
        series.append(Series("base", [base[HELPFUL].mean], [base[harm].mean],
                             labels=["base"], color="#000000"))  # fmt: skip
    bounds = {**RANGES, **(ranges or {})}
    name = LABELS.get(harm, harm)
    return Chart(
        f"Helpfulness vs {name}",
        f"helpfulness ↑ ({UNITS[HELPFUL]})",
        f"{name} ↓" + (f" ({UNITS[harm]})" if harm in UNITS else ""),
        series,
        xbounds=bounds.get(HELPFUL),
        ybounds=bounds.get(harm),
    )


FLAGGED = "flagged: collapsed or below base"
GREY = "#bbbbbb"
NOTE = (
    "Points: each setting's mean over seeds. Bars: 95% Student-t intervals over "
    "seeds, clipped to the range a quantity can take (a probability's [0, 1]). "
    "Lines: each method's Pareto front. A y axis whose values span two decades "
    "or more is logarithmic, and linear from 0 to its first tick."
)


def _points(
    name: str, pts: list[Setting], harm: str, color: str, zorder: float = 2.0
) -> Series:
    return Series(
        name,
        [s.metrics[HELPFUL].mean for s in pts],
        [s.metrics[harm].mean for s in pts],
        style="points",
        color=color,
        xerr=[_err(s.metrics[HELPFUL]) for s in pts],
        yerr=[_err(s.metrics[harm]) for s in pts],
        zorder=zorder,
    )


def _err(i: Interval) -> tuple[float, float]:
    return (i.mean - i.lo, i.hi - i.mean) if i.n > 1 else (0.0, 0.0)


def table(settings: list[Setting], keys: list[str]) -> str:
    """Markdown: one row per setting, mean ± half-width of the 95% interval."""
    head = (
        "| setting | seeds | "
        + " | ".join(LABELS.get(k, k) for k in keys)
        + " | status |"
    )
    lines = [head, "|---|---:|" + "---:|" * len(keys) + "---|"]
    for s in settings:
        cells = [str(s.metrics[k]) if k in s.metrics else "" for k in keys]
        lines.append(
            f"| {s.label} | {len(s.seeds)} | "
            + " | ".join(cells)
            + f" | {s.flag or 'ok'} |"
        )
    return "\n".join(lines)


def report(
    rows: list[dict],
    out: Path,
    harms: list[str],
    title: str = "Sweep",
    ranges: dict | None = None,
) -> dict:
    """Write ``report.md``, ``plot.svg``/``plot.png`` and ``summary.json``
    for a sweep's rows; return ``{"verdict": [...], "table": str}``.
    ``ranges``: the metrics' ranges beyond :data:`RANGES` (a known reward
    or cost scale), for the intervals and the axes. A harm metric no row
    has is refused before anything is written; without helpfulness (every
    reward NaN) the verdict says so and the table is written alone, with no
    fronts, verdicts or plot."""
    names = [k for r in rows for k in r.get("metrics", {})]
    check_harms(harms, names, f"the results in {out}")  # before writing
    base, stage1, settings = aggregate(rows, ranges)
    lines = [
        f"{LABELS.get(h, h)}: no setting has a value for every seed; not compared."
        for h in harms
        if not any(h in s.metrics for s in settings)
    ]
    harms = [h for h in harms if any(h in s.metrics for s in settings)]
    methods = list(dict.fromkeys(s.method for s in settings))
    helpful = any(HELPFUL in s.metrics for s in settings)
    keys = [HELPFUL] * helpful + harms + [k for k in (*COLLAPSE_KEYS, SHIFT, "shift_kl_cvar", "shift_logratio_cvar")
                                          if any(k in s.metrics for s in settings)]  # fmt: skip
    if not helpful:  # no second axis: no fronts, no verdicts; the table stays
        lines.append(NO_HELPFULNESS)
    for harm in harms if helpful else []:  # the flagged settings are said once
        lines += verdict(settings, harm, methods, flagged=harm == harms[0])
    charts = [chart(settings, base, h, ranges) for h in harms if helpful]
    if helpful and any(SHIFT in s.metrics for s in settings):  # the model shift
        charts.append(chart(settings, base, SHIFT, ranges))
    _plot(out, charts)
    base_row = " | ".join(
        f"{LABELS.get(k, k)} {base[k].mean:.4g}" for k in keys if k in base
    )
    stage1_table = table(stage1, keys) if stage1 else "(no shared stage 1)"
    main = table(settings, keys)
    cells = len([r for r in rows if r["kind"] == "cell"])
    head = f"{cells} cells, {len(settings)} settings"
    tables = (main, stage1_table)
    text = _report_text(title, head, base_row, lines, tables, bool(charts))
    save_text(out / "report.md", text)
    save_json(out / "summary.json", _summary(lines, base, settings, harms))
    return {"verdict": lines, "table": main, "stage1": stage1_table}


PLOT_LINK = "![fronts](plot.svg) ([PNG](plot.png))"


def _plot(out: Path, charts: list[Chart]) -> None:
    """``plot.svg``/``plot.png``, or none (an older one removed): without
    helpfulness there is no axis to plot harm against."""
    if charts:
        write_figure(out / "plot.svg", charts, columns=min(2, len(charts)), note=NOTE)
        return
    for name in ("plot.svg", "plot.png"):
        (out / name).unlink(missing_ok=True)


def _report_text(
    title: str, head: str, base_row: str, lines: list[str], tables: tuple[str, str],
    plot: bool,
) -> str:  # fmt: skip
    main, stage1 = tables
    figure = PLOT_LINK if plot else "(No plot: it needs helpfulness against harm.)"
    verdicts = "\n\n".join(f"- {line}" for line in lines)
    return f"""# {title}

{head}
(seeds averaged; ± is the half-width of the 95% Student-t interval over seeds,
and [lo, hi] that interval where it is clipped to the range the quantity can
take, e.g. a probability's [0, 1]).

Base model: {base_row}

## Verdict

{verdicts}

{figure}

## Settings

{main}

## Stage 1 (shared by every stage-2 setting built on it)

{stage1}
"""


def _summary(lines: list[str], base: dict, settings: list[Setting], harms) -> dict:
    """``summary.json``: the verdict, the base model, every setting's
    intervals ``[mean, lo, hi, n]`` and the fronts."""
    return {
        "verdict": lines,
        "base": {k: v.mean for k, v in base.items()},
        "settings": [
            {"method": s.method, "values": s.values, "seeds": s.seeds, "flag": s.flag,
             "metrics": {k: [v.mean, v.lo, v.hi, v.n] for k, v in s.metrics.items()}}
            for s in settings
        ],
        "fronts": {h: {m: [s.label for s in f] for m, f in fronts(settings, h).items()} for h in harms},
    }  # fmt: skip
