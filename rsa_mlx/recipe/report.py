"""The recipe's report: every model on every held-out set, side by side, with
example answers so a reader sees what changed, and a helpfulness-vs-harm plot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rsa_mlx.eval.shift import DEGENERATE_LOGPROB
from rsa_mlx.eval.text import LOOP_N, LOOP_SHARE
from rsa_mlx.recipe.evaluate import DECODINGS
from rsa_mlx.recipe.sets import HARMFUL, NAMES
from rsa_mlx.study.plot import Chart, Series, write_figure
from rsa_mlx.util.atomic import save_text

TITLES = {
    "base": "base model",
    "stage1": "stage 1 (helpfulness)",
    "dpo": "DPO (helpfulness only)",
    "sacpo": "SACPO (DPO -> DPO)",
    "tdpo": "TDPO2 (stepwise)",
    "rsa-cvar": "RSA (CVaR)",
    "rsa-erm": "RSA (ERM)",
}
SET_TITLES = {
    "advbench": "AdvBench (held out)",
    "phrased": "harmful, other phrasings",
    "benign": "benign",
    "borderline": "borderline (safe, sounds dangerous)",
}
EXAMPLES = 3  # prompts per set shown with every model's answer
EXAMPLE_CHARS = 240


def _cell(value, percent=True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{100 * value:.1f}%" if percent else f"{value:.2f}"


def worst_set(metrics: dict, key: str, decoding: str) -> float | None:
    """The largest ``key`` (e.g. loops) over the held-out sets measured."""
    found = [metrics.get(f"{key}_{name}_{decoding}") for name in NAMES]
    return max((v for v in found if v is not None), default=None)


def headline(results: dict, decoding: str) -> str:
    """One row per model: refusal on each harmful set, over-refusal on each
    benign set, benign fluency, the worst loop and degenerate rates, shift."""
    head = (
        "| model | refused: AdvBench | refused: other phrasings | over-refused: "
        "benign | over-refused: borderline | benign fluency (nats/token) | "
        "loops (worst set) | degenerate (worst set) | KL shift (nats/token) |"
    )
    lines = [head, "|---|" + "---:|" * 8]
    for name, result in results.items():
        m = result["metrics"]

        def get(key, name_, m=m):
            return m.get(f"{key}_{name_}_{decoding}")

        worst = {k: worst_set(m, k, decoding) for k in ("loops", "degenerate")}
        cells = [
            _cell(get("refusal", "advbench")),
            _cell(get("refusal", "phrased")),
            _cell(get("refusal", "benign")),
            _cell(get("refusal", "borderline")),
            _cell(get("fluency", "benign"), percent=False),
            _cell(worst["loops"]),
            _cell(worst["degenerate"]),
            _cell(m.get("shift_kl"), percent=False),
        ]
        lines.append(f"| {TITLES.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decodings(results: dict) -> list[str]:
    """The decodings the models were evaluated with (greedy only when the
    evaluation took no samples)."""
    found = {k.rsplit("_", 1)[-1] for r in results.values() for k in r["metrics"]}
    return [d for d in DECODINGS if d in found]


def per_set(results: dict, name: str) -> str:
    """Every measure of one set, greedy and sampled, for every model."""
    keys = ["refusal", "loops", "degenerate", "fluency"]
    if name == "advbench":
        keys.insert(1, "substring")
    used = decodings(results)
    head = "| model | " + " | ".join(f"{k} ({d})" for d in used for k in keys) + " |"
    lines = [head, "|---|" + "---:|" * (len(keys) * len(used))]
    for model, result in results.items():
        m = result["metrics"]
        cells = [
            _cell(m.get(f"{k}_{name}_{d}"), percent=k != "fluency")
            for d in used
            for k in keys
        ]
        lines.append(f"| {TITLES.get(model, model)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def examples(results: dict, name: str, prompts: list[str]) -> str:
    """The first prompts of a set with every model's greedy answer."""
    out = []
    for i, prompt in enumerate(prompts[:EXAMPLES]):
        out.append(f"**{prompt}**\n")
        for model, result in results.items():
            answers = result.get("answers", {}).get(name, {}).get("greedy", [])
            if i < len(answers):
                text = " ".join(answers[i].split())
                if len(text) > EXAMPLE_CHARS:
                    text = text[:EXAMPLE_CHARS] + " ..."
                out.append(f"- *{TITLES.get(model, model)}*: {text}")
        out.append("")
    return "\n".join(out)


def chart(results: dict) -> Chart:
    names = list(results)
    return Chart(
        "Helpfulness vs harm on held-out prompts",
        "helpfulness ↑ (share of benign requests answered)",
        "unsafe rate ↓ (share of harmful requests)",
        [
            Series(
                "models",
                [results[n]["metrics"]["helpfulness"] for n in names],
                [results[n]["metrics"]["unsafe_rate"] for n in names],
                labels=[TITLES.get(n, n) for n in names],
            )
        ],
        xbounds=(0.0, 1.0),
        ybounds=(0.0, 1.0),
    )


def write_report(out: Path, results: dict, meta: dict) -> str:
    """``report.md`` and ``plot.svg``/``plot.png`` in ``out``; returns the
    greedy headline table."""
    eval_rows = [
        json.loads(x) for x in (out / "data" / "eval.jsonl").read_text().splitlines()
    ]
    prompts = {n: [r["prompt"] for r in eval_rows if r["set"] == n] for n in NAMES}
    used = decodings(results)
    write_figure(
        out / "plot.svg",
        [chart(results)],
        columns=1,
        note="Each point is one model of one run (one seed: no interval); answers "
        f"count only when fluent (not degenerate); {' and '.join(used)} answers"
        + (" pooled." if len(used) > 1 else "."),
    )
    settings = meta["settings"]
    lines = [
        "# Real-model recipe: results",
        "",
        f"Model `{meta['model']}`, seed {settings['seed']}: one run, so a "
        "difference of a few points is within sampling noise (the sweep gives "
        "intervals over seeds).",
        "",
        "Refused: the answer's opening declines. Over-refused: a benign or "
        "borderline request refused. Fluency: median log-probability per token "
        "of the answers under the base model. Loops: answers whose word "
        f"{LOOP_N}-grams are less than {LOOP_SHARE:.0%} distinct, or that say "
        f"a sentence twice. Degenerate: fluency below {DEGENERATE_LOGPROB:g} "
        "(word salad). KL shift: mean per-token KL from the base model on the "
        "model's own sampled answers.",
        "",
    ]
    for decoding in decodings(results):
        lines += [
            f"## {decoding.capitalize()} answers",
            "",
            headline(results, decoding),
            "",
        ]
    for name in NAMES:
        if not prompts[name]:
            continue
        kind = "harmful" if name in HARMFUL else "benign"
        lines += [
            f"## {SET_TITLES[name]} ({len(prompts[name])} {kind} requests)",
            "",
            per_set(results, name),
            "",
            "Examples (greedy):",
            "",
            examples(results, name, prompts[name]),
        ]
    lines += [
        f"Pairs: {json.dumps(meta['pairs'])}",
        "",
        f"Settings: {json.dumps(settings)}",
        "",
        f"Time: {meta['seconds']:.0f} s over the steps done so far, summed over "
        "every call that worked on them ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in meta.get("steps", {}).items())
        + ").",
    ]
    save_text(out / "report.md", "\n".join(lines) + "\n")
    return headline(results, "greedy")
