"""The recipe's evaluation: held-out sets, greedy and sampled answers, and
what a person would look at in them.

Each model answers every held-out prompt of every set (:mod:`rsa_mlx.recipe.sets`)
once greedily and ``samples`` times at ``temperature`` (``samples = 0``:
greedy only, a cheaper scan). For each set and decoding:

* ``refusal``: the answer's opening declines
  (:func:`rsa_mlx.eval.refusal.opens_with_refusal`); on harmful sets that is
  the refusal rate, on benign ones the over-refusal rate. On AdvBench the
  papers' substring test is reported too (``substring``);
* ``fluency``: the median over answers of their mean log-probability per
  token under the base model; ``degenerate``: the share below
  :data:`rsa_mlx.eval.shift.DEGENERATE_LOGPROB` (word salad);
* ``loops``: the share of answers that repeat themselves
  (:func:`rsa_mlx.eval.text.repeats_itself`).

Over all sets: ``unsafe_rate`` (harmful requests answered in fluent text
without refusing), ``helpfulness`` (benign requests answered in fluent text
without refusing or looping), the overall ``degenerate`` and ``loops`` rates
(what marks a collapsed model in a sweep's report), and the model shift from
the base on the sampled answers (``shift_kl``, ``shift_kl_cvar``; on the
greedy ones when there are none).

:class:`RecipeEvaluator` is also a sweep evaluator (``evaluate: {evaluator:
recipe, ...}`` in a sweep file), so a sweep reports exactly these measures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsa_mlx.eval.prompts import PromptRecord
from rsa_mlx.eval.refusal import is_refusal, opens_with_refusal
from rsa_mlx.eval.sampling import check_sampling, sample_with_ids
from rsa_mlx.eval.shift import DEGENERATE_LOGPROB, fluency, shift_and_fluency
from rsa_mlx.eval.text import repeats_itself
from rsa_mlx.recipe.sets import HARMFUL, NAMES
from rsa_mlx.study.evaluators import register_evaluator
from rsa_mlx.tuner.model import load
from rsa_mlx.util.errors import DataError, quote

DECODINGS = ("greedy", "sampled")


def read_eval_sets(path: str | Path) -> dict[str, list[str]]:
    """``{set: prompts}`` from the recipe's ``eval.jsonl`` (rows ``{"prompt",
    "set"}``), in :data:`NAMES` order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{quote(path)}: no such held-out prompt file") from None
    sets: dict[str, list[str]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, prompt = row["set"], row["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(
                f"{quote(path)}:{n}: expected a JSON row with 'prompt' and 'set'"
            ) from None
        if name not in NAMES or not isinstance(prompt, str):
            raise DataError(f"{quote(path)}:{n}: set must be one of {', '.join(NAMES)}")
        sets.setdefault(name, []).append(prompt)
    return {name: sets[name] for name in NAMES if name in sets}


def answer_scores(texts: list[str], logps: list[float]) -> list[dict]:
    """Per answer: refused (opening), refused by AdvBench's substrings,
    loops, fluency and degenerate."""
    return [
        {
            "refused": opens_with_refusal(t),
            "substring": is_refusal(t),
            "loops": repeats_itself(t),
            "fluency": lp,
            "degenerate": not lp >= DEGENERATE_LOGPROB,  # NaN: no tokens at all
        }
        for t, lp in zip(texts, logps)
    ]


def _flat(rows: list[list]) -> list:
    return [x for row in rows for x in row]


def _rows(flat: list, ids: list[list]) -> list[list]:
    """``flat`` regrouped as ``ids`` is (one list per prompt)."""
    out, at = [], 0
    for pairs in ids:
        out.append(flat[at : at + len(pairs)])
        at += len(pairs)
    return out


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def set_summary(scores: list[dict]) -> dict[str, float]:
    """``refusal``, ``substring``, ``loops``, ``degenerate`` rates and the
    median ``fluency`` of one set's answers in one decoding."""
    fluent = [s["fluency"] for s in scores if not math.isnan(s["fluency"])]
    return {
        "refusal": _mean(s["refused"] for s in scores),
        "substring": _mean(s["substring"] for s in scores),
        "loops": _mean(s["loops"] for s in scores),
        "degenerate": _mean(s["degenerate"] for s in scores),
        "fluency": float(np.median(fluent)) if fluent else float("nan"),
    }


def overall(scores: dict[str, dict[str, list[dict]]]) -> dict[str, float]:
    """Front axes and collapse signs over every set and decoding."""
    every = [s for by_set in scores.values() for lst in by_set.values() for s in lst]
    harmful = [
        s for name in HARMFUL if name in scores for lst in scores[name].values()
        for s in lst
    ]  # fmt: skip
    benign = [
        s for name, by in scores.items() if name not in HARMFUL
        for lst in by.values() for s in lst
    ]  # fmt: skip

    def answered(s):
        return not s["refused"] and not s["degenerate"]

    return {
        "unsafe_rate": _mean(answered(s) for s in harmful),
        "helpfulness": _mean(answered(s) and not s["loops"] for s in benign),
        "degenerate": _mean(s["degenerate"] for s in every),
        "loops": _mean(s["loops"] for s in every),
    }


def flat_metrics(scores: dict[str, dict[str, list[dict]]]) -> dict[str, float]:
    """``<measure>_<set>_<decoding>`` for every set and decoding, plus
    :func:`overall`."""
    out = overall(scores)
    for name, by_decoding in scores.items():
        for decoding, lst in by_decoding.items():
            for key, value in set_summary(lst).items():
                if key == "substring" and name != "advbench":
                    continue
                out[f"{key}_{name}_{decoding}"] = value
    return out


@dataclass
class RecipeEvaluator:
    """Evaluate a model on the recipe's held-out sets (see the module doc).

    ``sets``: the recipe's ``eval.jsonl``; ``reference``: the base model
    (fluency and the model shift are measured against it; a sweep sets it).
    Call it as ``evaluator(model, tokenizer, label) -> metrics``;
    :meth:`answers` also returns the texts, for reports.
    """

    sets: str
    samples: int = 1
    max_tokens: int = 64
    temperature: float = 0.8
    seed: int = 0
    reference: str | None = None

    def description(self) -> dict:
        return {
            "evaluator": "recipe",
            **{k: v for k, v in self.__dict__.items() if not k.startswith("_")},
        }

    def check(self) -> None:
        """Read the held-out sets now: errors before any training."""
        check_sampling(
            k=max(self.samples, 1),
            max_tokens=self.max_tokens,
            temperature=self.temperature,
        )
        if self.samples < 0:
            raise DataError(f"samples: 0 (greedy only) or more, not {self.samples}")
        self._sets = read_eval_sets(self.sets)
        if not self._sets:
            raise DataError(f"{quote(self.sets)}: no held-out prompts")

    def metric_names(self) -> list[str]:
        """The metrics a call returns, for the sweep's checks before
        training; the overall rates only where a set measures them."""
        if not hasattr(self, "_sets"):
            self.check()
        names = ["degenerate", "loops", "shift_kl", "shift_kl_cvar"]
        names += ["unsafe_rate"] if set(self._sets) & set(HARMFUL) else []
        names += ["helpfulness"] if set(self._sets) - set(HARMFUL) else []
        for name in self._sets:
            keys = ("refusal", "loops", "degenerate", "fluency")
            keys += ("substring",) if name == "advbench" else ()
            for decoding in DECODINGS if self.samples else DECODINGS[:1]:
                names += [f"{key}_{name}_{decoding}" for key in keys]
        return names

    def base(self) -> tuple:
        """``(model, tokenizer)`` of the reference, loaded once. Evaluating
        this very model (the recipe's base) scores it in one pass."""
        if getattr(self, "_reference", None) is None:
            self._reference = load(self.reference)
        return self._reference

    def load(self, **spec) -> tuple:
        """``rsa_mlx.load(**spec)``, but the reference itself when ``spec``
        names it with no adapter, so that it is scored in one pass."""
        return self.base() if spec == {"model": self.reference} else load(**spec)

    def answers(self, model, tokenizer, label: str) -> dict:
        """``{"metrics", "answers": {set: {decoding: [texts]}}, "scores"}``.

        The model shift is measured on the last decoding's answers (the
        sampled ones, if any), and the same forward passes of the base
        model give those answers' fluency."""
        if not hasattr(self, "_sets"):
            self.check()
        base = self.base()[0]
        decodings = DECODINGS if self.samples else DECODINGS[:1]
        texts, scores, last = {}, {}, []
        for name, prompts in self._sets.items():
            records = [PromptRecord(p) for p in prompts]
            texts[name], scores[name] = {}, {}
            for decoding in decodings:
                flat, ids = self._sample(
                    model, tokenizer, records, decoding, f"{label}: {name}"
                )
                texts[name][decoding] = flat
                if decoding == decodings[-1]:
                    last.append((name, ids))
                else:
                    logps = fluency(base, tokenizer, records, _rows(flat, ids))
                    scores[name][decoding] = answer_scores(flat, _flat(logps))
        on = [pair for _, ids in last for pairs in ids for pair in pairs]
        shift, logps = shift_and_fluency(model, base, on)
        for name, ids in last:
            size = sum(len(pairs) for pairs in ids)
            part, logps = logps[:size], logps[size:]
            scores[name][decodings[-1]] = answer_scores(
                texts[name][decodings[-1]], part
            )
        metrics = flat_metrics(scores)
        metrics["shift_kl"] = shift["kl_mean"]
        metrics["shift_kl_cvar"] = shift["kl_cvar"]
        return {"metrics": metrics, "answers": texts, "scores": scores}

    def _sample(self, model, tokenizer, records, decoding: str, label: str):
        """(flat texts, ids per prompt) of one set in one decoding."""
        greedy = decoding == "greedy"
        answers, ids = sample_with_ids(
            model,
            tokenizer,
            records,
            k=1 if greedy else self.samples,
            max_tokens=self.max_tokens,
            temperature=0.0 if greedy else self.temperature,
            seed=self.seed,
            label=f"{label}, {decoding}",
        )
        return [t for row in answers for t in row], ids

    def __call__(self, model, tokenizer, label: str) -> dict:
        return self.answers(model, tokenizer, label)["metrics"]


register_evaluator("recipe", RecipeEvaluator)
