"""Batched token generation: one prefill, then one compiled step per token.

Besides the model, mlx-lm's ``batch_generate`` spends in each CPU decode
step a log-softmax and a Gumbel draw (a uniform and two logs per vocabulary
entry) on one-thread kernels (~15% of a step for SmolLM2-135M at batch 32,
where the matrix products take most of the rest) and a host round trip per
token; and it prefills a prompt once per sample. Here, per batch:

* the distinct prompts are left-padded and prefilled in one call (a prompt
  sampled k times once), with logits at the last position only
  (:class:`rsa_mlx.tuner.model.ResponseLogits`'s head);
* the keys and values live in buffers of a fixed length (prompt + answer),
  so every decode step has the same shapes and one ``mx.compile`` trace
  serves them all: model, mask and sampler fused, the CPU ``exp`` of
  :mod:`rsa_mlx.ops.fastmath` in attention, SiLU and sampling;
* tokens are drawn by :func:`rsa_mlx.ops.sampling.sample` (one uniform per
  row) and stay on the device; the host looks for end-of-sequence tokens
  every :data:`CHECK_EVERY` steps;
* finished rows leave the batch once at most half of it still runs (as
  mlx-lm's do), so a batch of short refusals and long answers costs the
  long answers at a small batch, not at the full one.

Models whose cache is not mlx-lm's plain ``KVCache`` in every layer (sliding
windows, state-space layers) are not covered: :func:`supported` says so
and the caller falls back to mlx-lm.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.sample_utils import apply_top_p

from rsa_mlx.ops.fastmath import cpu_kernels
from rsa_mlx.ops.sampling import sample
from rsa_mlx.tuner.model import ResponseLogits

__all__ = ["CHECK_EVERY", "Decoder", "StaticCache", "supported"]

CHECK_EVERY = 8  # decode steps between host checks for end of sequence
ALIGN = 16  # prompt widths are rounded up to this: fewer distinct traces


def supported(model) -> bool:
    """Whether every layer's mlx-lm cache is a plain ``KVCache``."""
    try:
        caches = make_prompt_cache(model)
    except (AttributeError, TypeError):
        return False
    return bool(caches) and all(type(c) is KVCache for c in caches)


class StaticCache:
    """One layer's keys and values for a left-padded batch, in buffers of a
    fixed length ``L``, with mlx-lm's cache interface.

    ``pos``: the buffer index the next tokens go to (a scalar array, the
    same for every row); ``left``: [B] padding of each row. Row ``b``'s
    token at index ``j`` has position ``j - left[b]`` (RoPE's ``offset``).
    Query ``i`` (at index ``pos + i``) sees keys ``left[b] <= j <= pos + i``;
    a padding query sees itself too, so that no row of scores is empty.
    """

    def __init__(
        self, length: int, pos: mx.array, left: mx.array, keys=None, values=None
    ):
        self.length, self.pos, self.left = length, pos, left
        self.keys, self.values = keys, values

    @property
    def offset(self) -> mx.array:
        return self.pos - self.left

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self.keys is None:  # allocated on the first call, from its shapes
            b, h, _, dk = keys.shape
            self.keys = mx.zeros((b, h, self.length, dk), keys.dtype)
            self.values = mx.zeros((b, h, self.length, values.shape[-1]), values.dtype)
        start = self.pos.reshape(1)
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        return self.keys, self.values

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        if window_size is not None:
            raise ValueError("sliding-window attention is not supported here")
        cols = mx.arange(self.length)[None]
        rows = (self.pos + mx.arange(n))[:, None]
        seen = (cols <= rows)[None] & (cols >= self.left[:, None, None])
        return (seen | (cols == rows)[None])[:, None]  # [B, 1, n, L]


def _picker(temperature: float, top_p: float):
    """``logits, u -> tokens``: mlx-lm's top-p (on the log-softmax, before
    the temperature, as ``make_sampler``) when ``0 < top_p < 1``, then
    :func:`rsa_mlx.ops.sampling.sample`."""
    if temperature == 0 or not 0 < top_p < 1:
        return lambda logits, u: sample(logits, u, temperature)

    def pick(logits, u):
        logits = logits.astype(mx.float32)
        logprobs = apply_top_p(logits - mx.logsumexp(logits, -1, keepdims=True), top_p)
        return sample(logprobs, u, temperature)

    return pick


def _stops(tokens: mx.array, eos: mx.array) -> mx.array:
    return (tokens[:, None] == eos[None]).any(-1)


class Decoder:
    """Generation with one model and sampler: ``decoder(prompts)`` for
    each batch. The compiled step is kept between batches (a new trace per
    new batch shape), so it must not outlive changes to the weights."""

    def __init__(self, model, max_tokens: int, temperature: float, top_p: float, eos):
        self.model, self.max_tokens = model, max_tokens
        self.pick = _picker(temperature, top_p)
        self.eos = mx.array(sorted({int(e) for e in eos}) or [-1], mx.int32)
        self.logits = ResponseLogits(model)
        # The random state goes through the trace: a model left in training
        # mode (LoRA dropout) draws fresh masks each step, as it would eagerly.
        state = mx.random.state
        self.step = mx.compile(self._step, inputs=state, outputs=state)

    def _step(self, token, keys, values, pos, left, u, done):
        caches = [
            StaticCache(k.shape[2], pos, left, k, v) for k, v in zip(keys, values)
        ]
        with cpu_kernels():
            logits = self.model(token[:, None], cache=caches)[:, -1]
        nxt = self.pick(logits, u)
        done = done | _stops(nxt, self.eos)
        return nxt, [c.keys for c in caches], [c.values for c in caches], done

    def _prefill(self, tokens: mx.array, caches: list[StaticCache]) -> mx.array:
        with cpu_kernels():
            if self.logits.split:
                hidden = self.model.model(tokens, cache=caches)
                return self.logits.head(hidden[:, -1])
            return self.model(tokens, cache=caches)[:, -1]

    def _start(self, prompts: Sequence[Sequence[int]]):
        """Prefill: (width, last logits, keys, values, left padding), one row
        per prompt; a prompt sampled k times is prefilled once and its rows
        share the result."""
        unique: dict[tuple[int, ...], int] = {}
        row_of = mx.array([unique.setdefault(tuple(p), len(unique)) for p in prompts])
        width = -(-max(len(p) for p in unique) // ALIGN) * ALIGN
        tokens = np.zeros((len(unique), width), np.int32)
        for i, p in enumerate(unique):
            tokens[i, width - len(p) :] = p
        start = mx.array(0, mx.int32)
        pads = mx.array([width - len(p) for p in unique], mx.int32)
        length = width + self.max_tokens
        caches = [
            StaticCache(length, start, pads) for _ in make_prompt_cache(self.model)
        ]
        logits = self._prefill(mx.array(tokens), caches)[row_of]
        keys = [c.keys[row_of] for c in caches]
        values = [c.values[row_of] for c in caches]
        return width, logits, keys, values, pads[row_of]

    def __call__(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """The tokens generated after each prompt: up to ``max_tokens``,
        cut before the first end-of-sequence token (as mlx-lm's)."""
        rows, steps = len(prompts), self.max_tokens
        width, logits, keys, values, left = self._start(prompts)
        u = mx.random.uniform(shape=(steps, rows))  # one uniform per row and step
        token = self.pick(logits, u[0])
        done = _stops(token, self.eos)
        # Column t of ``out``: the token each prompt drew at step t. Rows are
        # dropped as they finish, so ``live`` maps batch rows to prompts; a
        # dropped row's later columns keep the fill, past its end anyway.
        out = np.full((rows, steps), int(np.array(self.eos)[0]), np.int64)
        live, pending, first = np.arange(rows), [token], 0
        mx.async_eval(token, done)
        for t in range(1, steps):
            pos = mx.array(width + t - 1, mx.int32)
            token, keys, values, done = self.step(
                token, keys, values, pos, left, u[t], done
            )
            pending.append(token)
            mx.async_eval(token, done)
            if t % CHECK_EVERY:
                continue
            first = _flush(out, live, first, pending)
            finished = np.array(done)
            if finished.all():
                break
            keep = _survivors(finished)
            if keep is not None:
                idx = mx.array(keep)
                token, done, left, u = token[idx], done[idx], left[idx], u[:, idx]
                keys, values = [k[idx] for k in keys], [v[idx] for v in values]
                live = live[keep]
        _flush(out, live, first, pending)
        return _cut(out, self.eos)


def _flush(out: np.ndarray, live: np.ndarray, first: int, pending: list) -> int:
    """Write the tokens drawn since the last flush (``pending``, one [B]
    array per step, batch row ``b`` answering prompt ``live[b]``) to
    ``out`` from column ``first``; empties ``pending``; the next column."""
    if pending:
        out[live, first : first + len(pending)] = np.array(mx.stack(pending, axis=1))
    first += len(pending)
    pending.clear()
    return first


def _survivors(finished: np.ndarray) -> np.ndarray | None:
    """The batch rows to keep once at most half of them still run: the
    running ones, padded with finished ones to a power of two (so a batch
    of B takes at most log2(B) + 1 shapes, each one trace); None to keep
    all."""
    running = np.flatnonzero(~finished)
    if len(running) > len(finished) // 2:
        return None
    size = 1 << (max(len(running), 1) - 1).bit_length()
    padding = np.flatnonzero(finished)[: size - len(running)]
    return np.sort(np.concatenate([running, padding]))


def _cut(tokens: np.ndarray, eos: mx.array) -> list[list[int]]:
    stop = set(np.array(eos).tolist())
    out = []
    for row in tokens.tolist():
        end = next((i for i, t in enumerate(row) if t in stop), len(row))
        out.append(row[:end])
    return out
