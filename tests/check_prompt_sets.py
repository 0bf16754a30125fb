"""Check the four prompt sets in this folder (stdlib only, well under a second).

    python3 tests/check_prompt_sets.py [--advbench PATH] [--quiet]

Checks the fields, forms and categories of every row, the counts per
category, word counts, ASCII apostrophes, duplicates (case and punctuation
normalised) within and across the four files, the share of rows that start
with the same three words, and flags train/eval pairs whose word-set Jaccard
similarity (lowercase, stopwords removed) is above 0.5.  It reports the
counts per category and form, how many harmful_eval rows list AdvBench
overlaps and how many distinct AdvBench indices that excludes from training.

``--advbench PATH`` (AdvBench as ``index<TAB>text`` lines, or one behaviour
per line, or ``harmful_behaviors.csv``) prints the listed AdvBench texts under
each eval item, for reviewing the exclusion lists by eye.

Exit status 1 when anything is flagged, else 0.
"""

from __future__ import annotations

import argparse
import collections
import csv
import itertools
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "rsa_mlx" / "recipe" / "sets"

HARMFUL_CATEGORIES = (
    "violence",
    "weapons",
    "drugs",
    "hacking",
    "fraud",
    "theft",
    "hate_harassment",
    "privacy",
    "self_harm",
    "extremism",
    "poisoning",
    "child_safety",
    "animal_cruelty",
    "misinformation",
)
BORDERLINE_CATEGORIES = (
    "harmless_sense",
    "figurative",
    "safe_target",
    "games_fiction",
    "definition",
    "history",
    "safety",
    "public_fact",
    "medical_legal",
)
HARMFUL_FORMS = ("question", "first_person", "casual", "polite", "pretext")
BORDERLINE_FORMS = ("question", "first_person", "casual", "polite", "imperative")
ADVBENCH_SIZE = 520

# name: (categories, forms, min per category, min total, extra fields)
FILES = {
    "harmful_train.jsonl": (HARMFUL_CATEGORIES, HARMFUL_FORMS, 12, 200, ()),
    "harmful_eval.jsonl": (HARMFUL_CATEGORIES, HARMFUL_FORMS, 8, 130, ("advbench",)),
    "borderline_train.jsonl": (BORDERLINE_CATEGORIES, BORDERLINE_FORMS, 15, 180, ()),
    "borderline_eval.jsonl": (BORDERLINE_CATEGORIES, BORDERLINE_FORMS, 10, 130, ()),
}
PAIRS = (
    ("harmful_train.jsonl", "harmful_eval.jsonl"),
    ("borderline_train.jsonl", "borderline_eval.jsonl"),
)
# Harmful and borderline share words on purpose (contrast pairs); shown, not flagged.
CROSS_PAIRS = (
    ("harmful_train.jsonl", "borderline_eval.jsonl"),
    ("borderline_train.jsonl", "harmful_eval.jsonl"),
)

JACCARD_MAX = 0.5
START_SHARE_MAX = 0.10
MIN_WORDS, MAX_WORDS = 4, 30

_STOPWORD_TEXT = """
a an the and or but if so as of at by for from in into on onto to with without
about over under up down out off than then too very just also not no nor only
own same such both each few more most other some any all can could would should
will shall may might must do does did done doing have has had having be been
being is am are was were it its it's this that these those there here what
whats what's which who whom whose when where why how i me my myself mine we us
our ours you your yours he him his she her hers they them their theirs i'm
i've i'd i'll you're don't doesn't didn't can't won't isn't aren't let's get
got getting make makes made way ways best good easiest please tell know want
need someone something anyone anything one
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def normalise(text: str) -> str:
    """Lowercase, apostrophes dropped, other punctuation to spaces, one space."""
    text = text.lower().replace("'", "")
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def words(text: str) -> frozenset[str]:
    """Content words for the Jaccard check (lowercase, stopwords removed)."""
    tokens = re.findall(r"[a-z0-9']+", text.lower())
    return frozenset(
        t.strip("'")
        for t in tokens
        if t.strip("'") and t not in STOPWORDS and t.strip("'") not in STOPWORDS
    )


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def load(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path.name}:{n}: not JSON ({e})") from None
            row["_line"] = n
            rows.append(row)
    return rows


def read_advbench(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        return [r["goal"] for r in csv.DictReader(text.splitlines())]
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        head, tab, rest = line.partition("\t")
        out.append(rest if tab and head.strip().isdigit() else line)
    return out


def check(quiet: bool = False, advbench: Path | None = None) -> int:
    problems: list[str] = []
    data = {name: load(HERE / name) for name in FILES}

    for name, rows in data.items():
        categories, forms, min_per_cat, min_total, extra = FILES[name]
        want = {"prompt", "category", "form", *extra}
        for r in rows:
            where = f"{name}:{r['_line']}"
            keys = set(r) - {"_line"}
            if keys != want:
                problems.append(f"{where}: fields {sorted(keys)}, want {sorted(want)}")
            prompt = r.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                problems.append(f"{where}: empty or non-string prompt")
                continue
            if prompt != prompt.strip():
                problems.append(f"{where}: leading/trailing space")
            if any(ch in prompt for ch in "\u2018\u2019\u201c\u201d"):
                problems.append(f"{where}: curly quote (use ASCII)")
            n = len(prompt.split())
            if not MIN_WORDS <= n <= MAX_WORDS:
                problems.append(f"{where}: {n} words (want {MIN_WORDS}-{MAX_WORDS})")
            if r.get("category") not in categories:
                problems.append(f"{where}: unknown category {r.get('category')!r}")
            if r.get("form") not in forms:
                problems.append(f"{where}: unknown form {r.get('form')!r}")
            if "advbench" in extra:
                idx = r.get("advbench")
                if not isinstance(idx, list) or not all(
                    isinstance(i, int)
                    and not isinstance(i, bool)
                    and 0 <= i < ADVBENCH_SIZE
                    for i in idx
                ):
                    problems.append(
                        f"{where}: advbench must be a list of indices 0..{ADVBENCH_SIZE - 1}"
                    )
                elif len(set(idx)) != len(idx):
                    problems.append(f"{where}: repeated advbench index")
        per_cat = collections.Counter(r.get("category") for r in rows)
        for cat in categories:
            if per_cat[cat] < min_per_cat:
                problems.append(
                    f"{name}: {per_cat[cat]} rows of {cat} (want >= {min_per_cat})"
                )
        if len(rows) < min_total:
            problems.append(f"{name}: {len(rows)} rows (want >= {min_total})")
        starts = collections.Counter(
            " ".join(normalise(r["prompt"]).split()[:3]) for r in rows
        )
        for start, k in starts.most_common():
            if k / len(rows) > START_SHARE_MAX:
                problems.append(f"{name}: {k}/{len(rows)} rows start with {start!r}")

    seen: dict[str, str] = {}
    for name, rows in data.items():
        for r in rows:
            key = normalise(r["prompt"])
            where = f"{name}:{r['_line']}"
            if key in seen:
                problems.append(f"duplicate: {where} = {seen[key]}: {r['prompt']!r}")
            else:
                seen[key] = where

    bags = {
        name: [(words(r["prompt"]), r) for r in rows] for name, rows in data.items()
    }

    def similar(a_name: str, b_name: str):
        for (wa, a), (wb, b) in itertools.product(bags[a_name], bags[b_name]):
            if wa & wb:
                s = jaccard(wa, wb)
                if s > JACCARD_MAX:
                    yield s, a, b

    for a_name, b_name in PAIRS:
        for s, a, b in similar(a_name, b_name):
            problems.append(
                f"near-paraphrase {s:.2f}: {a_name}:{a['_line']} {a['prompt']!r}"
                f" ~ {b_name}:{b['_line']} {b['prompt']!r}"
            )
    cross = [
        (s, a_name, a, b_name, b)
        for a_name, b_name in CROSS_PAIRS
        for s, a, b in similar(a_name, b_name)
    ]

    if not quiet:
        for name, rows in data.items():
            categories, forms, *_ = FILES[name]
            per_cat = collections.Counter(r.get("category") for r in rows)
            per_form = collections.Counter(r.get("form") for r in rows)
            lengths = sorted(len(r["prompt"].split()) for r in rows)
            print(
                f"{name}: {len(rows)} rows, {lengths[0]}-{lengths[-1]} words "
                f"(median {lengths[len(lengths) // 2]})"
            )
            print("  categories: " + ", ".join(f"{c} {per_cat[c]}" for c in categories))
            print("  forms:      " + ", ".join(f"{f} {per_form[f]}" for f in forms))
            starts = collections.Counter(
                " ".join(normalise(r["prompt"]).split()[:3]) for r in rows
            )
            top = ", ".join(f"{s!r} {k}" for s, k in starts.most_common(3))
            print(f"  top starts: {top}")
        for s, _, a, _, b in cross:
            print(
                f"note (harmful/borderline contrast, not flagged) {s:.2f}: "
                f"{a['prompt']!r} ~ {b['prompt']!r}"
            )

    ev = data["harmful_eval.jsonl"]
    listed = [r for r in ev if r.get("advbench")]
    distinct = sorted(
        {
            i
            for r in ev
            if isinstance(r.get("advbench"), list)
            for i in r["advbench"]
            if isinstance(i, int) and 0 <= i < ADVBENCH_SIZE
        }
    )
    print(
        f"harmful_eval: {len(listed)}/{len(ev)} items list AdvBench overlaps; "
        f"{len(distinct)} distinct AdvBench indices excluded from training"
    )
    if not quiet:
        print(f"  excluded: {distinct}")
    if advbench is not None:
        texts = read_advbench(advbench)
        for r in listed:
            print(f"- {r['prompt']}")
            for i in r["advbench"]:
                print(f"    {i}: {texts[i] if i < len(texts) else '?'}")

    for p in problems:
        print("FLAG " + p)
    print(f"{len(problems)} problem(s)" if problems else "ok")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--advbench", type=Path, help="AdvBench file, to print the listed texts"
    )
    ap.add_argument(
        "--quiet", action="store_true", help="only the AdvBench summary and problems"
    )
    args = ap.parse_args(argv)
    return check(quiet=args.quiet, advbench=args.advbench)


if __name__ == "__main__":
    sys.exit(main())
