"""``rsa-mlx compare``: several ``rsa-mlx evaluate --output`` files as one
table and one helpfulness-vs-harm chart."""

from __future__ import annotations

import json
from pathlib import Path

import click

from rsa_mlx.eval import evaluate as ev
from rsa_mlx.study.plot import Chart, Series
from rsa_mlx.util.errors import InputError, quote

NOTE = (
    "Each point: one rsa-mlx evaluate result, a mean over its sampled answers "
    "(one run each: no interval). A y axis whose values span two decades or more "
    "is logarithmic, and linear from 0 to its first tick."
)


def harm_chart(summaries: dict[str, dict]):
    """Helpfulness vs mean cost; with no helpfulness in any result (a judge
    without a help question), mean cost vs CVaR_0.9, said on stderr. Some
    results with helpfulness and some without cannot share a chart: refused.
    """

    names = list(summaries)
    missing = [n for n in names if _no_number(summaries[n].get("helpfulness"))]
    if missing and len(missing) < len(names):
        raise InputError(
            f"cannot plot helpfulness vs harm: {missing[0]} has no helpfulness "
            "(a judge needs a help question for it) and others have; drop "
            "--plot or compare like with like"
        )
    x, xlabel, title = "helpfulness", "helpfulness ↑", "Helpfulness vs harm"
    if missing:
        x, xlabel, title = "mean_cost", "mean cost ↓", "Harm: mean vs tail"
        if any(_no_number(summaries[n].get("cvar_0.9")) for n in names):
            raise InputError(
                f"cannot plot: {names[0]} has neither helpfulness nor CVaR0.9 cost"
            )
        click.echo(
            "note: no result has helpfulness (judge without a help question); "
            "plotting mean cost vs CVaR0.9 cost",
            err=True,
        )
    y = "cvar_0.9" if missing else "mean_cost"
    if any(_no_number(summaries[n].get(y)) for n in names):
        raise InputError(f"cannot plot: a result has no {y!r}")
    ylabel = "CVaR0.9 cost ↓" if missing else "mean cost ↓"
    points = Series(
        "runs",
        [summaries[n][x] for n in names],
        [summaries[n][y] for n in names],
        labels=names,
    )
    # on the scorer's scale: rewards and costs per answer, of any range
    return Chart(title, _unit(xlabel, x), _unit(ylabel, y), [points])


def _unit(label: str, key: str) -> str:
    return f"{label} ({'reward' if key == 'helpfulness' else 'cost'} per answer)"


def _no_number(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def read_results(paths) -> dict[str, dict]:
    """Summaries of `rsa-mlx evaluate --output` files, named by file stem.

    Stems shared by several files are told apart by their parent folders
    (``a/eval.json`` and ``b/eval.json`` become ``a/eval`` and ``b/eval``);
    a file given twice is refused.
    """

    keys = {k for k, _ in ev.COLUMNS} | {"cvar_0.9", "cvar_0.99", "worst"}
    loaded = []
    for path in map(Path, paths):
        try:
            data = json.loads(path.read_text())
            summary = data["summary"]
            if not isinstance(summary, dict):
                raise TypeError("'summary' is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise InputError(
                f"{quote(path)}: not an `rsa-mlx evaluate` result ({e})"
            ) from None
        for key in sorted(keys & set(summary)):
            value = summary[key]
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise InputError(
                    f"{quote(path)}: summary field {key!r} is not a number ({value!r})"
                )
        loaded.append((path, summary))
    seen = {}
    for path, _ in loaded:
        if path.resolve() in seen:
            raise InputError(f"{quote(path)}: given twice")
        seen[path.resolve()] = path
    names = [p.stem for p, _ in loaded]
    for depth in range(1, 4):
        clash = {n for n in names if names.count(n) > 1}
        if not clash:
            break
        names = [
            "/".join([*p.resolve().parent.parts[-depth:], p.stem]) if n in clash else n
            for (p, _), n in zip(loaded, names)
        ]
    if len(set(names)) < len(names):
        names = [str(p) for p, _ in loaded]
    return {n: s for n, (_, s) in zip(names, loaded)}
