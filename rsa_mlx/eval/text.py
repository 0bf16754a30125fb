"""Measures of an answer's text alone: does it repeat itself?

A model pushed too far by preference training loops ("I cannot help with
that. I cannot. I am sorry, but I cannot. I cannot."): such an answer can
still look likely to the model, so a log-probability test does not catch it.
Two signs do:

* few distinct word n-grams, ``distinct_n = |set(ngrams)| / |ngrams|`` over
  the lower-cased words with punctuation dropped: fluent prose is near 1, a
  loop of period p words over L words about p / L;
* a sentence said twice (of two words or more), which a short loop shows
  before its n-grams run out.
"""

from __future__ import annotations

import re

__all__ = [
    "LOOP_N",
    "LOOP_SHARE",
    "distinct_ngram_share",
    "repeated_sentence",
    "repeats_itself",
    "words",
]

LOOP_N = 2  # word bigrams
LOOP_SHARE = 0.5  # fewer than half of them distinct: the answer loops
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SENTENCE = re.compile(r"[^.!?\n]+")


def words(text: str) -> list[str]:
    """Lower-cased words, punctuation dropped (apostrophes inside kept)."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def distinct_ngram_share(text: str, n: int = LOOP_N) -> float | None:
    """``|distinct word n-grams| / |word n-grams|``; None for a text with
    fewer than ``2 n`` words (too short to tell)."""
    w = words(text)
    if len(w) < 2 * n:
        return None
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams)


def repeated_sentence(text: str) -> bool:
    """Some sentence of two or more words occurs twice (compared by words)."""
    seen = set()
    for part in _SENTENCE.findall(text):
        key = tuple(words(part))
        if len(key) >= 2:
            if key in seen:
                return True
            seen.add(key)
    return False


def repeats_itself(text: str, n: int = LOOP_N, share: float = LOOP_SHARE) -> bool:
    """The answer loops: fewer than ``share`` of its word n-grams are
    distinct, or it says a sentence twice."""
    value = distinct_ngram_share(text, n)
    return (value is not None and value < share) or repeated_sentence(text)
