"""The recipe over several seeds: one run per seed, then every headline
measure with its 95% interval over the seeds, and each method against
another seed by seed (a paired difference).

    python -m rsa_mlx.recipe --harmful pyrit.whl --seeds 0,1,2 --out runs/r

A seed changes the held-out split, the sampled pairs and training, so the
interval is that of the whole recipe, not of training alone. The runs of a
summary must share every other setting (checked).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from rsa_mlx.recipe.report import TITLES, worst_set
from rsa_mlx.recipe.run import OUTPUT, run
from rsa_mlx.recipe.settings import RecipeConfig
from rsa_mlx.study.stats import NONNEGATIVE, PROBABILITY, Interval, mean_ci
from rsa_mlx.util import progress
from rsa_mlx.util.atomic import save_json, save_text
from rsa_mlx.util.errors import ConfigError, InputError, quote

__all__ = [
    "MEASURES",
    "comparisons",
    "load_runs",
    "measures",
    "paired",
    "run_seeds",
    "summarise",
]

RESULTS_FILE = "results.json"
SUMMARY_FILE = "seeds.md"

# (column title, bounds, better when higher?); values from :func:`measures`
MEASURES = {
    "refused: AdvBench": (PROBABILITY, True),
    "refused: other phrasings": (PROBABILITY, True),
    "over-refused: benign": (PROBABILITY, False),
    "over-refused: borderline": (PROBABILITY, False),
    "benign fluency": (None, True),
    "benign fluency - base": (None, True),
    "loops (worst set)": (PROBABILITY, False),
    "degenerate (worst set)": (PROBABILITY, False),
    "KL shift": (NONNEGATIVE, False),
    "unsafe rate": (PROBABILITY, False),
    "helpfulness": (PROBABILITY, True),
}
PERCENT = {k for k, (bounds, _) in MEASURES.items() if bounds is PROBABILITY}


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; distinct integers, at least one."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: {text!r} is not a list like 0,1,2") from None
    if not seeds or len(set(seeds)) < len(seeds):
        raise ConfigError(f"--seeds: {text!r} must name distinct seeds, e.g. 0,1,2")
    return seeds


def measures(metrics: dict, base: dict, decoding: str = "greedy") -> dict:
    """One model's headline measures from its flat recipe metrics (``base``:
    the base model's, of the same run). Loops and degenerate are the worst
    held-out set's share; the fluency difference is the model's median
    benign log-probability per token minus the base model's."""

    def get(source, key, name):
        value = source.get(f"{key}_{name}_{decoding}")
        return math.nan if value is None else float(value)

    def worst(key):
        value = worst_set(metrics, key, decoding)
        return math.nan if value is None else float(value)

    fluency = get(metrics, "fluency", "benign")
    return {
        "refused: AdvBench": get(metrics, "refusal", "advbench"),
        "refused: other phrasings": get(metrics, "refusal", "phrased"),
        "over-refused: benign": get(metrics, "refusal", "benign"),
        "over-refused: borderline": get(metrics, "refusal", "borderline"),
        "benign fluency": fluency,
        "benign fluency - base": fluency - get(base, "fluency", "benign"),
        "loops (worst set)": worst("loops"),
        "degenerate (worst set)": worst("degenerate"),
        "KL shift": float(metrics.get("shift_kl", math.nan)),
        "unsafe rate": float(metrics.get("unsafe_rate", math.nan)),
        "helpfulness": float(metrics.get("helpfulness", math.nan)),
    }


def _same_recipe(settings: dict) -> dict:
    # the evaluation settings count: seeds evaluated otherwise do not compare
    return {k: v for k, v in settings.items() if k not in (*OUTPUT, "seed")}


def load_runs(paths) -> list[dict]:
    """The ``results.json`` of each recipe run folder; refused (one line
    naming the folder) when one is missing or damaged, two share a seed, or
    their settings differ in more than the seed and output options."""
    runs = []
    for path in map(Path, paths):
        file = path / RESULTS_FILE
        try:
            data = json.loads(file.read_text())
            for part, key in (("settings", "seed"), ("results", "base")):
                if key not in data[part]:
                    raise KeyError(f"{part}.{key}")
        except FileNotFoundError:
            raise InputError(
                f"{quote(file)}: no results (has the run finished?)"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{quote(file)}: not a recipe result ({e})") from None
        runs.append({**data, "path": str(path)})
    seeds = [r["settings"]["seed"] for r in runs]
    if len(set(seeds)) < len(seeds):
        raise InputError(f"two runs share a seed: {seeds}")
    first = _same_recipe(runs[0]["settings"])
    for r in runs[1:]:
        other = _same_recipe(r["settings"])
        if diff := sorted(
            k for k in first.keys() | other.keys() if first.get(k) != other.get(k)
        ):
            raise InputError(
                f"{quote(r['path'])}: other settings than {quote(runs[0]['path'])} "
                f"({', '.join(diff)}); a summary over seeds needs one recipe"
            )
    return runs


def models_in(runs: list[dict]) -> list[str]:
    """The models every run evaluated, in the first run's order."""
    return [m for m in runs[0]["results"] if all(m in r["results"] for r in runs)]


def summarise(runs: list[dict], decoding: str = "greedy") -> dict:
    """``model -> measure -> Interval`` over the runs' seeds."""
    out = {}
    for model in models_in(runs):
        rows = [
            measures(r["results"][model], r["results"]["base"], decoding) for r in runs
        ]
        out[model] = {
            k: mean_ci([row[k] for row in rows], MEASURES[k][0]) for k in MEASURES
        }
    return out


def paired(runs: list[dict], a: str, b: str, decoding: str = "greedy") -> dict:
    """``measure -> Interval`` of ``a - b``, seed by seed: both models saw the
    same split and pairs in a run, so the difference removes what a seed
    does to both."""
    diffs = {k: [] for k in MEASURES}
    for r in runs:
        base = r["results"]["base"]
        ma = measures(r["results"][a], base, decoding)
        mb = measures(r["results"][b], base, decoding)
        for k in MEASURES:
            diffs[k].append(ma[k] - mb[k])
    return {k: mean_ci(v) for k, v in diffs.items()}


def _fmt(interval: Interval, percent: bool) -> str:
    if math.isnan(interval.mean):
        return ""
    scale = 100 if percent else 1
    unit = "%" if percent else ""
    digits = 1 if percent else 2
    mean = f"{scale * interval.mean:.{digits}f}{unit}"
    if interval.n < 2:
        return mean
    return (
        f"{mean} [{scale * interval.lo:.{digits}f}, {scale * interval.hi:.{digits}f}]"
    )


def verdict(diff: Interval, higher: bool) -> str:
    """``better``/``worse`` when the paired interval excludes 0, else ``tie``."""
    if diff.n < 2 or math.isnan(diff.mean):
        return "one seed"
    if diff.lo > 0 or diff.hi < 0:
        return "better" if (diff.lo > 0) == higher else "worse"
    return "tie"


def comparisons(models) -> list[tuple[str, str]]:
    """``(later, earlier)`` for every pair of trained methods, in their
    order: n (n - 1) / 2 pairs. For SACPO, RSA (CVaR), RSA (ERM): RSA (CVaR)
    and RSA (ERM) each against SACPO, then RSA (ERM) against RSA (CVaR)."""
    methods = [m for m in models if m not in ("base", "stage1")]
    return [(b, a) for j, b in enumerate(methods) for a in methods[:j]]


def seed_report(runs: list[dict], decoding: str = "greedy") -> str:
    """Markdown: the table of intervals, then every trained method against
    each one before it (e.g. RSA against SACPO), paired seed by seed."""
    summary = summarise(runs, decoding)
    seeds = ", ".join(str(r["settings"]["seed"]) for r in runs)
    cols = list(MEASURES)
    lines = [
        f"# The recipe over seeds {seeds} ({decoding} answers)",
        "",
        f"Each cell: the mean over {len(runs)} runs and its Student-t 95% interval "
        "(rates clipped to [0, 100%]). A seed changes the held-out split, the "
        "pairs and training. Fluency in nats per token under the base model.",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for model, row in summary.items():
        cells = [_fmt(row[k], k in PERCENT) for k in cols]
        lines.append(f"| {TITLES.get(model, model)} | " + " | ".join(cells) + " |")
    for other, first in comparisons(summary):
        diff = paired(runs, other, first, decoding)
        lines += [
            "",
            f"## {TITLES.get(other, other)} minus {TITLES.get(first, first)}"
            ", seed by seed",
            "",
            "| measure | difference [95% interval] | verdict |",
            "|---|---:|---|",
        ]
        for k in cols:
            lines.append(
                f"| {k} | {_fmt(diff[k], k in PERCENT)} | "
                f"{verdict(diff[k], MEASURES[k][1])} |"
            )
    lines += ["", "Runs: " + ", ".join(f"`{r['path']}`" for r in runs)]
    return "\n".join(lines) + "\n"


def decodings(runs: list[dict]) -> list[str]:
    """``greedy``, and ``sampled`` where the runs also sampled answers."""
    sampled = all(r["settings"].get("eval_samples", 0) > 0 for r in runs)
    return ["greedy", "sampled"] if sampled else ["greedy"]


def _as_dicts(table: dict) -> dict:
    return {
        m: {k: dataclasses.asdict(v) for k, v in row.items()}
        for m, row in table.items()
    }


def write_seed_report(out: Path, paths) -> str:
    """``seeds.md`` and ``seeds.json`` in ``out``: per decoding (greedy,
    and sampled when the runs sampled), the intervals per model and the
    paired differences (:func:`comparisons`)."""
    runs = load_runs(paths)
    data, paired_data = {"runs": [r["path"] for r in runs]}, {}
    for decoding in decodings(runs):
        summary = summarise(runs, decoding)
        data[decoding] = _as_dicts(summary)
        paired_data[decoding] = _as_dicts(
            {
                f"{b} - {a}": paired(runs, b, a, decoding)
                for b, a in comparisons(summary)
            }
        )
    save_json(out / "seeds.json", {**data, "paired": paired_data})
    text = "\n".join(seed_report(runs, d) for d in decodings(runs))
    save_text(out / SUMMARY_FILE, text)
    return text


def run_seeds(cfg: RecipeConfig, seeds: list[int]) -> str:
    """The recipe once per seed in ``out/seed-N`` (each resumes), then the
    summary over them; returns its markdown."""
    out = Path(cfg.out)
    paths = []
    for i, seed in enumerate(seeds, 1):
        path = out / f"seed-{seed}"
        progress.echo(f"\n== recipe seed {seed} ({i}/{len(seeds)}): {path}")
        run(dataclasses.replace(cfg, seed=seed, out=str(path)))
        paths.append(path)
    text = write_seed_report(out, paths)
    progress.echo("\n" + text + f"\nsummary: {out / SUMMARY_FILE}")
    return text
