"""Preference data (docs/method.md §5): finding, reading and checking rows.

Two row layouts are accepted, in ``.jsonl`` or ``.json`` (a list of rows),
optionally compressed (``.jsonl.xz``, ``.jsonl.gz``):

* preference rows ``{"prompt": str | [messages], "chosen": str,
  "rejected": str, "system"?: str, "chosen_truncated"?: bool,
  "rejected_truncated"?: bool}``; a response marked truncated was cut short
  (e.g. by a generation's token limit) and is trained on without the
  end-of-turn token, so the model is not taught to stop where it was cut;
* PKU-SafeRLHF rows ``{"prompt", "response_0", "response_1",
  "better_response_id", "safer_response_id", ...}``: helpfulness pairs from
  ``better_response_id`` (stage ``reward``), safety pairs from
  ``safer_response_id`` (stage ``safety``). Rows whose two responses are
  equal are skipped and counted.

A source is a file, a folder with ``train``/``valid``/``test`` files (or with
``reward/`` and ``safety/`` sub-folders holding them), or a Hugging Face
dataset id ``org/name[/sub/folder]``, fetched with huggingface-hub (from its
cache when offline).

Every problem with the data is a :class:`~rsa_mlx.util.errors.DataError` in one
line naming the file and the line (``file:line``; ``file[index]`` in a JSON
list): malformed JSON, text that is not UTF-8, a corrupt or truncated
compressed file, a missing field or one of the wrong type.
"""

from __future__ import annotations

import gzip
import json
import lzma
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rsa_mlx.io import hf
from rsa_mlx.util.errors import DataError, InputError, quote

STAGES = ("reward", "safety")
SPLITS = ("train", "valid", "test")
_PKU_ID = {"reward": "better_response_id", "safety": "safer_response_id"}
_SUFFIXES = (".jsonl", ".json", ".jsonl.xz", ".jsonl.gz")
# A name ending like a data file is a local path, never a Hub dataset id.
_FILE_SUFFIXES = (".jsonl", ".json", ".xz", ".gz", ".csv", ".parquet", ".txt")


@dataclass(frozen=True)
class Pair:
    """One preference pair; ``prompt`` is text or a list of chat messages."""

    prompt: str | tuple[dict, ...]
    chosen: str
    rejected: str
    system: str | None = None
    where: str = ""  # "file:line", for messages
    chosen_truncated: bool = False  # cut short: no end-of-turn token after it
    rejected_truncated: bool = False


@dataclass
class LoadReport:
    """What was read, for the user: counts by reason."""

    rows: int = 0
    pairs: int = 0
    skipped: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        """``"<pairs> pairs from <rows> rows (skipped: <n> <reason>, ...)"``."""
        extra = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"{self.pairs} pairs from {self.rows} rows" + (
            f" (skipped: {extra})" if extra else ""
        )


# --------------------------------------------------------------------------
# reading


def _open_binary(path: Path):
    name = path.name
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    """What a damaged ``.gz``/``.xz`` stream raises while it is read."""

    return (EOFError, lzma.LZMAError, gzip.BadGzipFile, zlib.error)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` of a file, decompressing ``.gz``/``.xz``.

    A damaged compressed file is a :class:`DataError` naming the file.
    """
    corrupt = _corrupt_errors()
    try:
        with _open_binary(path) as f:
            yield from enumerate(f, 1)
    except corrupt as e:
        raise DataError(
            f"{quote(path)}: corrupt or truncated compressed file "
            f"({type(e).__name__}: {str(e) or 'unexpected end of data'})"
        ) from None


def _decode(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
            f"column {e.start + 1}); save the file as UTF-8"
        ) from None


def read_rows(path: Path) -> Iterator[tuple[object, str]]:
    """Yield (row, "file:line") from a .jsonl or .json file (maybe .xz/.gz);
    non-UTF-8 text, malformed JSON and damaged compression are each a
    one-line :class:`DataError` naming the file and line."""
    if ".jsonl" in path.name:
        for number, raw in _lines(path):
            line = _decode(raw, path, number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: malformed JSON ({e.msg})") from None
            yield row, f"{path}:{number}"
        return
    lines = list(_lines(path))
    text = "".join(_decode(raw, path, number) for number, raw in lines)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(rows, list):
        raise DataError(f"{quote(path)}: expected a JSON list of rows")
    for index, row in enumerate(rows):
        yield row, f"{path}[{index}]"


def text_field(row: dict, key: str, where: str, optional: bool = False) -> str | None:
    if key not in row:
        if optional:
            return None
        raise DataError(f"{where}: missing field {key!r}")
    value = row[key]
    if optional and value is None:
        return None
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {key!r} must be a string, got {type(value).__name__}"
        )
    return value


def flag_field(row: dict, key: str, where: str) -> bool:
    """An optional JSON boolean (absent or null: false)."""
    value = row.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise DataError(f"{where}: field {key!r} must be true or false, got {value!r}")
    return value


def _message(m: object, where: str, i: int) -> dict:
    """Check chat message ``i`` of a prompt: ``{"role": str, "content": str}``."""
    name = f"'prompt'[{i}]"
    if not isinstance(m, dict):
        raise DataError(
            f'{where}: {name} must be a message {{"role": str, "content": str}}, '
            f"got {type(m).__name__}"
        )
    for key in ("role", "content"):
        if key not in m:
            raise DataError(f"{where}: message {name} has no {key!r}")
        if not isinstance(m[key], str):
            raise DataError(
                f"{where}: message {name} field {key!r} must be a string, "
                f"got {type(m[key]).__name__}"
            )
    return dict(m)


def parse_prompt(row: dict, where: str) -> str | tuple[dict, ...]:
    """The row's ``prompt``: text, or a non-empty tuple of checked messages."""
    if "prompt" not in row:
        raise DataError(f"{where}: missing field 'prompt'")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        return tuple(_message(m, where, i) for i, m in enumerate(prompt))
    raise DataError(
        f"{where}: field 'prompt' must be a string or a non-empty list of messages, "
        f"got {type(prompt).__name__}"
    )


def _response_id(row: dict, key: str, where: str) -> int:
    if key not in row:
        raise DataError(f"{where}: missing field {key!r}")
    value = row[key]
    if isinstance(value, bool) or value not in (0, 1):
        raise DataError(f"{where}: field {key!r} must be 0 or 1, got {value!r}")
    return int(value)


def parse_row(row: object, where: str, stage: str | None) -> Pair | str:
    """A :class:`Pair`, or the reason the row is skipped.

    Preference rows give ``(chosen, rejected)`` as written; PKU-SafeRLHF rows
    give ``chosen = response_k``, ``rejected = response_{1-k}`` with ``k`` the
    row's ``better_response_id`` (stage ``reward``) or ``safer_response_id``
    (stage ``safety``). Rows with ``chosen == rejected`` or an empty chosen
    response are skipped (the reason is returned).
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt = parse_prompt(row, where)
    system = text_field(row, "system", where, optional=True)
    if "response_0" in row or "response_1" in row:
        if stage is None:
            raise DataError(
                f"{where}: PKU-SafeRLHF rows hold two labels; say which stage "
                "(reward or safety) they are for"
            )
        responses = [text_field(row, f"response_{i}", where) for i in (0, 1)]
        better = _response_id(row, _PKU_ID[stage], where)
        chosen, rejected = responses[better], responses[1 - better]
    else:
        chosen = text_field(row, "chosen", where)
        rejected = text_field(row, "rejected", where)
    if chosen == rejected:
        return "equal responses"
    if not chosen:
        return "empty chosen response"
    cut = [flag_field(row, f"{k}_truncated", where) for k in ("chosen", "rejected")]
    return Pair(prompt, chosen, rejected, system, where, *cut)


# --------------------------------------------------------------------------
# sources


def _split_files(folder: Path, split: str) -> list[Path]:
    """``split`` files in ``folder``: its own first, else any below it (e.g.
    ``data/<subset>/train.jsonl``), all of them, in name order."""
    names = [f"{split}{suffix}" for suffix in _SUFFIXES]
    direct = [folder / n for n in names if (folder / n).is_file()]
    if direct:
        return direct[:1]
    found = [
        p
        for n in names
        for p in folder.rglob(n)
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(found)


def is_hub_id(source: str) -> bool:
    """Whether ``source`` (not an existing path) names a Hub dataset.

    Only ``org/name[/sub/folder]`` that does not start with ``.``, ``/`` or
    ``~`` and does not end like a data file (``.jsonl``, ``.json``, ``.gz``,
    ...) goes to the Hub; anything else is a local path.
    """
    parts = source.strip("/").split("/")
    return (
        len(parts) >= 2
        and all(parts)
        and not source.startswith((".", "/", "~", "\\"))
        and not parts[-1].lower().endswith(_FILE_SUFFIXES)
    )


def resolve_source(source: str | Path, stage: str | None, split: str) -> list[Path]:
    """The files holding ``split`` of ``source`` for ``stage`` (maybe none).

    ``source`` is a file (used for the ``train`` split), a folder, or a Hugging
    Face dataset id with an optional sub-folder (``org/name/data/subset``),
    downloaded or taken from the local cache when offline. A folder with
    ``reward/`` or ``safety/`` sub-folders gives each stage its own.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return [path] if split == "train" else []
    if not path.exists():
        if not is_hub_id(str(source)):
            raise DataError(f"no such file or folder {quote(source)}")
        path = _download_dataset(str(source))
    if stage and any((path / s).is_dir() for s in STAGES):
        if not (path / stage).is_dir():
            raise DataError(
                f"{quote(source)} has no {stage}/ folder for the {stage} stage"
            )
        path = path / stage
    return _split_files(path, split)


def _download_dataset(source: str) -> Path:
    parts = source.strip("/").split("/")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])

    patterns = [
        f"{sub}/**" if sub else "*",
        *(f"{sub + '/' if sub else ''}**{s}" for s in _SUFFIXES),
    ]
    try:
        root = hf.snapshot(repo_id, repo_type="dataset", allow_patterns=patterns)
    except (FileNotFoundError, InputError):
        raise DataError(
            f"no such file or folder {quote(source)}, and no Hugging Face dataset "
            f"{quote(repo_id)} could be fetched or found in the local cache"
        ) from None
    path = root / sub if sub else root
    if not path.exists():
        raise DataError(
            f"the Hugging Face dataset {quote(repo_id)} has no folder {quote(sub)}"
        )
    return path


def load_pairs(
    source: str | Path, stage: str | None = None, split: str = "train"
) -> tuple[list[Pair], LoadReport]:
    """Read and check every row of one split; see the module docstring.

    Raises :class:`DataError` (file, line and field named) on a bad row, and
    when a train split yields no usable pair.
    """
    paths = resolve_source(source, stage, split)
    report = LoadReport()
    if not paths:
        if split == "train":
            raise DataError(
                f"{quote(source)}: no train split found (train.jsonl, train.json, "
                "train.jsonl.xz or train.jsonl.gz)"
            )
        return [], report
    pairs = []
    for path in paths:
        for row, where in read_rows(path):
            report.rows += 1
            parsed = parse_row(row, where, stage)
            if isinstance(parsed, str):
                report.skipped[parsed] += 1
            else:
                pairs.append(parsed)
    report.pairs = len(pairs)
    if not pairs and split == "train":
        where = paths[0] if len(paths) == 1 else source
        raise DataError(
            f"{quote(where)}: no usable preference pairs ({report.describe()})"
        )
    return pairs, report
