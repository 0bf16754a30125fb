"""Model quantities on prompts: K sampled responses per prompt (batched
generation, seeded) with the token ids sampled, and teacher-forced
log-probabilities of given responses.

Generation is :mod:`rsa_mlx.eval.decode` (``impl="fast"``, the default;
1.3-2x the tokens/s of mlx-lm's on a 2-core CPU at batch 32, where the
model's matrix products bound both: docs/benchmarks.md "Sampling") or
mlx-lm's ``batch_generate`` (``impl="mlx_lm"``, also used for models the
fast path does not cover). Both sample ``softmax(logits / T)`` (after
top-p) and stop at the tokenizer's end-of-sequence tokens; with the same
seed they draw different (equally distributed) samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import batch_generate
from mlx_lm.sample_utils import make_sampler

from rsa_mlx.eval import decode
from rsa_mlx.eval.prompts import PromptRecord, prompt_ids
from rsa_mlx.util import progress
from rsa_mlx.util.errors import InputError

__all__ = [
    "check_context",
    "check_sampling",
    "sample_responses",
    "sample_with_ids",
    "sequence_logprobs",
]

IMPLS = ("fast", "mlx_lm")


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
    impl: str = "fast",
) -> list[list[str]]:
    """``k`` sampled responses per prompt, generated in batches.

    The ``len(records) * k`` generations run in batches of ``batch_size``
    (progress is shown per batch). The random state is seeded once, so the
    same seed gives the same samples. A ``prefix`` is put at the start of
    every response (after the chat template's generation prompt) and the
    model continues it; the returned texts start with it. ``impl``:
    ``"fast"`` (:mod:`rsa_mlx.eval.decode`) or ``"mlx_lm"``
    (``batch_generate``).
    """
    return sample_with_ids(
        model, tokenizer, records, k, max_tokens, temperature, top_p, seed,
        batch_size, label, prefix, impl,
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
    impl: str = "fast",
) -> tuple[list[list[str]], list[list[tuple[list[int], list[int]]]]]:
    """:func:`sample_responses`, also returning the token ids sampled.

    Returns ``(texts, ids)``: ``ids[i][j] = (prompt_ids, response_ids)`` for
    ``texts[i][j]``; the prompt ids are those the model was given (the
    prefix's tokens included), the response ids those it generated (without
    the end-of-sequence token that stopped it).
    """
    check_sampling(k=k, max_tokens=max_tokens, temperature=temperature)
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, not {batch_size}")
    if impl not in IMPLS:
        raise InputError(f"impl must be one of {', '.join(IMPLS)}, not {impl!r}")
    mx.random.seed(seed)
    start_ids = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
    ids = [prompt_ids(tokenizer, r) + list(start_ids) for r in records]
    check_context(model, records, ids, max_tokens)
    flat = [p for p in ids for _ in range(k)]
    if impl == "fast" and decode.supported(model):
        eos = tokenizer.eos_token_ids
        run = decode.Decoder(model, max_tokens, temperature, top_p, eos)
    else:
        run = _mlx_lm_batch(
            model, tokenizer, max_tokens, temperature, top_p, batch_size
        )
    generated: list[list[int]] = []
    with progress.task(label, len(flat), "responses") as bar:
        for start in range(0, len(flat), batch_size):
            batch = flat[start : start + batch_size]
            generated.extend(run(batch))
            bar.advance(len(batch))
    texts = [prefix + tokenizer.decode(r) for r in generated]
    pairs = [(list(p), r) for p, r in zip(flat, generated)]
    return (
        [texts[i * k : (i + 1) * k] for i in range(len(records))],
        [pairs[i * k : (i + 1) * k] for i in range(len(records))],
    )


def _mlx_lm_batch(model, tokenizer, max_tokens, temperature, top_p, batch_size):
    """``prompts -> generated ids`` by mlx-lm's ``batch_generate``."""
    sampler = make_sampler(temp=temperature, top_p=top_p)

    def run(batch):
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
        return [[int(t) for t in ids] for ids in result.token_ids]

    return run


def context_length(model) -> int | None:
    """The longest sequence the model was built for (its config's
    ``max_position_embeddings``), or None when it does not say."""
    n = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_context(
    model, records: Sequence[PromptRecord], ids: Sequence[list], max_tokens: int
) -> None:
    """Refuse, before any sampling, a prompt whose tokens and the
    ``max_tokens`` of its answer do not fit in the model's context."""
    context = context_length(model)
    if context is None:
        return
    for i, (record, tokens) in enumerate(zip(records, ids)):
        if len(tokens) + max_tokens > context:
            raise InputError(
                f"{record.location(i)}: the prompt is {len(tokens)} tokens and "
                f"its answer up to {max_tokens} (--max-tokens), more than the "
                f"model's context of {context} tokens (max_position_embeddings); "
                "shorten the prompt or lower --max-tokens"
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
