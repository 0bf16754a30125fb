"""Small SVG charts for reports: points, lines, labels, a legend.

A report needs two plots (helpfulness against harm, and training curves), so
rsa_mlx writes SVG itself rather than depend on a plotting library; SVG
renders on GitHub, in browsers and in Markdown viewers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#17becf", "#bcbd22"]  # fmt: skip


@dataclass
class Series:
    name: str
    x: list[float]
    y: list[float]
    style: str = "points"  # "points", "line" or "both"
    labels: list[str] = field(default_factory=list)  # optional text per point
    color: str | None = None


@dataclass
class Chart:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of 10)
    covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:.6g}"


def _free_spot(x: float, y: float, placed: list, width: float = 60, height: float = 11):
    """Move a label down (then up) until it clears the labels placed before."""
    for dy in (0, 12, -12, 24, -24, 36, -36):
        if all(abs(x - px) > width or abs(y + dy - py) > height for px, py in placed):
            placed.append((x, y + dy))
            return x, y + dy
    placed.append((x, y))
    return x, y


def render_chart(chart: Chart, width: int = 520, height: int = 360) -> str:
    """One chart as an SVG ``<g>`` of the given size (origin at top left)."""
    left, right, top, bottom = 62, 150, 34, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [v for s in chart.series for v in s.x if math.isfinite(v)]
    ys = [v for s in chart.series for v in s.y if math.isfinite(v)]
    xt = nice_ticks(min(xs, default=0.0), max(xs, default=1.0))
    yt = nice_ticks(min(ys, default=0.0), max(ys, default=1.0))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def px(v):
        return left + (v - x0) / ((x1 - x0) or 1.0) * plot_w

    def py(v):
        return top + plot_h - (v - y0) / ((y1 - y0) or 1.0) * plot_h

    out = [
        f'<text x="{left + plot_w / 2}" y="20" text-anchor="middle" font-size="14" '
        f'font-weight="bold">{escape(chart.title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#444"/>',
    ]
    for t in xt:
        out.append(
            f'<line x1="{px(t):.1f}" y1="{top}" x2="{px(t):.1f}" '
            f'y2="{top + plot_h}" stroke="#eee"/>'
        )
        out.append(
            f'<text x="{px(t):.1f}" y="{top + plot_h + 16}" text-anchor="middle" '
            f'font-size="11">{_fmt(t)}</text>'
        )
    for t in yt:
        out.append(
            f'<line x1="{left}" y1="{py(t):.1f}" x2="{left + plot_w}" '
            f'y2="{py(t):.1f}" stroke="#eee"/>'
        )
        out.append(
            f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" '
            f'font-size="11">{_fmt(t)}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle" '
        f'font-size="12">{escape(chart.xlabel)}</text>'
    )
    out.append(
        f'<text transform="translate(14,{top + plot_h / 2}) rotate(-90)" '
        f'text-anchor="middle" font-size="12">{escape(chart.ylabel)}</text>'
    )
    placed: list[tuple[float, float]] = []  # label anchors, to avoid overlaps
    for i, s in enumerate(chart.series):
        color = s.color or PALETTE[i % len(PALETTE)]
        points = [
            (px(a), py(b))
            for a, b in zip(s.x, s.y)
            if math.isfinite(a) and math.isfinite(b)
        ]
        if s.style in ("line", "both") and len(points) > 1:
            path = " ".join(f"{a:.1f},{b:.1f}" for a, b in points)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" '
                'stroke-width="1.8"/>'
            )
        if s.style in ("points", "both"):
            for j, (a, b) in enumerate(points):
                out.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="4" fill="{color}"/>')
                if j < len(s.labels) and s.labels[j]:
                    lx, ly = _free_spot(a + 6, b - 6, placed)
                    out.append(
                        f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="10" '
                        f'fill="{color}">{escape(s.labels[j])}</text>'
                    )
        ly = top + 14 + 16 * i
        out.append(
            f'<rect x="{left + plot_w + 12}" y="{ly - 9}" width="10" height="10" '
            f'fill="{color}"/>'
        )
        out.append(
            f'<text x="{left + plot_w + 27}" y="{ly}" font-size="11">'
            f"{escape(s.name)}</text>"
        )
    return "\n".join(out)


def figure(
    charts: list[Chart], columns: int = 2, width: int = 520, height: int = 360
) -> str:
    """A standalone SVG document with the charts on a grid."""
    rows = math.ceil(len(charts) / columns)
    cols = min(columns, len(charts))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * width}" '
        f'height="{rows * height}" font-family="Helvetica, Arial, sans-serif">',
        f'<rect width="{cols * width}" height="{rows * height}" fill="white"/>',
    ]
    for i, chart in enumerate(charts):
        x, y = (i % columns) * width, (i // columns) * height
        parts.append(f'<g transform="translate({x},{y})">')
        parts.append(render_chart(chart, width, height))
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


def write_figure(path: str | Path, charts: list[Chart], columns: int = 2) -> Path:
    path = Path(path)
    path.write_text(figure(charts, columns))
    return path
