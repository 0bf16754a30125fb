"""Sweep evaluators: ``evaluator(model, tokenizer, label) -> {metric: value}``,
called by :func:`rsa_mlx.study.sweep.run_sweep` on the base model, each
shared stage 1 and every cell.

An evaluator is a dataclass with ``reference`` (the base model, set by the
sweep), ``description()`` (what the sweep folder records, so results in one
table stay comparable), ``check()`` (reads its inputs before anything
trains) and, optionally, ``metric_names()`` (the metrics it will return, so
that the harm metrics a report compares, and helpfulness, are checked
before anything trains). They are registered by name (:data:`EVALUATORS`): ``prompts`` is
:class:`PromptEvaluator`; applications add theirs with
:func:`register_evaluator` (the real-model recipe registers ``recipe``), and
a sweep file picks one with ``evaluate: {evaluator: NAME, ...}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from rsa_mlx.eval.evaluate import check_scorer, evaluate_model
from rsa_mlx.eval.prompts import read_prompts
from rsa_mlx.eval.sampling import check_sampling
from rsa_mlx.eval.scorers import load_scorer
from rsa_mlx.eval.shift import DEGENERATE_LOGPROB, fluency
from rsa_mlx.tuner.model import load
from rsa_mlx.util.errors import ConfigError

__all__ = [
    "EVALUATORS",
    "PromptEvaluator",
    "make_evaluator",
    "metric_names",
    "register_evaluator",
]


@dataclass
class PromptEvaluator:
    """The sweep's evaluator for any model: ``rsa-mlx evaluate``'s metrics
    on held-out prompts (K samples each, scored by ``scorer``), the model
    shift from ``reference`` on those samples, and ``degenerate``: the
    share of answers the reference finds to be word salad (mean token
    log-probability below :data:`rsa_mlx.eval.shift.DEGENERATE_LOGPROB`), which
    marks a collapsed model in the report."""

    prompts: str
    scorer: str = "demo"
    k: int = 4
    max_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    unsafe_threshold: float | None = None
    reference: str | None = None  # the base model (set by the sweep)

    def description(self) -> dict:
        return {
            "evaluator": "prompts",
            **{k: v for k, v in self.__dict__.items() if not k.startswith("_")},
        }

    def check(self) -> None:
        """Read the prompts and the scorer now: errors before any training."""
        check_sampling(
            k=self.k, max_tokens=self.max_tokens, temperature=self.temperature
        )
        self._records = read_prompts(self.prompts)
        self._scorer = load_scorer(self.scorer, self.unsafe_threshold)
        check_scorer(self._scorer, self._records)

    def metric_names(self) -> list[str]:
        """The metrics a call returns, known before any training: the
        summary of :func:`rsa_mlx.eval.evaluate.evaluate_model` with the
        shift, and ``degenerate``; ``helpfulness`` only where the scorer
        measures it on these prompts (the refusal scorer: on benign rows)."""
        if not hasattr(self, "_records"):
            self.check()
        names = [*HARM_METRICS, *SHIFT_METRICS, "responses", "k", "degenerate"]
        if getattr(self._scorer, "unsafe_threshold", None) is not None:
            names.append("unsafe_threshold")
        measures = getattr(self._scorer, "measures_helpfulness", None)
        if measures is None or measures(self._records):
            names.insert(0, "helpfulness")
        return names

    def __call__(self, model, tokenizer, label: str) -> dict:
        if not hasattr(self, "_records"):
            self.check()
        if getattr(self, "_reference", None) is None:
            self._reference = load(self.reference)[0]
        result = evaluate_model(
            model, tokenizer, self._records, self._scorer, self.k, self.max_tokens,
            self.temperature, self.seed, label=label, reference=self._reference,
        )  # fmt: skip
        answers = [row["responses"] for row in result["samples"]]
        logp = [
            x
            for row in fluency(self._reference, tokenizer, self._records, answers)
            for x in row
        ]
        summary = {k: v for k, v in result["summary"].items() if _is_number(v)}
        summary["degenerate"] = float(
            sum(not x >= DEGENERATE_LOGPROB for x in logp) / max(len(logp), 1)
        )
        return summary


HARM_METRICS = ("unsafe_rate", "mean_cost", "cvar_0.9", "cvar_0.99", "worst")
SHIFT_METRICS = ("shift_kl", "shift_logratio_cvar", "shift_kl_cvar",
                 "shift_logratio", "shift_tokens", "shift_mu")  # fmt: skip


def metric_names(evaluator) -> list[str] | None:
    """The metrics ``evaluator`` says it returns (its ``metric_names()``),
    or None when it does not say."""
    names = getattr(evaluator, "metric_names", None)
    return None if names is None else list(names())


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


EVALUATORS: dict[str, Callable] = {"prompts": PromptEvaluator}


def register_evaluator(name: str, factory: Callable) -> None:
    """Make ``evaluate: {evaluator: name, ...}`` build ``factory(**settings)``
    (a dataclass with ``reference``, ``description()`` and ``check()``)."""
    EVALUATORS[name] = factory


def make_evaluator(settings: dict, reference: str):
    """The evaluator a sweep file's ``evaluate:`` mapping describes, checked:
    its name (``evaluator``, default ``prompts``) and its settings; one-line
    errors naming the key."""
    settings = {k: v for k, v in settings.items() if v is not None}
    name = settings.pop("evaluator", "prompts")
    if name not in EVALUATORS:
        raise ConfigError(
            f"evaluate: unknown evaluator {name!r}; choose from "
            f"{', '.join(sorted(EVALUATORS))}"
        )
    factory = EVALUATORS[name]
    known = {f.name for f in dataclasses.fields(factory)} - {"reference"}
    if unknown := sorted(set(settings) - known):
        raise ConfigError(
            f"evaluate: unknown key {unknown[0]!r} for the {name} evaluator "
            f"(it takes {', '.join(sorted(known))})"
        )
    evaluator = factory(**settings, reference=reference)
    evaluator.check()
    return evaluator
