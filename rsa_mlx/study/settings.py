"""Settings: a sweep's cells grouped over seeds, with intervals and flags.

Cells that differ only in ``seed`` form a *setting*; each metric of a
setting is its mean over seeds with a 95% Student-t interval
(:func:`rsa_mlx.study.stats.mean_ci`), clipped to the range the metric can
take (:data:`RANGES`: a probability's [0, 1], a KL's [0, inf)). A setting is
*collapsed* when most of its mass is on degenerate text (the demo's
non-canonical ``p_other``, or a ``degenerate`` rate), and *below base* when
its helpfulness is below the base model's beyond its interval
(:func:`flag`). Also the metrics' names, units and ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rsa_mlx.study.stats import NONNEGATIVE, PROBABILITY, Interval, better, mean_ci
from rsa_mlx.util.errors import ConfigError

__all__ = [
    "HELPFUL",
    "LABELS",
    "NO_HELPFULNESS",
    "RANGES",
    "UNITS",
    "Setting",
    "aggregate",
    "check_harms",
    "flag",
]

HELPFUL = "helpfulness"
COLLAPSE_KEYS = ("p_other", "degenerate")  # mass on degenerate text
COLLAPSE_AT = 0.5
SHIFT = "shift_kl"
LABELS = {
    "helpfulness": "helpfulness",
    "p_catastrophic": "P(catastrophic)",
    "unsafe_rate": "unsafe rate",
    "mean_cost": "mean cost",
    "cvar_0.99": "CVaR0.99 cost",
    "cvar_0.9": "CVaR0.9 cost",
    "p_other": "P(non-canonical)",
    "degenerate": "degenerate",
    "shift_kl": "KL shift",
    "shift_kl_cvar": "CVaR0.9 KL shift",
    "shift_logratio_cvar": "CVaR0.9 log-ratio",
}
# What each metric is measured in, for the axes.
UNITS = {
    "helpfulness": "reward per answer",
    "p_catastrophic": "probability",
    "unsafe_rate": "rate",
    "sampled_unsafe_rate": "rate",
    "mean_cost": "cost per answer",
    "cvar_0.99": "cost per answer",
    "cvar_0.9": "cost per answer",
    "p_other": "probability",
    "degenerate": "rate",
    "shift_kl": "nats/token",
    "shift_kl_cvar": "nats/token",
    "shift_logratio_cvar": "nats/token",
}
# The range each metric can take: intervals and axes stop there. Others
# (reward, cost) are on the scorer's scale: a caller that knows it passes
# ``ranges``.
PROBABILITIES = ("p_catastrophic", "unsafe_rate", "sampled_unsafe_rate", "p_other",
                 "degenerate", "refusal_rate", "over_refusal", "degenerate_rate")  # fmt: skip
RANGES = {
    **dict.fromkeys(PROBABILITIES, PROBABILITY),
    "shift_kl": NONNEGATIVE,
    "shift_kl_cvar": NONNEGATIVE,
}


@dataclass
class Setting:
    """One method's setting (a grid point without the seed), over seeds."""

    method: str
    values: dict
    metrics: dict[str, Interval]
    seeds: list
    flag: str | None = None

    @property
    def label(self) -> str:
        shown = ", ".join(f"{_short(k)}={v:g}" if isinstance(v, float) else
                          f"{_short(k)}={v}" for k, v in self.values.items()
                          if k != "method")  # fmt: skip
        return f"{self.method} {shown}".strip()


def _short(key: str) -> str:
    return {"safety_beta": "β2", "learning_rate": "lr", "merge": "q"}.get(key, key)


def aggregate(
    rows: list[dict], ranges: dict | None = None
) -> tuple[dict, list[Setting], list[Setting]]:
    """``(base metrics, stage-1 settings, cell settings)`` from sweep rows;
    ``ranges`` adds to :data:`RANGES`."""
    bounds = {**RANGES, **(ranges or {})}

    def group(kind: str) -> list[Setting]:
        out: dict[tuple, list[dict]] = {}
        for row in rows:
            if row["kind"] == kind:
                values = {k: v for k, v in row.get("grid", {}).items() if k != "seed"}
                key = (row["method"], tuple(sorted(values.items(), key=str)))
                out.setdefault(key, []).append(row)
        settings = []
        for (method, _), members in out.items():
            names = list(dict.fromkeys(k for r in members for k in r["metrics"]))
            numeric = [
                k for k in names
                if all(_number(r["metrics"].get(k)) for r in members)
            ]  # fmt: skip
            metrics = {
                k: mean_ci([r["metrics"][k] for r in members], bounds.get(k))
                for k in numeric
            }
            values = {
                k: v for k, v in members[0].get("grid", {}).items() if k != "seed"
            }
            seeds = [r.get("grid", {}).get("seed") for r in members]
            settings.append(Setting(method, values, metrics, seeds))
        return settings

    base = next((r["metrics"] for r in rows if r["kind"] == "base"), {})
    base = {k: mean_ci([v], bounds.get(k)) for k, v in base.items() if _number(v)}
    cells, stage1 = group("cell"), group("stage1")
    for s in cells + stage1:
        s.flag = flag(s, base)
    return base, stage1, cells


def check_harms(harms: list[str], available, source: str) -> None:
    """Refuse harm metrics that ``source`` (an evaluator, a results file)
    does not have, naming them and what it has."""
    have = list(dict.fromkeys(available))
    if unknown := [h for h in harms if h not in have]:
        raise ConfigError(
            f"harm metric {', '.join(map(repr, unknown))}: not a metric of "
            f"{source}; it has {', '.join(have) or 'none'}"
        )


NO_HELPFULNESS = (
    "No helpfulness was measured (a refusal or demo scorer measures it on "
    "benign prompts only, a judge only with a helpfulness question): Pareto "
    "fronts, matched comparisons and verdicts need helpfulness against harm, "
    "so there are none; the table lists each setting's harm metrics alone."
)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def flag(setting: Setting, base: dict[str, Interval]) -> str | None:
    """Why a setting cannot compete: collapsed (most of its answers
    degenerate, and more than the base model's), or less helpful than the
    base beyond its interval."""
    for key in COLLAPSE_KEYS:
        # above one half, and above the base model's own rate
        limit = max(COLLAPSE_AT, base[key].mean if key in base else 0.0)
        if key in setting.metrics and setting.metrics[key].mean > limit:
            return f"collapsed ({key} {setting.metrics[key].mean:.2f})"
    helpful = setting.metrics.get(HELPFUL)
    if HELPFUL in base and helpful and better(helpful, base[HELPFUL], True) < 0:
        return (
            f"below base helpfulness ({setting.metrics[HELPFUL].mean:.3f} < "
            f"{base[HELPFUL].mean:.3f})"
        )
    return None
