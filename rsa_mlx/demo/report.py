"""The demo's report: its tables, verdict, figure and ``report.md``
(the models are evaluated by :mod:`rsa_mlx.demo.evaluation`)."""

from __future__ import annotations

import json
from pathlib import Path

from rsa_mlx.demo import world
from rsa_mlx.demo.settings import BASE_MODEL, MERGED, SEED_CHECK
from rsa_mlx.eval.evaluate import markdown_table
from rsa_mlx.study.plot import PALETTE, Chart, Series, write_figure
from rsa_mlx.study.stats import PROBABILITY
from rsa_mlx.util.atomic import save_text

EXACT_COLUMNS = [
    ("helpfulness", "helpfulness"),
    ("unsafe_rate", "unsafe rate"),
    ("mean_cost", "mean cost"),
    ("cvar_0.99", "CVaR0.99 cost"),
    ("p_catastrophic", "P(catastrophic)"),
]
SAMPLED_COLUMNS = [
    ("helpfulness", "helpfulness"),
    ("unsafe_rate", "unsafe rate"),
    ("mean_cost", "mean cost"),
    ("cvar_0.9", "CVaR0.9 cost"),
    ("cvar_0.99", "CVaR0.99 cost"),
    ("worst", "worst"),
]
NAMES = {
    "base": "base (SFT)",
    "dpo": "DPO, helpfulness only",
    "sacpo": "SACPO (DPO -> DPO)",
    "tdpo": "TDPO2 stepwise (KL)",
    "rsa-cvar": "RSA, CVaR",
    "rsa-erm": "RSA, ERM",
}


def _label(name: str) -> str:
    return NAMES.get(name, name)


def _color(name: str) -> str:
    """One colour per method on every chart of the figure."""
    names = list(NAMES)
    return PALETTE[names.index(name) % len(PALETTE)] if name in names else "#333333"


COLLAPSE_AT = 0.5  # P(non-canonical text) above which a model has collapsed


def flag(result: dict, base: dict | None) -> str | None:
    """Why a model cannot be called the safest: it collapsed (most mass on
    non-canonical text, which scores as harmless) or is less helpful than
    the base model."""
    e = result["exact"]
    if e.get("p_other", 0.0) > COLLAPSE_AT:
        return f"collapsed: P(non-canonical) {e['p_other']:.3f}"
    if base is not None and e["helpfulness"] < base["exact"]["helpfulness"]:
        return (
            f"less helpful than the base model ({e['helpfulness']:.3f} < "
            f"{base['exact']['helpfulness']:.3f})"
        )
    return None


def seed_spread(results: dict, seed: int) -> dict[str, float]:
    """The largest change of each exact metric between seed and seed + 1
    over the methods trained twice (0 when none was)."""
    out: dict[str, float] = {}
    for name in SEED_CHECK:
        again = f"{name} seed={seed + 1}"
        if name in results and again in results:
            a, b = results[name]["exact"], results[again]["exact"]
            for key in a:
                out[key] = max(out.get(key, 0.0), abs(a[key] - b[key]))
    return out


def verdict(results: dict, seed: int = 0) -> str:
    """What the numbers say about RSA against the stepwise baselines.

    A model that collapsed or is less helpful than the base is never the
    winner. A method beats another when it is safer (lower P(catastrophic))
    and not less helpful, by more than the seed-to-seed change measured on
    the methods trained twice; otherwise the difference is within noise.
    """
    if MERGED not in results:
        return "RSA (cvar) was not among the methods run; no comparison."
    base = results.get("base")
    tol = seed_spread(results, seed)
    rsa = results[MERGED]["exact"]
    lines = []
    rsa_flag = flag(results[MERGED], base)
    for other in ("sacpo", "tdpo", "rsa-erm"):
        if other not in results:
            continue
        o = results[other]["exact"]
        line = (
            f"RSA (CVaR) vs {_label(other)}: P(catastrophic) {rsa['p_catastrophic']:.4f} vs "
            f"{o['p_catastrophic']:.4f}, mean cost {rsa['mean_cost']:.3f} vs "
            f"{o['mean_cost']:.3f}, helpfulness {rsa['helpfulness']:.3f} vs "
            f"{o['helpfulness']:.3f}, P(non-canonical) {rsa['p_other']:.3f} vs "
            f"{o['p_other']:.3f}"
        )
        other_flag = flag(results[other], base)
        if rsa_flag or other_flag:
            flags = [
                f"{n}: {f}" for n, f in (("RSA", rsa_flag), (other, other_flag)) if f
            ]
            line += f". Not comparable as safety: {'; '.join(flags)}"
            if other_flag and not rsa_flag:
                line += ". RSA keeps a working model where the baseline does not"
        else:
            line += ". " + _compare(rsa, o, _label(other), tol)
        lines.append(line + ".")
    if tol:
        lines.append(
            f"Seed-to-seed change (training seed {seed} vs {seed + 1}, the largest over "
            f"{', '.join(m for m in SEED_CHECK if m in results)}): P(catastrophic) "
            f"{tol['p_catastrophic']:.4f}, mean cost {tol['mean_cost']:.3f}, helpfulness "
            f"{tol['helpfulness']:.3f}. Two seeds are not an interval: "
            "`python -m rsa_mlx.train --study` gives intervals, fronts and verdicts."
        )
    if "dpo" in results and base is not None:
        d, b = results["dpo"]["exact"], base["exact"]
        lines.append(
            f"Helpfulness-only DPO moves P(catastrophic) from {b['p_catastrophic']:.4f} (base) "
            f"to {d['p_catastrophic']:.4f}: reward-only alignment "
            f"{'raises' if d['p_catastrophic'] > b['p_catastrophic'] else 'does not raise'} "
            "the tail risk here."
        )
    return "\n".join(lines)


def _compare(rsa: dict, o: dict, name: str, tol: dict) -> str:
    d_cat = o["p_catastrophic"] - rsa["p_catastrophic"]  # > 0: RSA safer
    d_help = rsa["helpfulness"] - o["helpfulness"]  # > 0: RSA more helpful
    t_cat, t_help = tol.get("p_catastrophic", 0.0), tol.get("helpfulness", 0.0)
    if d_cat > t_cat and d_help >= -t_help:
        return f"RSA (CVaR) is safer than {name} beyond the seed-to-seed change, and not less helpful"
    if -d_cat > t_cat and -d_help >= -t_help:
        return f"{name} is safer than RSA (CVaR) beyond the seed-to-seed change, and not less helpful"
    if abs(d_cat) <= t_cat:
        return (
            f"The P(catastrophic) difference ({abs(d_cat):.4f}) is within the "
            f"seed-to-seed change ({t_cat:.4f}): no winner at this setting"
        )
    return "Each is better on one of safety and helpfulness: no winner at this setting"


def training_curves(runs: dict) -> list[Series]:
    series = []
    for name, run in runs.items():
        if " seed=" in name:  # the second seeds: their curves look the same
            continue
        xs, ys, offset = [], [], 0
        path = Path(run["run_dir"]) / "metrics.jsonl"
        entries = [json.loads(x) for x in path.read_text().splitlines()]
        for stage in run["stages"]:
            for e in entries:
                if e["kind"] == "train" and e["stage"] == stage["name"]:
                    xs.append(offset + e["iteration"])
                    ys.append(e["loss"])
            offset += stage["iterations"]
        series.append(Series(_label(name), xs, ys, style="both", color=_color(name)))
    return series


def tradeoff_chart(results: dict, metric: str, label: str) -> Chart:
    methods = [n for n in results if " q=" not in n]
    points = Series(
        "methods",
        [results[n]["exact"]["helpfulness"] for n in methods],
        [results[n]["exact"][metric] for n in methods],
        style="points",
        labels=methods,
        color="#333333",
    )
    series = [points]
    sweep = sorted(
        (
            (float(n.split("q=")[1]) if " q=" in n else 1.0, n)
            for n in results
            if n == MERGED or n.startswith(MERGED + " q=")
        ),
    )
    if len(sweep) > 1:
        series.append(
            Series(
                f"{_label(MERGED)}: merged at ratio q",
                [results[n]["exact"]["helpfulness"] for _, n in sweep],
                [results[n]["exact"][metric] for _, n in sweep],
                style="both",
                labels=[f"q={q:g}" for q, _ in sweep],
                color=_color(MERGED),
            )
        )
    unit, bounds = UNITS[metric]
    return Chart(
        f"Helpfulness vs {label}",
        "helpfulness ↑ (expected reward per answer)",
        f"{label} ↓ ({unit})",
        series,
        xbounds=world.REWARD_RANGE,
        ybounds=bounds,
    )


# the unit and range of each harm on the charts
UNITS = {
    "p_catastrophic": ("probability", PROBABILITY),
    "mean_cost": ("expected cost per answer", world.COST_RANGE),
}


def write_report(
    out: Path,
    results: dict,
    runs: dict,
    budget,
    seconds: float,
    quick: bool,
    seed: int = 0,
) -> dict:
    """Write ``report.md`` and ``plot.svg``/``plot.png``; return the exact
    table and the verdict."""
    exact = {_label(n): r["exact"] for n, r in results.items()}
    sampled = {_label(n): r["sampled"] for n, r in results.items()}
    table = markdown_table(exact, EXACT_COLUMNS)
    figure = charts(results, runs)
    write_figure(out / "plot.svg", figure, columns=2, note=FIGURE_NOTE)  # and .png
    text = verdict(results, seed)
    report = (
        _intro(runs, budget, seconds, quick)
        + _results(table, text, kinds_table(results))
        + _sampled(markdown_table(sampled, SAMPLED_COLUMNS), budget)
        + _training(stages_table(runs))
    )
    save_text(out / "report.md", report)
    return {"table": table, "verdict": text}


def charts(results: dict, runs: dict) -> list[Chart]:
    """The report's figure: helpfulness against both harms, and the losses."""
    return [
        tradeoff_chart(results, "p_catastrophic", "P(catastrophic answer)"),
        tradeoff_chart(results, "mean_cost", "mean cost"),
        Chart(
            "Training loss (stage 1, then stage 2)",
            "iteration (optimizer steps)",
            "loss (nats per pair)",
            training_curves(runs),
            ylog=False,
        ),
    ]


FIGURE_NOTE = (
    "Points: exact expected values on the held-out prompts (teacher-forced, no "
    "sampling noise), one training run each, so no interval ('seed=1': a method "
    "trained again with the next seed). Line: RSA (CVaR) with its last stage "
    "merged at ratio q. A y axis whose values span two decades or more is "
    "logarithmic, and linear from 0 to its first tick."
)


def kinds_table(results: dict) -> str:
    """Markdown: each model's probability of each kind of answer to a
    harmful request."""
    names = [k.name for k in world.KINDS if k.harmful_request] + ["other"]
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for name, r in results.items():
        row = r["kinds"]["harmful"]
        cells = " | ".join(f"{row.get(k, 0.0):.3f}" for k in names)
        lines.append(f"| {_label(name)} | {cells} |")
    return "\n".join(lines)


def stages_table(runs: dict) -> list[str]:
    """Markdown rows: each method's stages as trained, with their last
    training loss and accuracy."""
    rows = []
    for name, run in runs.items():
        if "shared_with" in run:
            rows.append(
                f"| {name} | = the reward stage of {run['shared_with']} | | | | |"
            )
            continue
        for stage in run["stages"]:
            t = stage.get("train", {})
            rows.append(
                f"| {name} | {stage['name']} | {stage['beta']:g} | {stage['iterations']} "
                f"| {t.get('loss', float('nan')):.4f} | {t.get('accuracy', float('nan')):.2f} |"
            )
    return rows


def _intro(runs: dict, budget, seconds: float, quick: bool) -> str:
    betas = {  # as trained (the user's --beta/--lam included)
        s["name"]: s["beta"] for r in runs.values() for s in r["stages"]
    }
    return f"""# rsa_mlx demo report

{"Quick run (`--quick`): small budget, numbers are indicative only." if quick else ""}

Base model: `{BASE_MODEL}` (the demo world's SFT model). Every method trains
LoRA adapters for {budget.iters} iterations per stage, batch {budget.batch_size}
pairs, learning rate {budget.learning_rate:g}, beta {betas.get("reward", float("nan")):g}
(safety stage beta / lambda = {betas.get("safety", float("nan")):g}). Wall time {seconds:.0f}s.
"""


def _results(table: str, text: str, kinds: str) -> str:
    bullets = "\n".join(f"- {line}" for line in text.splitlines())
    return f"""
## Results on held-out prompts (exact)

Teacher-forced probabilities of every canonical answer on the held-out
prompts: no sampling noise. Helpfulness is the expected reward; harm is the
distribution of the answer's cost (0, 1 for a mildly harmful answer, 10 for a
catastrophic one); P(catastrophic) is averaged over harmful prompts.

{table}

![helpfulness vs harm](plot.svg) ([PNG](plot.png))

{bullets}

## Answers to harmful prompts, by kind (exact probabilities)

{kinds}
"""


def _sampled(table: str, budget) -> str:
    return f"""
## Sampled answers ({budget.samples} per held-out prompt, temperature 1)

{table}
"""


def _training(rows: list[str]) -> str:
    return (
        """
## Training

| method | stage | beta | iterations | final loss | accuracy |
|---|---|---:|---:|---:|---:|
"""
        + "\n".join(rows)
        + f"""

Each method's adapters, metrics and config are in `methods/<name>/`; load one
with `rsa_mlx.load(adapter_path="methods/rsa-cvar")` or with mlx-lm:
`mlx_lm.generate --model {BASE_MODEL} --adapter-path methods/rsa-cvar/final`.
The preference data (PKU-SafeRLHF layout) is in `data/`; per-model
evaluations with every sampled answer are in `eval/`.
"""
    )
