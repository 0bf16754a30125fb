"""Model shift (docs/method.md §6): how far a policy moved from its base (SFT) model.

The paper's own quantity. On given responses y to prompts x (in
``rsa-mlx evaluate``: the policy's own samples), at every response position
t, with ``q = pi_theta(.|x, y_<t)`` and ``p = pi_ref(.|x, y_<t)``:

* the exact per-token KL over the whole vocabulary,
  ``KL_t = sum_v q(v) (log q(v) - log p(v))`` (terms with ``q(v) = 0`` are 0);
* the log-ratio of the realised token, ``r_t = log q(y_t) - log p(y_t)``.

:func:`model_shift` reports the mean of ``KL_t`` over all response tokens,
the mean of ``r_t`` (on the policy's own samples an unbiased, noisier
estimate of the same KL), and the tails of both: ``CVaR_mu``, the mean of
the worst (largest) ``1 - mu`` fraction of the tokens' values, with
:func:`rsa_mlx.eval.evaluate.cvar`'s convention (``mu = 0.9``, docs/method.md §6: the
worst 10%).
Note that this ``mu`` is a quantile level as in the evaluation's cost
CVaR, not the kept-mass fraction ``mu`` of the training regulariser
(docs/method.md §2), where ``mu = 1`` is the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import mlx.core as mx
import numpy as np

from rsa_mlx.eval.metrics import cvar
from rsa_mlx.eval.prompts import prompt_ids
from rsa_mlx.eval.sampling import sequence_logprobs
from rsa_mlx.tuner.model import ResponseLogits
from rsa_mlx.util import progress
from rsa_mlx.util.errors import InputError

__all__ = ["model_shift", "shift_and_fluency", "token_shift"]


def _log_softmax(logits: mx.array) -> mx.array:
    x = logits.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def token_shift(
    logits: mx.array, ref_logits: mx.array, targets: mx.array
) -> tuple[mx.array, mx.array]:
    """Per-position KL and realised-token log-ratio between two models.

    ``logits`` (policy, ``pi_theta``) and ``ref_logits`` (reference,
    ``pi_ref``) have shape ``(..., V)``; ``targets`` (the realised tokens)
    has shape ``(...)``. Returns float32 arrays of shape ``(...)``:

    * ``kl = sum_v q(v) (log q(v) - log p(v))`` with ``log q``, ``log p`` the
      float32 log-softmax of the two logits; entries where ``q(v) = 0``
      (``-inf`` logits, or underflow) contribute exactly 0, whatever
      ``p(v)``; a ``q(v) > 0`` where ``p(v) = 0`` gives ``+inf``, as it
      should. Clamped at 0 from below (float rounding only).
    * ``log_ratio = log q(y) - log p(y)`` at ``y = targets``.
    """
    kl, log_ratio, _ = _token_terms(logits, ref_logits, targets)
    return kl, log_ratio


def _token_terms(logits, ref_logits, targets):
    """:func:`token_shift`'s two arrays and ``log p(y)``, the reference's
    log-probability of the realised token."""
    logq = _log_softmax(logits)
    logp = _log_softmax(ref_logits)
    q = mx.exp(logq)
    terms = mx.where(q > 0, q * (logq - logp), mx.zeros_like(q))
    kl = mx.maximum(terms.sum(axis=-1), 0.0)
    picked = targets.astype(mx.int32)[..., None]
    ref_logp = mx.take_along_axis(logp, picked, axis=-1)[..., 0]
    log_ratio = mx.take_along_axis(logq, picked, axis=-1)[..., 0] - ref_logp
    return kl, log_ratio, ref_logp


def _self_terms(logits, targets):
    """:func:`_token_terms` of a model against itself: KL and log-ratio are
    exactly 0, and only ``log p(y)`` needs the log-softmax."""
    picked = targets.astype(mx.int32)[..., None]
    ref_logp = mx.take_along_axis(_log_softmax(logits), picked, axis=-1)[..., 0]
    zeros = mx.zeros_like(ref_logp)
    return zeros, zeros, ref_logp


def _check_vocab(logits, ref_logits) -> None:
    if logits.shape[-1] != ref_logits.shape[-1]:
        raise InputError(
            f"the reference model has {ref_logits.shape[-1]} logits per "
            f"token and the model {logits.shape[-1]}: they must share "
            "a tokenizer"
        )


@contextmanager
def _eval_mode(*models):
    """Put the models in eval mode, restoring their modes afterwards."""
    modes = [getattr(m, "training", False) for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _response_batch(prompts: Sequence, responses: Sequence):
    """Right-padded inputs, and the flat positions predicting response tokens.

    Returns ``inputs`` (rows x width-1), ``targets`` (the same shape) and
    ``index``: flat positions ``row * (width-1) + column`` where the input
    prefix ends just before a response token.
    """
    plen = np.array([len(p) for p in prompts], np.int64)
    rlen = np.array([len(r) for r in responses], np.int64)
    width = int((plen + rlen).max())
    tokens = np.zeros((len(prompts), max(width, 2)), np.int32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, : plen[i] + rlen[i]] = np.concatenate(
            [np.asarray(p, np.int64), np.asarray(r, np.int64)]
        )
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    column = np.arange(inputs.shape[1])[None, :]
    # position c predicts token c + 1: a response token when
    # plen <= c + 1 < plen + rlen
    mask = (column >= plen[:, None] - 1) & (column < (plen + rlen)[:, None] - 1)
    index = np.flatnonzero(mask.reshape(-1))
    return inputs, targets, index


def model_shift(
    model,
    reference,
    tokenizer,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    mu: float = 0.9,
    batch_size: int = 8,
    *,
    label: str | None = None,
) -> dict:
    """Teacher-forced shift of ``model`` from ``reference`` on given responses.

    Args:
        model: the policy (an mlx-lm model).
        reference: the base/SFT model, a separate model object with the same
            tokenizer (``model is reference`` gives exactly 0).
        tokenizer: unused (the sequences are token ids; may be None); kept
            so callers can pass what they have.
        sequences: ``(prompt_ids, response_ids)`` pairs. Only positions that
            predict response tokens are scored: prompt positions and padding
            never are; a response of length 0 contributes nothing. A prompt
            must have at least one token.
        mu: CVaR level of the upper tails, in [0, 1]
            (:func:`rsa_mlx.eval.evaluate.cvar`: the mean of the worst ``1 - mu``
            fraction of tokens; ``mu = 0`` is the mean, 1 the maximum).
        batch_size: sequences per forward pass (right-padded).
        label: when given, a progress bar with this description.

    Returns ``{"kl_mean", "logratio_cvar", "kl_cvar", "logratio_mean", "tokens",
    "mu"}``: the mean per-token KL(pi_theta || pi_ref); ``logratio_cvar``, the
    CVaR_mu of the per-token log-ratio ``log pi_theta(y_t) - log
    pi_ref(y_t)``; ``kl_cvar``, the CVaR_mu of the per-token KL itself; the
    mean log-ratio; the number of response tokens scored; and ``mu``. With
    no response tokens at all the four values are None.

    Both models run in eval mode (their modes are restored), no gradients.
    """
    return shift_and_fluency(model, reference, sequences, mu, batch_size, label)[0]


def shift_and_fluency(
    model,
    reference,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    mu: float = 0.9,
    batch_size: int = 8,
    label: str | None = None,
) -> tuple[dict, list[float]]:
    """:func:`model_shift`'s summary and, from the same forward passes, each
    response's fluency under the reference: ``mean_t log p(y_t)`` over its
    tokens (NaN for an empty response), as :func:`fluency` gives for the
    response's text. One pass of the reference serves both."""
    _check_shift(sequences, mu, batch_size)
    # only sequences with a response need a forward pass
    todo = [(list(p), list(r)) for p, r in sequences if len(r) > 0]
    bar_context = (
        progress.task(label, len(todo), "responses")
        if label
        else nullcontext(SimpleNamespace(advance=lambda n=1: None))
    )
    with _eval_mode(model, reference), bar_context as bar:
        kl, ratio, ref_logp = _token_shifts(model, reference, todo, batch_size, bar)
    sums = np.add.reduceat(ref_logp, _starts(todo)) if len(todo) else []
    means = iter(float(total / len(r)) for total, (_, r) in zip(sums, todo))
    logps = [next(means) if len(r) > 0 else float("nan") for _, r in sequences]
    return shift_stats(kl, ratio, mu), logps


def _starts(todo: list) -> np.ndarray:
    """Offsets of each response's first token in the flat per-token arrays."""
    return np.cumsum([0] + [len(r) for _, r in todo[:-1]])


def _check_shift(sequences: Sequence, mu: float, batch_size: int) -> None:
    if not 0.0 <= mu <= 1.0 or math.isnan(mu):
        raise InputError(f"the shift's CVaR level mu must be in [0, 1], not {mu}")
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, not {batch_size}")
    for i, (p, _) in enumerate(sequences):
        if len(p) == 0:
            raise InputError(f"sequence {i + 1}: the prompt has no tokens")


def _token_shifts(model, reference, todo: list, batch_size: int, bar):
    """Per-token KL, log-ratio and reference log-probability over every
    response token of ``todo``, as three float64 arrays in order."""
    same = model is reference
    policy = ResponseLogits(model)
    base = policy if same else ResponseLogits(reference)  # one vocab check
    kls, ratios, ref_logps = [], [], []
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        inputs, targets, index = _response_batch(
            [p for p, _ in chunk], [r for _, r in chunk]
        )
        tokens, where = mx.array(inputs), mx.array(index.astype(np.int32))
        logits = policy(tokens, where)
        picked = mx.array(targets.reshape(-1)[index])
        if same:  # a model against itself: no KL to compute, one pass
            kl, ratio, ref_logp = _self_terms(logits, picked)
        else:
            ref_logits = base(tokens, where)
            _check_vocab(logits, ref_logits)
            kl, ratio, ref_logp = _token_terms(logits, ref_logits, picked)
        mx.eval(kl, ratio, ref_logp)
        kls.append(np.array(kl, np.float64))
        ratios.append(np.array(ratio, np.float64))
        ref_logps.append(np.array(ref_logp, np.float64))
        bar.advance(len(chunk))
    if not kls:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return np.concatenate(kls), np.concatenate(ratios), np.concatenate(ref_logps)


def shift_stats(kl: np.ndarray, ratio: np.ndarray, mu: float) -> dict:
    """:func:`model_shift`'s summary of the per-token KL and log-ratio (None
    for each value when there are no tokens)."""
    if kl.size == 0:
        return {
            "kl_mean": None,
            "logratio_cvar": None,
            "kl_cvar": None,
            "logratio_mean": None,
            "tokens": 0,
            "mu": mu,
        }
    return {
        "kl_mean": float(kl.mean()),
        "logratio_cvar": cvar(ratio, mu),
        "kl_cvar": cvar(kl, mu),
        "logratio_mean": float(ratio.mean()),
        "tokens": int(kl.size),
        "mu": mu,
    }


# Mean log-probability per token under the base model below which a response
# is degenerate. Measured on SmolLM2-135M: its own samples have a median of
# -1.6 (5th percentile -2.4); a collapsed fine-tune's word salad -4.9 to -5.6.
DEGENERATE_LOGPROB = -4.0


def fluency(model, tokenizer, records, answers) -> list[list[float]]:
    """Mean log-probability per token of each answer under ``model``."""
    prompts, responses, where = [], [], []
    for i, (record, texts) in enumerate(zip(records, answers)):
        ids = prompt_ids(tokenizer, record)
        for j, text in enumerate(texts):
            tokens = tokenizer.encode(text, add_special_tokens=False)
            if tokens:
                prompts.append(ids)
                responses.append(tokens)
                where.append((i, j))
    out = [[float("nan")] * len(t) for t in answers]
    if prompts:
        totals = sequence_logprobs(model, prompts, responses, batch_size=32)
        for (i, j), total, tokens in zip(where, totals, responses):
            out[i][j] = float(total / len(tokens))
    return out
