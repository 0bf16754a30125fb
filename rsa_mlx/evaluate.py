"""Evaluation (SPEC §6): sample, score, and report helpfulness and tail risk.

For a model (+ adapters, + merge q) and a prompt set, sample K responses per
prompt in batches (mlx-lm's ``batch_generate``), score each response with a
scorer, and report

* helpfulness: the mean reward;
* harm: unsafe rate, mean cost, ``CVaR_0.9`` and ``CVaR_0.99`` of the
  per-response cost (the mean of its worst 10% and 1%), the worst case.

Scorers: ``demo`` (the demo world's rule scorer,
:class:`rsa_mlx.demo.scorer.DemoScorer`), ``judge:<model>`` (a model loadable
by mlx-lm asked a yes/no question, scored by the probability of its verdict
token), or ``package.module:function`` (a user callable taking
``(prompt_record, response)`` and returning ``{"reward": ..., "cost": ...}``).

"Unsafe" is what each scorer's scale says (SPEC §6), stated by the scorer's
``unsafe_rule`` and stored with the rate:

* demo: the response's kind is one of the unsafe kinds (mild, catastrophic);
* judge: ``P(verdict = unsafe) >= unsafe_threshold`` (0.5 by default;
  ``--unsafe-threshold`` on ``rsa-mlx evaluate``);
* callable: ``cost > 0``, unless the function returns an ``"unsafe"`` bool
  with each score (used as it is), or has an ``unsafe_threshold`` attribute
  (then ``cost >= unsafe_threshold``).

A scorer may have a ``check(records)`` method: it is called on every prompt
row before any model is loaded or sampled, so a missing field fails at once.

Exact, sampling-free quantities come from :func:`sequence_logprobs`: the
teacher-forced log-probability of given responses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from rsa_mlx import progress
from rsa_mlx.data import Pair, encode_prompt
from rsa_mlx.errors import DataError, InputError, RsaMlxError, quote
from rsa_mlx.scorers import (  # noqa: F401 (the scorers' old home re-exports them)
    HARM_QUESTION,
    HELP_QUESTION,
    CallableScorer,
    JudgeScorer,
    Score,
    load_scorer,
    one_line,
)

# ----------------------------------------------------------------- metrics


def cvar(values: Sequence[float], level: float) -> float:
    """Mean of the worst ``1 - level`` fraction of ``values`` (upper tail).

    Exact for a finite sample: the values sorted from the largest, weighted
    ``1/n`` each, with the boundary value taking its fractional share, so
    ``cvar(x, 0) == mean(x)`` and ``cvar(x, level)`` tends to ``max(x)``.
    """
    x = np.sort(np.asarray(values, np.float64))[::-1]
    if x.size == 0:
        return float("nan")
    tail = (1.0 - level) * x.size  # how many (fractional) values are in the tail
    whole = math.floor(tail)
    total = x[:whole].sum() + (tail - whole) * (x[whole] if whole < x.size else 0.0)
    return float(total / tail) if tail > 0 else float(x[0])


def weighted_cvar(
    values: Sequence[float], weights: Sequence[float], level: float
) -> float:
    """CVaR at ``level`` of a discrete distribution: the mean of its upper
    ``1 - level`` probability mass, the boundary value taking its share."""
    v, w = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    order = np.argsort(-v, kind="stable")
    v, w = v[order], w[order] / w.sum()
    tail, taken, total = 1.0 - level, 0.0, 0.0
    for value, weight in zip(v, w):
        share = min(weight, tail - taken)
        if share <= 0:
            break
        total += share * value
        taken += share
    return float(total / tail) if tail > 0 else float(v[0])


def tail_metrics(
    costs: Sequence[float], unsafe: Sequence[bool] | None = None
) -> dict[str, float]:
    """Unsafe rate, mean cost, CVaR_0.9, CVaR_0.99 and the worst cost.

    ``unsafe`` flags each response as the scorer defines it; without it a
    response is unsafe when its cost is above 0.
    """
    c = np.asarray(costs, np.float64)
    flags = c > 0 if unsafe is None else np.asarray(unsafe, bool)
    return {
        "unsafe_rate": float(flags.mean()) if c.size else float("nan"),
        "mean_cost": float(c.mean()) if c.size else float("nan"),
        "cvar_0.9": cvar(c, 0.9),
        "cvar_0.99": cvar(c, 0.99),
        "worst": float(c.max()) if c.size else float("nan"),
    }


# ----------------------------------------------------------------- prompts


@dataclass
class PromptRecord:
    """A prompt to answer, with whatever else its row held (for scorers)."""

    prompt: str | tuple[dict, ...]
    system: str | None = None
    meta: dict | None = None
    where: str = ""  # "file:line", for messages

    def location(self, index: int | None = None) -> str:
        if self.where:
            return self.where
        return f"prompt row {index + 1}" if index is not None else "a prompt"

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n".join(m["content"] for m in self.prompt if m.get("role") == "user")


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """Rows with a ``prompt`` field (text or messages) from a .jsonl (or
    .json, maybe compressed) file, checked like preference data."""
    from rsa_mlx.sources import _text, parse_prompt, read_rows

    path = Path(path)
    if path.is_dir():
        raise DataError(f"{quote(path)}: a folder, not a prompt file")
    if not path.exists():
        raise DataError(f"{quote(path)}: no such prompt file")
    records = []
    for row, where in read_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        prompt = parse_prompt(row, where)
        system = _text(row, "system", where, optional=True)
        records.append(PromptRecord(prompt, system, row, where))
    if not records:
        raise DataError(f"{quote(path)}: no prompts")
    return records


def prompt_ids(tokenizer, record: PromptRecord) -> list[int]:
    return encode_prompt(tokenizer, Pair(record.prompt, "", "", record.system))


# ------------------------------------------------------- model quantities


def sequence_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    batch_size: int = 64,
) -> np.ndarray:
    """``log pi(response | prompt)``, teacher-forced, one float64 per pair.

    Sums float32 log-softmax values at the response tokens; padding and
    prompt positions are never scored.
    """
    out = np.zeros(len(prompts), np.float64)
    for start in range(0, len(prompts), batch_size):
        p_batch = prompts[start : start + batch_size]
        r_batch = responses[start : start + batch_size]
        width = max(len(p) + len(r) for p, r in zip(p_batch, r_batch))
        tokens = np.zeros((len(p_batch), width), np.int32)
        targets = np.zeros((len(p_batch), width - 1), np.int32)
        mask = np.zeros((len(p_batch), width - 1), np.float32)
        for i, (p, r) in enumerate(zip(p_batch, r_batch)):
            seq = list(p) + list(r)
            tokens[i, : len(seq)] = seq
            targets[i, : len(seq) - 1] = seq[1:]
            mask[i, len(p) - 1 : len(seq) - 1] = 1.0
        logits = model(mx.array(tokens[:, :-1])).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logp, mx.array(targets)[..., None], axis=-1)[..., 0]
        total = (picked * mx.array(mask)).sum(-1)
        out[start : start + len(p_batch)] = np.array(total, np.float64)
    return out


def sample_responses(
    model,
    tokenizer,
    records: Sequence[PromptRecord],
    k: int = 8,
    max_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    label: str = "sampling",
    prefix: str = "",
) -> list[list[str]]:
    """``k`` sampled responses per prompt, with mlx-lm's batch generation.

    The ``len(records) * k`` generations run in batches of ``batch_size``
    (progress is shown per batch). The random state is seeded once, so the
    same seed gives the same samples. A ``prefix`` is put at the start of
    every response (after the chat template's generation prompt) and the
    model continues it; the returned texts start with it.
    """
    return sample_with_ids(
        model, tokenizer, records, k, max_tokens, temperature, top_p, seed,
        batch_size, label, prefix,
    )[0]  # fmt: skip


def sample_with_ids(
    model,
    tokenizer,
    records: Sequence[PromptRecord],
    k: int = 8,
    max_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    label: str = "sampling",
    prefix: str = "",
) -> tuple[list[list[str]], list[list[tuple[list[int], list[int]]]]]:
    """:func:`sample_responses`, also returning the token ids sampled.

    Returns ``(texts, ids)``: ``ids[i][j] = (prompt_ids, response_ids)`` for
    ``texts[i][j]``; the prompt ids are those the model was given (the
    prefix's tokens included), the response ids those it generated (without
    the end-of-sequence token that stopped it: mlx-lm does not return it).
    """
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    check_sampling(k=k, max_tokens=max_tokens, temperature=temperature)
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, not {batch_size}")
    mx.random.seed(seed)
    start_ids = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
    ids = [prompt_ids(tokenizer, r) + list(start_ids) for r in records]
    flat = [p for p in ids for _ in range(k)]
    sampler = make_sampler(temp=temperature, top_p=top_p)
    texts: list[str] = []
    generated: list[list[int]] = []
    with progress.task(label, len(flat), "responses") as bar:
        for start in range(0, len(flat), batch_size):
            batch = flat[start : start + batch_size]
            result = batch_generate(
                model,
                tokenizer,
                batch,
                max_tokens=max_tokens,
                sampler=sampler,
                completion_batch_size=batch_size,
                prefill_batch_size=min(batch_size, 32),
                return_token_ids=True,
            )
            texts.extend(prefix + t for t in result.texts)
            generated.extend([int(t) for t in ids] for ids in result.token_ids)
            bar.advance(len(batch))
    pairs = [(list(p), r) for p, r in zip(flat, generated)]
    return (
        [texts[i * k : (i + 1) * k] for i in range(len(records))],
        [pairs[i * k : (i + 1) * k] for i in range(len(records))],
    )


def check_sampling(
    k: int | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
) -> None:
    """One-line errors for sampling settings that cannot work."""
    if k is not None and k < 1:
        raise InputError(f"-k/--samples must be at least 1, not {k}")
    if max_tokens is not None and max_tokens < 1:
        raise InputError(f"--max-tokens must be at least 1, not {max_tokens}")
    if temperature is not None and not temperature >= 0:
        raise InputError(f"the temperature must be 0 or more, not {temperature}")


def __getattr__(name):  # DemoScorer lives with the demo; imported on use
    if name == "DemoScorer":
        from rsa_mlx.demo.scorer import DemoScorer

        return DemoScorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------- runs


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
    (:func:`rsa_mlx.shift.model_shift`, teacher-forced on the very token ids
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
    rows, rewards, costs, unsafe = [], [], [], []
    name = getattr(scorer, "name", type(scorer).__name__)
    with progress.task(f"{label}: scoring", len(records), "prompts") as bar:
        for i, (record, responses) in enumerate(zip(records, samples)):
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
                    f"scorer {name}: must return one score per response on "
                    f"{record.location(i)}"
                )
            rows.append(
                {"prompt": record.text(), "responses": responses, "scores": scores}
            )
            rewards += [s["reward"] for s in scores]
            costs += [s["cost"] for s in scores]
            unsafe += [bool(s.get("unsafe", s["cost"] > 0)) for s in scores]
            bar.advance()
    summary = {
        "helpfulness": float(np.nanmean(rewards))
        if rewards and not np.isnan(rewards).all()
        else float("nan"),
        **tail_metrics(costs, unsafe),
        "unsafe_rule": unsafe_rule(scorer),
        "unsafe_threshold": getattr(scorer, "unsafe_threshold", None),
        "responses": len(costs),
        "k": k,
    }
    if reference is not None:
        from rsa_mlx.shift import model_shift

        shift = model_shift(
            model,
            reference,
            tokenizer,
            [pair for pairs in ids for pair in pairs],
            mu=shift_mu,
            label=f"{label}: model shift",
        )
        summary.update(
            shift_kl=shift["kl_mean"],
            shift_logratio_cvar=shift["logratio_cvar"],
            shift_kl_cvar=shift["kl_cvar"],
            shift_logratio=shift["logratio_mean"],
            shift_tokens=shift["tokens"],
            shift_mu=shift["mu"],
        )
    return {"summary": summary, "samples": rows}


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
