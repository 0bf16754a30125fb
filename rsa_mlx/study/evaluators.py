"""Sweep evaluators: ``evaluator(model, tokenizer, label) -> {metric: value}``,
called by :func:`rsa_mlx.study.sweep.run_sweep` on the base model, each
shared stage 1 and every cell.

An evaluator is a dataclass with ``reference`` (the base model, set by the
sweep), ``description()`` (what the sweep folder records, so results in one
table stay comparable) and ``check()`` (reads its inputs before anything
trains). They are registered by name (:data:`EVALUATORS`): ``prompts`` is
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

__all__ = ["EVALUATORS", "PromptEvaluator", "make_evaluator", "register_evaluator"]


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
