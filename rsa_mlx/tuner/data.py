"""Preference data (docs/method.md §5): tokenising and batching.

Reading and checking rows (the two row layouts, sources, one-line errors)
lives in :mod:`rsa_mlx.tuner.sources`; its public names are importable from here
too (:class:`Pair`, :class:`LoadReport`, :func:`load_pairs`,
:func:`parse_row`, :func:`resolve_source`, :class:`DataError`).

Tokenisation applies the chat template once to the prompt (with the
generation prompt) and appends the response tokens and the end-of-turn token
(not after a response the row marks truncated); the loss mask covers exactly
those appended tokens. Over-long pairs keep the
prompt's end and the responses' start (:func:`truncate`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from rsa_mlx.tuner.distributed import shard
from rsa_mlx.tuner.sources import (
    SPLITS,
    STAGES,
    LoadReport,
    Pair,
    load_pairs,
    parse_row,
    resolve_source,
)
from rsa_mlx.util.errors import DataError, InputError

__all__ = [
    "SPLITS",
    "STAGES",
    "Batch",
    "BatchSampler",
    "DataError",
    "Encoded",
    "LoadReport",
    "Pair",
    "SamplerState",
    "bucket",
    "collate",
    "encode_pairs",
    "encode_prompt",
    "end_of_turn_id",
    "epochs_to_iters",
    "load_pairs",
    "parse_row",
    "resolve_source",
    "truncate",
]


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
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # e.g. a template's raise_exception on the roles
            detail = str(e).strip().splitlines()
            raise DataError(
                f"{pair.where}: the tokenizer's chat template rejects this prompt "
                f"({detail[-1] if detail else type(e).__name__})"
            ) from None
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
    response ending with the end-of-turn token unless the row marks it
    truncated or :func:`truncate` cut it)."""

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


def _response(tokenizer, text: str, truncated: bool, eot: int) -> list[int]:
    """A response's tokens, then the end-of-turn token unless it was cut
    short (a model trained to stop where a generation limit cut would)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids if truncated else [*ids, eot]


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
        chosen = _response(tokenizer, pair.chosen, pair.chosen_truncated, eot)
        rejected = _response(tokenizer, pair.rejected, pair.rejected_truncated, eot)
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
    # Data-parallel runs only: world * pairs / the global batch's pairs, the
    # weight of this shard's mean gradient (see rsa_mlx.tuner.distributed).
    weight: float | None = None

    @property
    def ntokens(self) -> int:
        return int(self.mask.sum())

    def arrays(self):

        fields = (self.tokens, self.index, self.targets, self.segments, self.mask)
        arrays = tuple(mx.array(x) for x in fields)
        if self.weight is not None:
            arrays += (mx.array(self.weight, dtype=mx.float32),)
        return arrays


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

    In a data-parallel run (``world`` > 1) the batches and their order are
    the same on every rank and each rank yields its own shard of every
    batch (:func:`rsa_mlx.tuner.distributed.shard`), weighted by its share. A rank
    whose shard is empty (a last batch with fewer pairs than ranks) yields
    one pair of the batch with ``pairs == 0`` and weight 0, so that it still
    takes part in the step's all-reduce without contributing to it.
    """

    def __init__(
        self,
        data: Encoded,
        batch_size: int,
        seed: int = 0,
        pad_id: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        order = sorted(range(len(data)), key=data.length)
        self.batches = [
            order[i : i + batch_size] for i in range(0, len(order), batch_size)
        ]
        self.data, self.seed, self.pad_id = data, seed, pad_id
        self.rank, self.world = rank, world
        self.state = SamplerState()

    def collate(self, indices: Sequence[int]) -> Batch:
        """The batch of ``indices``, or this rank's shard of it."""
        if self.world == 1:
            return collate(self.data, indices, self.pad_id)

        part = shard(indices, self.rank, self.world)
        batch = collate(self.data, part or list(indices[:1]), self.pad_id)
        if not part:
            batch.pairs, batch.real_tokens = 0, 0
        batch.weight = self.world * len(part) / len(indices)
        return batch

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
                yield self.collate(self.batches[index])
            self.state = SamplerState(self.state.epoch + 1, 0)

    def once(self) -> Iterator[Batch]:
        """Every batch (or this rank's shard of it) once, in length order
        (for validation)."""
        for indices in self.batches:
            yield self.collate(indices)


def epochs_to_iters(epochs: float, batches_per_epoch: int) -> int:
    """Iterations for ``epochs``: ``max(1, ceil(epochs * batches_per_epoch))``."""
    return max(1, math.ceil(epochs * batches_per_epoch))
