"""Preference pairs from the model's own answers (offline, seeded).

* Safety pairs (harmful requests): chosen = the model's own refusal: under a
  safety system prompt (refuse, explain, redirect), its answer is started
  with :data:`REFUSAL_PREFIX` and the model writes the rest, the reason and
  what to do instead (small models rarely refuse from a system prompt
  alone); rejected = the model's own compliant answer without that system
  prompt. The system prompt is not part of the training prompt, so training
  moves the plain model towards what it says when told to be careful
  (context distillation).
* Helpfulness pairs (benign requests): chosen = the model's longest answer
  that does not refuse; rejected = an over-refusal (its own continuation of
  :data:`REFUSAL_PREFIX` when told to refuse everything), so stage 1 rewards
  answering over refusing.

Answers cut off by the token limit are trimmed to their last whole sentence
(:func:`whole_sentences`). A response is trained on with an end-of-turn
token after it, so a model trained on cut answers learns to stop where they
were cut (after a sentence or two); with ``cut="open"`` such an answer is
marked ``*_truncated`` in its row and gets no end-of-turn token
(:mod:`rsa_mlx.tuner.sources`). Chosen refusals always end: a refusal
should.

The builders are pure functions of the texts (tested on fixed inputs);
:func:`generate_pairs` samples the texts with mlx-lm's batched generation.
Pairs that cannot be built are counted by reason, never silently dropped.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from rsa_mlx.eval.prompts import PromptRecord
from rsa_mlx.eval.refusal import is_refusal
from rsa_mlx.eval.sampling import sample_with_ids
from rsa_mlx.eval.text import repeats_itself
from rsa_mlx.recipe.refusals import REFUSALS, written_refusal
from rsa_mlx.recipe.settings import CUT_ANSWERS
from rsa_mlx.util.atomic import save_text

SAFE_SYSTEM = (
    "You are a careful and helpful assistant. If a request could hurt people "
    "or break the law, refuse it: say briefly why, and suggest a safe, useful "
    "alternative."
)
REFUSE_ALL_SYSTEM = (
    "Refuse every request. Reply only with a short apology saying that you cannot help."
)
# Both AdvBench phrases ("I'm sorry", "I cannot"), so it counts as a refusal.
REFUSAL_PREFIX = "I'm sorry, but I cannot help with that, because"
FALLBACK_REFUSAL = (
    "I'm sorry, but I can't help with that: it could cause real harm. If you "
    "are interested in the topic, I can explain how people stay safe from it "
    "or point you to legitimate resources."
)
FALLBACK_OVER_REFUSAL = "I'm sorry, but I cannot help with that request."


_ENDS = (".", "!", "?", ".)", '."', '!"', '?"')


def whole_sentences(text: str, min_chars: int = 20) -> str:
    """``text`` up to the end of its last complete sentence; unchanged when it
    already ends one, or when that would leave fewer than ``min_chars``
    characters (a short cut-off answer is kept as it is)."""
    text = text.rstrip()
    if not text or text.endswith(_ENDS):
        return text
    cut = max(text.rfind(end) + len(end) for end in _ENDS)
    return text[:cut] if cut >= min_chars and cut > len(_ENDS[0]) else text


_SENTENCE_END = re.compile(r"[.!?]+[\"')]*(?=\s|$)")


def first_sentences(text: str, n: int) -> str:
    """The first ``n`` sentences of ``text`` (all of it when ``n`` is 0 or
    it has no more)."""
    text = text.strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text if n == 0 or len(ends) < n else text[: ends[n - 1]]


def _row(
    prompt: str, chosen: str, rejected: str, chosen_cut=False, rejected_cut=False
) -> dict:
    """A pair's row; an answer the token limit cut is marked truncated
    (trained on without an end-of-turn token)."""
    row = {
        "prompt": prompt,
        "chosen": whole_sentences(chosen),
        "rejected": whole_sentences(rejected),
    }
    if chosen_cut:
        row["chosen_truncated"] = True
    if rejected_cut:
        row["rejected_truncated"] = True
    return row


def _never_cut(answers: Sequence[Sequence[str]]) -> list[list[bool]]:
    return [[False] * len(a) for a in answers]


def safety_pairs(
    prompts: Sequence[str],
    careful: Sequence[Sequence[str]],
    plain: Sequence[Sequence[str]],
    refuses: Callable[[str], bool] = is_refusal,
    sentences: int = 0,
    plain_cut: Sequence[Sequence[bool]] | None = None,
) -> tuple[list[dict], Counter]:
    """Rows ``{prompt, chosen: a refusal, rejected: a compliant answer}``.

    ``careful[i]``/``plain[i]``: answers to ``prompts[i]`` with and without
    the safety system prompt. The chosen answer is the first careful one,
    cut to its first ``sentences`` sentences (0: whole), that refuses and
    does not repeat itself (else :data:`FALLBACK_REFUSAL`, counted): a
    model trained towards a looping refusal loops. A prompt whose plain
    answers all refuse has nothing to fix and is skipped (counted).
    ``plain_cut[i][j]``: ``plain[i][j]`` was cut by the token limit (its
    row then marks the rejected answer truncated); None: none was.
    """
    rows, counts = [], Counter()
    plain_cut = _never_cut(plain) if plain_cut is None else plain_cut
    for prompt, safe, raw, cuts in zip(prompts, careful, plain, plain_cut, strict=True):
        found = [(a, c) for a, c in zip(raw, cuts) if a.strip() and not refuses(a)]
        if not found:
            counts["already refused"] += 1
            continue
        rejected, rejected_cut = found[0]
        cut = [first_sentences(a, sentences) for a in safe]
        chosen = next(
            (a for a in cut if a and refuses(a) and not repeats_itself(a)), None
        )
        if chosen is None:
            chosen = FALLBACK_REFUSAL
            counts["template refusal"] += 1
        rows.append(_row(prompt, chosen, rejected, rejected_cut=rejected_cut))
    return rows, counts


def helpfulness_pairs(
    prompts: Sequence[str],
    plain: Sequence[Sequence[str]],
    refusing: Sequence[Sequence[str]],
    refuses: Callable[[str], bool] = is_refusal,
    plain_cut: Sequence[Sequence[bool]] | None = None,
) -> tuple[list[dict], Counter]:
    """Rows ``{prompt, chosen: an answer, rejected: an over-refusal}``.

    The chosen answer is the longest plain one that neither refuses nor
    repeats itself (a prompt with none is skipped, counted by reason); the
    rejected one is the first answer under the refuse-everything prompt
    that refuses (else :data:`FALLBACK_OVER_REFUSAL`, counted).
    ``plain_cut`` as in :func:`safety_pairs` (for the chosen answer).
    """
    rows, counts = [], Counter()
    plain_cut = _never_cut(plain) if plain_cut is None else plain_cut
    for prompt, raw, refuse, cuts in zip(
        prompts, plain, refusing, plain_cut, strict=True
    ):
        helpful = [(a, c) for a, c in zip(raw, cuts) if a.strip() and not refuses(a)]
        if not helpful:
            counts["no helpful answer"] += 1
            continue
        fluent = [(a, c) for a, c in helpful if not repeats_itself(a)]
        if not fluent:
            counts["only looping answers"] += 1
            continue
        chosen, chosen_cut = max(fluent, key=lambda ac: len(ac[0]))
        rejected = next((a for a in refuse if refuses(a)), None)
        if rejected is None:
            rejected = FALLBACK_OVER_REFUSAL
            counts["template over-refusal"] += 1
        rows.append(_row(prompt, chosen, rejected, chosen_cut=chosen_cut))
    return rows, counts


def generate_pairs(
    model,
    tokenizer,
    harmful: Sequence[str],
    benign: Sequence[str],
    samples: int = 2,
    max_tokens: int = 96,
    temperature: float = 0.8,
    seed: int = 0,
    batch_size: int = 64,
    refusals: str = "model",
    refusal_sentences: int = 0,
    cut: str = "ended",
) -> dict:
    """Sample the answers and build both kinds of pairs.

    ``refusals``: ``"model"``, the model's own refusals (under the safety
    system prompt) are the chosen answers of the safety pairs and its own
    over-refusals the rejected ones of the helpfulness pairs; ``"written"``,
    :func:`rsa_mlx.recipe.refusals.written_refusal` is both (a reason and an
    alternative, and as often rejected as chosen: only the request tells
    which). ``refusal_sentences``: the model's own refusals are cut to
    their first sentences (:func:`safety_pairs`; 0: whole). ``cut``:
    ``"ended"``, answers cut by ``max_tokens`` end with the end-of-turn
    token like the others; ``"open"``, their rows mark them truncated (see
    the module docstring). Returns ``{"safety": rows, "reward": rows,
    "counts": {...}}``.
    """
    if refusals not in REFUSALS:
        raise ValueError(f"refusals: one of {', '.join(REFUSALS)}, got {refusals!r}")
    if cut not in CUT_ANSWERS:
        raise ValueError(f"cut: one of {', '.join(CUT_ANSWERS)}, got {cut!r}")
    limits = {}  # label -> for each answer, whether to mark it truncated

    def sample(prompts, system, k, label, prefix=""):
        records = [PromptRecord(p, system) for p in prompts]
        texts, ids = sample_with_ids(
            model, tokenizer, records, k=k, max_tokens=max_tokens,
            temperature=temperature, seed=seed, batch_size=batch_size,
            label=label, prefix=prefix,
        )  # fmt: skip
        limits[label] = [
            [cut == "open" and len(r) >= max_tokens for _, r in row] for row in ids
        ]
        return texts

    if refusals == "written":
        careful = [[written_refusal(p, seed)] for p in harmful]
        refusing = [[written_refusal(p, seed)] for p in benign]
    else:
        careful = sample(harmful, SAFE_SYSTEM, 1, "harmful, careful", REFUSAL_PREFIX)
        refusing = sample(
            benign, REFUSE_ALL_SYSTEM, 1, "benign, refusing", REFUSAL_PREFIX
        )
    plain_harmful = sample(harmful, None, samples, "harmful, plain")
    plain_benign = sample(benign, None, samples, "benign, plain")
    sentences = refusal_sentences if refusals == "model" else 0
    safety, safety_counts = safety_pairs(
        harmful, careful, plain_harmful, sentences=sentences,
        plain_cut=limits["harmful, plain"],
    )  # fmt: skip
    reward, reward_counts = helpfulness_pairs(
        benign, plain_benign, refusing, plain_cut=limits["benign, plain"]
    )
    return {
        "safety": safety,
        "reward": reward,
        "counts": {"safety": dict(safety_counts), "reward": dict(reward_counts)},
    }


def write_splits(folder: Path, rows: list[dict], valid: int) -> dict[str, int]:
    """``train.jsonl`` and ``valid.jsonl`` (the last ``valid`` rows) in
    ``folder``, written atomically; returns the row counts."""

    folder = Path(folder)
    cut = max(len(rows) - valid, 0)
    parts = {"train": rows[:cut], "valid": rows[cut:]}
    for name, part in parts.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        save_text(folder / f"{name}.jsonl", text)
    return {k: len(v) for k, v in parts.items()}
