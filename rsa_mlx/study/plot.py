"""Charts for reports: points, lines, labels, one legend, as SVG and PNG.

Rendered with matplotlib's Agg backend (no display, no system tools), so one
figure is written as ``name.svg`` (GitHub, browsers, Markdown viewers) and
``name.png`` (anything that shows images). Point labels are placed by
:func:`place_labels`: each label goes to the first spot around its point
that overlaps no label placed before it and no marker, with a thin leader
line when it had to move away.

A figure has one legend for all its charts (series of one name are one
entry). An axis stops at the range its quantity can take (a chart's
``ybounds``: a probability never shows below 0), and a y axis whose values
span decades is drawn on a log scale (:func:`log_threshold`), linear below
its first decade so that 0 has a place.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from rsa_mlx.util.atomic import write_atomic

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#17becf", "#bcbd22"]  # fmt: skip

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (points, y up)


@dataclass
class Series:
    name: str
    x: list[float]
    y: list[float]
    style: str = "points"  # "points", "line" or "both"
    labels: list[str] = field(default_factory=list)  # optional text per point
    color: str | None = None
    # Error bars: (below, above) distances per point, e.g. a 95% interval.
    xerr: list[tuple[float, float]] | None = None
    yerr: list[tuple[float, float]] | None = None
    zorder: float = 2.0  # lower: drawn beneath the others (matplotlib's default 2)


@dataclass
class Chart:
    title: str
    xlabel: str  # with the unit, e.g. "KL shift (nats/token)"
    ylabel: str
    series: list[Series]
    # The range each axis's quantity can take, e.g. (0, 1) for a probability:
    # the axis stops there. None: unbounded.
    xbounds: tuple[float, float] | None = None
    ybounds: tuple[float, float] | None = None
    ylog: bool = True  # a log y axis where its values span decades


# ------------------------------------------------------------------ scales

LOG_SPAN = 2.0  # decades between the smallest and largest value: a log axis
LOG_DEPTH = 4.0  # decades shown at most below the largest value


def log_threshold(values: list[float]) -> float | None:
    """Where a symmetric-log axis for ``values`` turns linear, or ``None``
    for a linear axis.

    Log when no value is negative and the positive ones span
    :data:`LOG_SPAN` decades or more (rare rates next to common ones). The
    axis is linear from 0 to the power of ten at or below the smallest
    positive value, but at most :data:`LOG_DEPTH` decades below the largest:
    zeros are drawn, and values far below the rest sit near 0, as they
    would on a linear axis.
    """
    finite = [v for v in values if math.isfinite(v)]
    positive = [v for v in finite if v > 0]
    if not positive or min(finite) < 0:
        return None
    low, top = min(positive), max(positive)
    if top < low * 10**LOG_SPAN:
        return None
    return 10.0 ** math.floor(math.log10(max(low, top / 10**LOG_DEPTH)))


# ------------------------------------------------------------ label placement


def overlaps(a: Box, b: Box, pad: float = 0.0) -> bool:
    return not (
        a[2] + pad <= b[0]
        or b[2] + pad <= a[0]
        or a[3] + pad <= b[1]
        or b[3] + pad <= a[1]
    )


def _candidates(gap: float, w: float, h: float, rings: int):
    """Lower-left corners (relative to the point) of spots around it,
    nearest first: right, above, left, below and the diagonals, then
    further out."""
    for ring in range(rings):
        r = gap + ring * (h + 1.0)
        yield from (
            (r, -h / 2),  # right
            (r, r * 0.3),  # upper right
            (r, -h - r * 0.3),  # lower right
            (-w / 2, r),  # above
            (-w / 2, -h - r),  # below
            (-w - r, -h / 2),  # left
            (-w - r, r * 0.3),  # upper left
            (-w - r, -h - r * 0.3),  # lower left
        )


def place_labels(
    points: list[tuple[float, float]],
    sizes: list[tuple[float, float]],
    bounds: Box | None = None,
    marker: float = 4.0,
    gap: float = 5.0,
    rings: int = 40,
) -> list[Box]:
    """Boxes for labels of ``sizes`` (width, height) at ``points``, no two
    overlapping and none over a marker (a ``marker``-sized square at every
    point). Coordinates are in points with y up. Spots inside ``bounds``
    are preferred; a label with no free spot within ``rings`` rings goes to
    the free spot nearest its point found further out.
    """
    markers = [(x - marker, y - marker, x + marker, y + marker) for x, y in points]
    placed: list[Box] = []
    for (x, y), (w, h) in zip(points, sizes):
        chosen = None
        fallback = None
        for dx, dy in _candidates(gap, w, h, rings):
            box = (x + dx, y + dy, x + dx + w, y + dy + h)
            if any(overlaps(box, other, 1.0) for other in placed) or any(
                overlaps(box, m) for m in markers
            ):
                continue
            inside = bounds is None or (
                box[0] >= bounds[0]
                and box[1] >= bounds[1]
                and box[2] <= bounds[2]
                and box[3] <= bounds[3]
            )
            if inside:
                chosen = box
                break
            fallback = fallback or box
        if chosen is None:
            chosen = fallback
        if chosen is None:  # nothing free nearby: stack above everything
            top = max((b[3] for b in placed + markers), default=y) + 2.0
            chosen = (x - w / 2, top, x + w / 2, top + h)
        placed.append(chosen)
    return placed


# ------------------------------------------------------------------ drawing


def _figure(
    charts: list[Chart], columns: int, width: float, height: float, note: str = ""
):
    rows = math.ceil(len(charts) / columns)
    cols = min(columns, len(charts))
    fig = Figure(figsize=(cols * width, rows * height), dpi=100)
    FigureCanvasAgg(fig)
    for i, chart in enumerate(charts):
        ax = fig.add_subplot(rows, cols, i + 1)
        _draw(ax, chart)
    fig.subplots_adjust(
        left=0.09 / cols, right=1 - 0.03 / cols, wspace=0.3, hspace=0.45
    )
    fig.subplots_adjust(bottom=0.13 / rows, top=1 - 0.09 / rows)
    _legend(fig, charts)
    if note:  # under the charts, as wide as the figure
        text = textwrap.fill(note, width=int(cols * width * 15))
        fig.text(0.01, 0.0, text, fontsize=8, color="#444444", va="top")
    fig.canvas.draw()  # lay out, so label sizes and positions are known
    for ax in fig.axes:
        _label_points(fig, ax)
    return fig


def _draw(ax, chart: Chart) -> None:
    ax.set_title(chart.title, fontsize=11, fontweight="bold")
    ax.set_xlabel(chart.xlabel, fontsize=9)
    ax.set_ylabel(chart.ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="#eeeeee", linewidth=0.8)
    ax.set_axisbelow(True)
    ax._rsa_labels = []
    for i, s in enumerate(chart.series):
        color = _color(s, i)
        keep = [
            j for j, (a, b) in enumerate(zip(s.x, s.y))
            if math.isfinite(a) and math.isfinite(b)
        ]  # fmt: skip
        pts = [(s.x[j], s.y[j], s.labels[j] if j < len(s.labels) else "") for j in keep]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        # not clipped: a point on a bound (a rate of 0) is drawn whole
        if (s.xerr or s.yerr) and pts:
            ax.errorbar(xs, ys, xerr=_bars(s.xerr, keep), yerr=_bars(s.yerr, keep),
                        fmt="none", ecolor=color, elinewidth=0.9, capsize=2, alpha=0.7,
                        clip_on=False, zorder=s.zorder)  # fmt: skip
        if s.style in ("line", "both") and len(pts) > 1:
            ax.plot(xs, ys, color=color, linewidth=1.6, clip_on=False, zorder=s.zorder,
                    marker="o" if s.style == "both" else None, markersize=4)  # fmt: skip
        elif s.style in ("points", "both"):
            ax.plot(
                xs, ys, "o", color=color, markersize=6, clip_on=False, zorder=s.zorder
            )
        if s.style in ("points", "both"):
            ax._rsa_labels += [(a, b, text, color) for a, b, text in pts if text]
    ax.margins(0.12)
    _scale(ax, chart)


def _color(s: Series, i: int) -> str:
    return s.color or PALETTE[i % len(PALETTE)]


def _scale(ax, chart: Chart) -> None:
    """The y axis log where the values span decades; both axes cut at the
    range their quantities can take."""
    # the points decide (an interval's end near 0 does not make rates rare),
    # and only where nothing drawn is below 0
    ys = [v for s in chart.series for v in s.y]
    ends = [y - below for s in chart.series for y, (below, _) in zip(s.y, s.yerr or [])]
    log = chart.ylog and not any(v < 0 for v in ends)
    threshold = log_threshold(ys) if log else None
    if threshold is not None:
        ax.set_yscale("symlog", linthresh=threshold, linscale=0.4)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_ylim(bottom=0.0)  # no value is negative
    for bounds, get, set_ in (
        (chart.xbounds, ax.get_xlim, ax.set_xlim),
        (chart.ybounds, ax.get_ylim, ax.set_ylim),
    ):
        if bounds is not None:
            lo, hi = get()
            set_(max(lo, bounds[0]), min(hi, bounds[1]))


def _legend(fig, charts: list[Chart]) -> None:
    """One legend for the figure, right of the charts: one entry per series
    name (a marker for points, a line for lines, both when a name has
    both); none for a lone series whose points all carry labels."""
    entries: dict[str, dict] = {}
    for chart in charts:
        for i, s in enumerate(chart.series):
            if not s.name or s.name.startswith("_"):
                continue
            e = entries.setdefault(
                s.name, {"color": _color(s, i), "marker": False, "line": False}
            )
            e["marker"] |= s.style in ("points", "both")
            e["line"] |= s.style in ("line", "both")
            e["labelled"] = e.get("labelled", True) and len(s.labels) >= len(s.x)
    if not entries or (len(entries) == 1 and next(iter(entries.values()))["labelled"]):
        return
    handles = [
        Line2D([], [], color=e["color"], marker="o" if e["marker"] else None,
               markersize=6 if e["marker"] else 0,
               linestyle="-" if e["line"] else "none", linewidth=1.6)
        for e in entries.values()
    ]  # fmt: skip
    fig.legend(handles, list(entries), loc="center left", bbox_to_anchor=(1.0, 0.5),
               fontsize=8, frameon=False, borderaxespad=0.0)  # fmt: skip


def _bars(err, keep: list[int]):
    """matplotlib's asymmetric error bars [[below...], [above...]]."""
    return None if not err else [[err[j][0] for j in keep], [err[j][1] for j in keep]]


def _label_points(fig, ax) -> None:
    """Labels at free spots (:func:`place_labels`), in offset points."""
    labels = getattr(ax, "_rsa_labels", [])
    if not labels:
        return
    renderer = fig.canvas.get_renderer()
    scale = 72.0 / fig.dpi  # display pixels -> points
    anchors, sizes = [], []
    for a, b, text, _ in labels:
        px, py = ax.transData.transform((a, b))
        anchors.append((px * scale, py * scale))
        probe = ax.text(0, 0, text, fontsize=8)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        sizes.append((extent.width * scale + 2, extent.height * scale + 1))
    frame = ax.get_window_extent(renderer)
    bounds = (frame.x0 * scale, frame.y0 * scale, frame.x1 * scale, frame.y1 * scale)
    boxes = place_labels(anchors, sizes, bounds)
    ax._rsa_label_boxes = boxes
    for (a, b, text, color), (x, y), box in zip(labels, anchors, boxes):
        distance = math.hypot(
            max(box[0] - x, x - box[2], 0.0), max(box[1] - y, y - box[3], 0.0)
        )
        ax.annotate(
            text,
            xy=(a, b),
            xytext=(box[0] - x + 1, box[1] - y + 0.5),
            textcoords="offset points",
            ha="left",
            va="bottom",
            fontsize=8,
            color=color,
            annotation_clip=False,
            arrowprops=(
                {
                    "arrowstyle": "-",
                    "color": color,
                    "linewidth": 0.6,
                    "alpha": 0.6,
                    "shrinkA": 0,
                    "shrinkB": 3,
                }
                if distance > 12
                else None
            ),
        )


def write_figure(
    path: str | Path,
    charts: list[Chart],
    columns: int = 2,
    width: float = 5.2,
    height: float = 3.6,
    note: str = "",
) -> Path:
    """Write the charts on a grid as SVG and PNG: ``name.svg`` and
    ``name.png`` for ``path`` = ``name.svg`` (or ``name``, ``name.png``);
    returns the SVG's path. Each chart is ``width`` x ``height`` inches;
    ``note`` is a caption under them (what the bars and lines are)."""

    path = Path(path)
    path = path.with_suffix(".svg") if path.suffix in ("", ".png") else path
    fig = _figure(charts, columns, width, height, note)
    for target, fmt, dpi in (
        (path, "svg", None),
        (path.with_suffix(".png"), "png", 150),
    ):
        write_atomic(
            target,
            lambda tmp, fmt=fmt, dpi=dpi: fig.savefig(
                tmp, format=fmt, dpi=dpi, facecolor="white", bbox_inches="tight"
            ),
        )
    return path
