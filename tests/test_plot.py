"""Plots people can trust: no interval below a probability's 0, one legend
per figure, a log axis where rates span decades, axes with units."""

from __future__ import annotations

import json

import pytest

from rsa_mlx.study import analysis
from rsa_mlx.study.plot import Chart, Series, _figure, log_threshold


def test_log_axis_only_where_the_values_span_decades():
    assert log_threshold([0.1, 0.2, 0.5]) is None  # one decade: linear
    assert log_threshold([0.0, 0.0]) is None  # nothing positive
    assert log_threshold([-0.1, 1e-4, 0.5]) is None  # a negative value
    # zeros are drawn: the axis is linear from 0 to the first decade
    assert log_threshold([0.0, 2e-4, 0.05]) == pytest.approx(1e-4)
    assert log_threshold([3e-3, 0.5, float("nan")]) == pytest.approx(1e-3)
    # at most four decades under the largest value: far smaller ones sit near 0
    assert log_threshold([1e-9, 0.2]) == pytest.approx(1e-5)


def rows(rare: bool) -> list[dict]:
    """A base model, two methods over three seeds, one of them with rare
    catastrophes (zero on one seed), and a collapsed setting."""

    def row(kind, method, beta, seed, h, cat, other=0.01):
        metrics = {"helpfulness": h, "p_catastrophic": cat, "unsafe_rate": 2 * cat,
                   "p_other": other, "shift_kl": 0.1 + h / 10}  # fmt: skip
        grid = {"method": method, "safety_beta": beta, "seed": seed}
        return {"kind": kind, "method": method, "metrics": metrics,
                "grid": {} if kind == "base" else grid}  # fmt: skip

    out = [row("base", "base", None, None, 0.5, 0.05)]
    for seed, cat in enumerate((0.0, 2e-5, 4e-4) if rare else (0.02, 0.03, 0.04)):
        out.append(row("cell", "rsa-erm", 0.1, seed, 0.60 + seed / 100, cat))
        out.append(row("cell", "rsa-erm", 0.01, seed, 0.62 + seed / 100, 5 * cat))
        out.append(row("cell", "sacpo", 0.1, seed, 0.70 + seed / 100, 0.03 + seed / 50))
        out.append(row("cell", "sacpo", 0.01, seed, 0.1, 0.0, other=0.9))
    return out


@pytest.mark.parametrize("rare", [False, True])
def test_study_figure_never_draws_a_probability_below_0(tmp_path, rare):
    base, _, settings = analysis.aggregate(rows(rare))
    charts = [analysis.chart(settings, base, h) for h in ("p_catastrophic", "shift_kl")]
    fig = _figure(charts, columns=2, width=5.2, height=3.6)
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] <= 1.0
    for s in charts[0].series:  # every interval drawn stays in [0, 1]
        for y, (below, above) in zip(s.y, s.yerr or []):
            assert y - below >= 0.0 and y + above <= 1.0
    # rare rates next to common ones: a log axis that still shows 0
    assert ax.get_yscale() == ("symlog" if rare else "linear")
    # axes with their units
    assert ax.get_ylabel() == "P(catastrophic) ↓ (probability)"
    assert fig.axes[1].get_ylabel() == "KL shift ↓ (nats/token)"
    assert ax.get_xlabel() == "helpfulness ↑ (reward per answer)"


def test_one_legend_per_figure_with_each_name_once():
    base, _, settings = analysis.aggregate(rows(True))
    harms = ("p_catastrophic", "unsafe_rate", "p_other", "shift_kl")
    charts = [analysis.chart(settings, base, h) for h in harms]
    fig = _figure(charts, columns=2, width=5.2, height=3.6)
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    names = [t.get_text() for t in legend.get_texts()]
    # a method's points and front are one entry; flagged settings one entry
    assert names == ["rsa-erm", "sacpo", analysis.FLAGGED, "base"]


def test_no_log_axis_where_an_interval_reaches_below_0():
    # a cost on a scorer's own scale: its interval is not clipped
    s = Series("m", [0.1, 0.2], [1e-4, 0.5], yerr=[(0.0, 0.0), (0.7, 0.7)])
    fig = _figure([Chart("t", "x", "y", [s])], columns=1, width=5.2, height=3.6)
    assert fig.axes[0].get_yscale() == "linear"
    assert fig.axes[0].get_ylim()[0] < -0.2  # the whole bar is shown


def test_a_lone_labelled_series_needs_no_legend():
    chart = Chart(
        "t", "x", "y", [Series("runs", [0.1, 0.2], [0.3, 0.4], labels=["a", "b"])]
    )
    assert not _figure([chart], columns=1, width=5.2, height=3.6).legends


def test_study_report_tables_and_summary_keep_probabilities_in_0_1(tmp_path):
    analysis.report(rows(True), tmp_path, ["p_catastrophic", "unsafe_rate"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    for s in summary["settings"]:
        for key in ("p_catastrophic", "unsafe_rate", "p_other"):
            mean, lo, hi, _ = s["metrics"][key]
            assert 0.0 <= lo <= mean <= hi <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert "[0, " in report  # a clipped interval, shown with both ends
    assert "clipped to the range" in report
