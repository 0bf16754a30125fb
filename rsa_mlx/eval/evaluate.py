"""Evaluation (docs/method.md §6): sample, score, and report helpfulness and tail risk.

For a model (+ adapters, + merge q) and a prompt set, :func:`evaluate_model`
samples K responses per prompt (:mod:`rsa_mlx.eval.sampling`), scores each
with a scorer (:mod:`rsa_mlx.eval.scorers`), and reports

* helpfulness: the mean reward;
* harm: unsafe rate, mean cost, ``CVaR_0.9`` and ``CVaR_0.99`` of the
  per-response cost (the mean of its worst 10% and 1%), the worst case
  (:mod:`rsa_mlx.eval.metrics`);
* with a reference model, the model shift on the samples
  (:mod:`rsa_mlx.eval.shift`).

"Unsafe" is what each scorer's scale says (docs/method.md §6), stated by the scorer's
``unsafe_rule`` and stored with the rate. A scorer may have a
``check(records)`` method: it is called on every prompt row before any model
is loaded or sampled, so a missing field fails at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from rsa_mlx.eval.metrics import tail_metrics
from rsa_mlx.eval.prompts import PromptRecord
from rsa_mlx.eval.sampling import sample_with_ids
from rsa_mlx.eval.scorers import one_line
from rsa_mlx.eval.shift import model_shift
from rsa_mlx.util import progress
from rsa_mlx.util.errors import InputError, RsaMlxError

__all__ = [
    "COLUMNS",
    "SHIFT_COLUMNS",
    "check_scorer",
    "evaluate_model",
    "markdown_table",
    "unsafe_rule",
]


def check_scorer(scorer: Callable, records: Sequence[PromptRecord]) -> None:
    """Let the scorer refuse rows it cannot score, before any sampling."""
    check = getattr(scorer, "check", None)
    if check is not None:
        check(records)


def unsafe_rule(scorer: Callable) -> str:
    return getattr(scorer, "unsafe_rule", "cost > 0")


def evaluate_model(
    model,
    tokenizer,
    records: Sequence[PromptRecord],
    scorer: Callable,
    k: int = 8,
    max_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    label: str = "model",
    reference=None,
    shift_mu: float = 0.9,
) -> dict:
    """Sample, score and summarise; the result is JSON-serialisable.

    The summary's ``unsafe_rule`` (and ``unsafe_threshold`` where the scorer
    has one) says what the unsafe rate counts.

    With a ``reference`` (the base/SFT model, same tokenizer) the summary
    also has the model shift on the sampled responses
    (:func:`rsa_mlx.eval.shift.model_shift`, teacher-forced on the very token ids
    sampled): ``shift_kl`` (mean per-token KL(model || reference)),
    ``shift_logratio_cvar`` (CVaR at ``shift_mu`` of the per-token log-ratio of
    the sampled tokens), ``shift_kl_cvar`` (CVaR at ``shift_mu`` of the
    per-token KL), ``shift_logratio`` (mean log-ratio), ``shift_tokens`` and
    ``shift_mu``. Without one, none of these keys.
    """
    check_scorer(scorer, records)
    if reference is not None and not 0.0 <= shift_mu <= 1.0:
        raise InputError(f"the shift's CVaR level must be in [0, 1], not {shift_mu}")
    samples, ids = sample_with_ids(
        model,
        tokenizer,
        records,
        k,
        max_tokens,
        temperature,
        seed=seed,
        batch_size=batch_size,
        label=f"{label}: sampling",
    )
    rows = score_samples(scorer, records, samples, label)
    summary = summarize(rows, scorer, k)
    if reference is not None:
        shift = model_shift(
            model,
            reference,
            tokenizer,
            [pair for pairs in ids for pair in pairs],
            mu=shift_mu,
            label=f"{label}: model shift",
        )
        summary.update(shift_summary(shift))
    return {"summary": summary, "samples": rows}


def score_samples(
    scorer: Callable, records: Sequence[PromptRecord], samples: list, label: str
) -> list[dict]:
    """One row per prompt: its text, its responses and their scores."""
    rows = []
    with progress.task(f"{label}: scoring", len(records), "prompts") as bar:
        for i, (record, responses) in enumerate(zip(records, samples)):
            scores = _score(scorer, record, responses, i)
            rows.append(
                {"prompt": record.text(), "responses": responses, "scores": scores}
            )
            bar.advance()
    return rows


def _score(scorer: Callable, record: PromptRecord, responses: list, i: int) -> list:
    """The scorer's scores of one prompt's responses; a user scorer's
    failure is an input error that says where."""
    name = getattr(scorer, "name", type(scorer).__name__)
    try:
        scores = scorer(record, responses)
    except RsaMlxError:
        raise
    except Exception as e:
        if getattr(scorer, "builtin", False):
            raise  # our own scorer failing is a bug: keep the traceback
        raise InputError(
            f"scorer {name} raised {type(e).__name__} on "
            f"{record.location(i)}: {one_line(e)}"
        ) from e
    if not isinstance(scores, list) or len(scores) != len(responses):
        raise InputError(
            f"scorer {name}: must return one score per response on {record.location(i)}"
        )
    for j, score in enumerate(scores):
        _check_finite(name, score, record.location(i), j)
    return scores


def _check_finite(name: str, score: dict, where: str, j: int) -> None:
    """A cost must be a finite number (a NaN would count as safe); a reward
    finite, or NaN for "not measured" (the refusal scorer on a harmful
    prompt, a judge without a helpfulness question)."""
    cost, reward = score.get("cost"), score.get("reward", math.nan)
    bad = None
    if not _real(cost) or not math.isfinite(cost):
        bad = f"cost {cost!r}"
    elif not _real(reward) or math.isinf(reward):
        bad = f"reward {reward!r}"
    if bad is not None:
        raise InputError(
            f"scorer {name} returned a non-finite or non-numeric {bad} for "
            f"response {j + 1} on {where}: costs must be finite numbers, rewards "
            "finite or NaN (not measured)"
        )


def _real(value) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(
        value, bool
    )


def summarize(rows: list[dict], scorer: Callable, k: int) -> dict:
    """Helpfulness and the tail metrics of every scored response."""
    scores = [s for row in rows for s in row["scores"]]
    rewards = [s["reward"] for s in scores]
    costs = [s["cost"] for s in scores]
    unsafe = [bool(s.get("unsafe", s["cost"] > 0)) for s in scores]
    return {
        "helpfulness": float(np.nanmean(rewards))
        if rewards and not np.isnan(rewards).all()
        else float("nan"),
        **tail_metrics(costs, unsafe),
        "unsafe_rule": unsafe_rule(scorer),
        "unsafe_threshold": getattr(scorer, "unsafe_threshold", None),
        "responses": len(costs),
        "k": k,
    }


def shift_summary(shift: dict) -> dict:
    """:func:`model_shift`'s numbers under the summary's ``shift_*`` names."""
    return {
        "shift_kl": shift["kl_mean"],
        "shift_logratio_cvar": shift["logratio_cvar"],
        "shift_kl_cvar": shift["kl_cvar"],
        "shift_logratio": shift["logratio_mean"],
        "shift_tokens": shift["tokens"],
        "shift_mu": shift["mu"],
    }


# model shift from the reference (shown only where a result has it)
SHIFT_COLUMNS = [
    ("shift_kl", "KL shift"),
    ("shift_kl_cvar", "CVaR KL shift"),
    ("shift_logratio_cvar", "CVaR log-ratio"),
]
COLUMNS = [
    ("helpfulness", "helpfulness"),
    ("unsafe_rate", "unsafe rate"),
    ("mean_cost", "mean cost"),
    ("cvar_0.99", "CVaR0.99 cost"),
    ("p_catastrophic", "P(catastrophic)"),
    *SHIFT_COLUMNS,
]


def markdown_table(results: dict[str, dict], columns=COLUMNS) -> str:
    """One row per run: ``results[name]`` is a summary dict."""
    present = [
        (k, label) for k, label in columns if any(k in r for r in results.values())
    ]
    head = "| method | " + " | ".join(label for _, label in present) + " |"
    rule = "|---|" + "---:|" * len(present)
    lines = [head, rule]
    for name, summary in results.items():
        cells = []
        for key, _ in present:
            value = summary.get(key)
            cells.append(
                ""
                if value is None
                else f"{value:.4f}"
                if abs(value) < 100
                else f"{value:.1f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
