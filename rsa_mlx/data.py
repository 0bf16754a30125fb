"""Preference data (SPEC §5): reading, checking, tokenising and batching.

Two row layouts are accepted, in ``.jsonl`` or ``.json`` (a list of rows):

* preference rows ``{"prompt": str | [messages], "chosen": str,
  "rejected": str, "system"?: str}``;
* PKU-SafeRLHF rows ``{"prompt", "response_0", "response_1",
  "better_response_id", "safer_response_id", ...}``: helpfulness pairs from
  ``better_response_id`` (stage ``reward``), safety pairs from
  ``safer_response_id`` (stage ``safety``). Rows whose two responses are
  equal are skipped and counted.

A source is a file, a folder with ``train``/``valid``/``test`` files (or with
``reward/`` and ``safety/`` sub-folders holding them), or a Hugging Face
dataset id, fetched with huggingface-hub (from its cache when offline).

Tokenisation applies the chat template once to the prompt (with the
generation prompt) and appends the response tokens and the end-of-turn token;
the loss mask covers exactly those appended tokens. Over-long pairs keep the
prompt's end and the responses' start (:func:`truncate`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rsa_mlx.errors import DataError

STAGES = ("reward", "safety")
SPLITS = ("train", "valid", "test")
_PKU_ID = {"reward": "better_response_id", "safety": "safer_response_id"}
_SUFFIXES = (".jsonl", ".json", ".jsonl.xz", ".jsonl.gz")


@dataclass(frozen=True)
class Pair:
    """One preference pair; ``prompt`` is text or a list of chat messages."""

    prompt: str | tuple[dict, ...]
    chosen: str
    rejected: str
    system: str | None = None
    where: str = ""  # "file:line", for messages


@dataclass
class LoadReport:
    """What was read, for the user: counts by reason."""

    rows: int = 0
    pairs: int = 0
    skipped: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        extra = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"{self.pairs} pairs from {self.rows} rows" + (
            f" (skipped: {extra})" if extra else ""
        )


# --------------------------------------------------------------------------
# reading


def _open(path: Path):
    name = path.name
    if name.endswith(".xz"):
        import lzma

        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _rows(path: Path) -> Iterator[tuple[object, str]]:
    """Yield (row, "file:line") from a .jsonl or .json file (maybe .xz/.gz)."""
    if ".jsonl" in path.name:
        with _open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line), f"{path}:{number}"
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{number}: malformed JSON ({e.msg})"
                    ) from None
    else:
        try:
            with _open(path) as f:
                rows = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        for index, row in enumerate(rows):
            yield row, f"{path}[{index}]"


def _text(row: dict, key: str, where: str, optional: bool = False) -> str | None:
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


def _prompt(row: dict, where: str) -> str | tuple[dict, ...]:
    if "prompt" not in row:
        raise DataError(f"{where}: missing field 'prompt'")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        for i, m in enumerate(prompt):
            if not (
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                raise DataError(
                    f"{where}: field 'prompt'[{i}] must be a message "
                    '{"role": str, "content": str}'
                )
        return tuple(dict(m) for m in prompt)
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
    """A :class:`Pair`, or the reason the row is skipped."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt = _prompt(row, where)
    system = _text(row, "system", where, optional=True)
    if "response_0" in row or "response_1" in row:
        if stage is None:
            raise DataError(
                f"{where}: PKU-SafeRLHF rows hold two labels; say which stage "
                "(reward or safety) they are for"
            )
        responses = [_text(row, f"response_{i}", where) for i in (0, 1)]
        better = _response_id(row, _PKU_ID[stage], where)
        chosen, rejected = responses[better], responses[1 - better]
    else:
        chosen = _text(row, "chosen", where)
        rejected = _text(row, "rejected", where)
    if chosen == rejected:
        return "equal responses"
    if not chosen:
        return "empty chosen response"
    return Pair(prompt, chosen, rejected, system, where)


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


def resolve_source(source: str | Path, stage: str | None, split: str) -> list[Path]:
    """The files holding ``split`` of ``source`` for ``stage`` (maybe none).

    ``source`` is a file (used for the ``train`` split), a folder, or a Hugging
    Face dataset id with an optional sub-folder (``org/name/data/subset``),
    downloaded or taken from the local cache when offline. A folder with
    ``reward/`` or ``safety/`` sub-folders gives each stage its own.
    """
    path = Path(source)
    if path.is_file():
        return [path] if split == "train" else []
    if not path.exists():
        path = _download_dataset(str(source))
    if stage and any((path / s).is_dir() for s in STAGES):
        if not (path / stage).is_dir():
            raise DataError(f"{source}: has no {stage}/ folder for the {stage} stage")
        path = path / stage
    return _split_files(path, split)


def _download_dataset(source: str) -> Path:
    parts = source.strip("/").split("/")
    if len(parts) < 2 or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: no such file or folder")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    from rsa_mlx.hf import snapshot

    patterns = [
        f"{sub}/**" if sub else "*",
        *(f"{sub + '/' if sub else ''}**{s}" for s in _SUFFIXES),
    ]
    try:
        root = snapshot(repo_id, repo_type="dataset", allow_patterns=patterns)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    path = root / sub if sub else root
    if not path.exists():
        raise DataError(f"{source}: the dataset has no folder {sub!r}")
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
                f"{source}: no train split found (train.jsonl, train.json, "
                "train.jsonl.xz or train.jsonl.gz)"
            )
        return [], report
    pairs = []
    for path in paths:
        for row, where in _rows(path):
            report.rows += 1
            parsed = parse_row(row, where, stage)
            if isinstance(parsed, str):
                report.skipped[parsed] += 1
            else:
                pairs.append(parsed)
    report.pairs = len(pairs)
    if not pairs and split == "train":
        where = paths[0] if len(paths) == 1 else source
        raise DataError(f"{where}: no usable preference pairs ({report.describe()})")
    return pairs, report


# --------------------------------------------------------------------------
# tokenising


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template puts after an assistant message, else EOS."""
    if getattr(tokenizer, "has_chat_template", False):
        marker = "RSA_MLX_MARKER"
        try:
            text = tokenizer.apply_chat_template(
                [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": marker},
                ],
                tokenize=False,
            )
        except Exception:
            text = ""
        if isinstance(text, str) and marker in text:
            tail = text.split(marker, 1)[1]
            ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            if ids and ids[0] in special:
                return int(ids[0])
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no chat template end token and no EOS")
    return int(tokenizer.eos_token_id)


def encode_prompt(tokenizer, pair: Pair) -> list[int]:
    """Prompt tokens: the chat template applied once, with the generation prompt."""
    if getattr(tokenizer, "has_chat_template", False):
        messages = (
            list(pair.prompt)
            if isinstance(pair.prompt, tuple)
            else [{"role": "user", "content": pair.prompt}]
        )
        if pair.system is not None:
            messages = [{"role": "system", "content": pair.system}, *messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return [int(t) for t in ids]
    if isinstance(pair.prompt, tuple):
        raise DataError(
            f"{pair.where}: chat-message prompts need a tokenizer with a chat template"
        )
    text = pair.prompt if pair.system is None else f"{pair.system}\n\n{pair.prompt}"
    return [int(t) for t in tokenizer.encode(text)]


@dataclass
class Encoded:
    """Token ids of every pair: prompt, chosen and rejected responses (each
    response ending with the end-of-turn token when not truncated)."""

    prompts: list[np.ndarray]
    chosen: list[np.ndarray]
    rejected: list[np.ndarray]
    report: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.prompts)

    def length(self, i: int) -> int:
        return len(self.prompts[i]) + max(len(self.chosen[i]), len(self.rejected[i]))


def truncate(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int
) -> tuple[list[int], list[int], list[int]]:
    """Fit ``prompt + response`` into ``max_length`` for both responses.

    Policy: the prompt keeps its last ``max(max_length - longest response,
    max_length // 2)`` tokens (never fewer than it has), then each response
    keeps its first ``max_length - len(prompt)`` tokens.
    """
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected
    keep = max(max_length - longest, max_length // 2)
    prompt = prompt[-keep:] if len(prompt) > keep else prompt
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room]


def encode_pairs(pairs: Sequence[Pair], tokenizer, max_length: int) -> Encoded:
    """Tokenise pairs; count truncations and pairs dropped after truncation."""
    if max_length < 2:
        raise DataError(f"max sequence length must be at least 2, got {max_length}")
    eot = end_of_turn_id(tokenizer)
    out = Encoded([], [], [])
    for pair in pairs:
        prompt = encode_prompt(tokenizer, pair)
        if not prompt:
            raise DataError(f"{pair.where}: the prompt encodes to no tokens")
        chosen = [*tokenizer.encode(pair.chosen, add_special_tokens=False), eot]
        rejected = [*tokenizer.encode(pair.rejected, add_special_tokens=False), eot]
        p, c, r = truncate(prompt, chosen, rejected, max_length)
        if len(p) < len(prompt):
            out.report["prompt truncated"] += 1
        if len(c) < len(chosen) or len(r) < len(rejected):
            out.report["responses truncated"] += 1
        if c == r:
            out.report["identical after truncation"] += 1
            continue
        out.prompts.append(np.asarray(p, np.int32))
        out.chosen.append(np.asarray(c, np.int32))
        out.rejected.append(np.asarray(r, np.int32))
    if not out.prompts:
        raise DataError("no pairs left after tokenisation and truncation")
    return out


# --------------------------------------------------------------------------
# batching


def bucket(n: int, minimum: int = 16) -> int:
    """Round up so that the compiled step sees few distinct shapes: to a
    multiple of 16 below 64, above that to one of four sizes per octave (at
    most 25% padding)."""
    if n <= minimum:
        return minimum
    step = max(minimum, 1 << (n.bit_length() - 3))
    return -(-n // step) * step


@dataclass
class Batch:
    """``[chosen; rejected]`` sequences of ``pairs`` preference pairs, with
    their response positions packed into flat arrays.

    ``tokens[s]`` is prompt + response + padding (``T`` wide). Entry ``i`` of
    the flat arrays scores one response token: the hidden state that predicts
    it sits at ``index[i]`` of ``tokens`` flattened (row ``s`` times ``T`` plus
    position), the token is ``targets[i]``, the sequence is ``segments[i]``;
    ``mask[i]`` is false only on the padding that rounds the count up to a
    bucket. Prompt and padding positions are never in the flat arrays, so
    vocabulary-sized work is spent on response tokens only.
    """

    tokens: np.ndarray  # [S, T] int32, S = 2 * pairs
    index: np.ndarray  # [N] int32
    targets: np.ndarray  # [N] int32
    segments: np.ndarray  # [N] int32
    mask: np.ndarray  # [N] bool
    pairs: int
    real_tokens: int = 0  # prompt + response tokens, padding excluded

    @property
    def ntokens(self) -> int:
        return int(self.mask.sum())

    def arrays(self):
        import mlx.core as mx

        fields = (self.tokens, self.index, self.targets, self.segments, self.mask)
        return tuple(mx.array(x) for x in fields)


def collate(data: Encoded, indices: Sequence[int], pad_id: int = 0) -> Batch:
    """Pad pairs ``indices`` of ``data`` into one bucketed :class:`Batch`."""
    prompts = [data.prompts[i] for i in indices] * 2
    responses = [data.chosen[i] for i in indices] + [data.rejected[i] for i in indices]
    width = bucket(max(len(p) + len(r) for p, r in zip(prompts, responses)))
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    index, targets, segments = [], [], []
    for s, (p, r) in enumerate(zip(prompts, responses)):
        tokens[s, : len(p)] = p
        tokens[s, len(p) : len(p) + len(r)] = r
        index.append(s * width + len(p) - 1 + np.arange(len(r)))
        targets.append(r)
        segments.append(np.full(len(r), s))
    count = sum(len(r) for r in responses)
    size = bucket(count)
    mask = np.arange(size) < count
    index = np.concatenate([*index, np.zeros(size - count, np.int64)])
    targets = np.concatenate([*targets, np.zeros(size - count, np.int32)])
    segments = np.concatenate([*segments, np.zeros(size - count, np.int64)])
    real = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    return Batch(
        tokens,
        index.astype(np.int32),
        targets.astype(np.int32),
        segments.astype(np.int32),
        mask,
        len(indices),
        real,
    )


@dataclass
class SamplerState:
    """Where an epoch-ordered sampler stands: resumable from these two ints."""

    epoch: int = 0
    position: int = 0  # batches already taken in this epoch


class BatchSampler:
    """Length-sorted batches of ``batch_size`` pairs, shuffled per epoch.

    Pairs are sorted by length once and cut into consecutive batches (the last
    one may be smaller), so each epoch shows every pair exactly once; the
    order of batches is a permutation drawn from ``(seed, epoch)``.
    """

    def __init__(self, data: Encoded, batch_size: int, seed: int = 0, pad_id: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        order = sorted(range(len(data)), key=data.length)
        self.batches = [
            order[i : i + batch_size] for i in range(0, len(order), batch_size)
        ]
        self.data, self.seed, self.pad_id = data, seed, pad_id
        self.state = SamplerState()

    def __len__(self) -> int:
        return len(self.batches)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.batches))

    def __iter__(self) -> Iterator[Batch]:
        while True:
            order = self._order(self.state.epoch)
            while self.state.position < len(order):
                index = order[self.state.position]
                self.state.position += 1
                yield collate(self.data, self.batches[index], self.pad_id)
            self.state = SamplerState(self.state.epoch + 1, 0)

    def once(self) -> Iterator[Batch]:
        """Every batch once, in length order (for validation)."""
        for indices in self.batches:
            yield collate(self.data, indices, self.pad_id)


def epochs_to_iters(epochs: float, batches_per_epoch: int) -> int:
    return max(1, math.ceil(epochs * batches_per_epoch))
