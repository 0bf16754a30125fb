"""Token-level risk operators (docs/method.md §2) on MLX arrays.

At a response position t with reference distribution ``p = softmax(ref_logits)``
and policy ``q = softmax(policy_logits)``, the log-ratio of reference to policy
for each vocabulary entry v is the random variable (with v ~ p)::

    Z_t(v) = log p(v) - log q(v)

and the per-token risk ``Phi(Z_t)`` is one of

* ``kl``:        ``E_p[Z] = KL(p || q)`` (TDPO)
* ``cvar``:      the p-weighted mean of Z over its upper mu-fraction of mass,
                 ``min_eta eta + E_p[(Z - eta)_+] / mu``, exact including the
                 fractional share of the boundary entry (Ra-DPO)
* ``erm``:       ``(1/mu) log E_p[exp(mu Z)] = D_{1+mu}(p || q)`` (Rényi)
* ``truncated``: ``sum_{v: Z(v) > Q} p(v) Z(v)`` with Q the *unweighted*
                 (1-mu)-quantile of the V values Z(v) (linear interpolation, as
                 ``numpy.quantile``). Offered only to reproduce the released
                 Ra-DPO code; it is not a coherent risk measure.

Implementation notes (all measured on MLX 0.32 CPU, see docs/benchmarks.md):

* Every risk has the gradient ``dPhi/dlogits_q = s * q - w`` where ``w`` is the
  risk's tilted distribution (``p`` for kl; the CVaR envelope weights; the ERM
  tilt ``softmax(log p + mu Z)``; ``p * 1[Z > Q]`` for truncated) and
  ``s = sum(w)``. One custom VJP therefore serves all measures and the
  log-ratio at the targets, and the backward is one pass over the vocabulary.
  The CVaR/truncated threshold is a constant in the backward (stop-gradient).
* CVaR's threshold is found exactly, without sorting the vocabulary, by
  bisection over the 2^32 float32 values in the order of their uint32 keys
  (computed once per row, compared as integers): 32 masked sums, about 40 ns per entry on this CPU against ~85 for a sort
  and ~70 for a two-round radix select with scatter-add histograms.
* MLX's CPU reductions accumulate in float32 along the axis (relative error
  ~2e-4 at V = 152k), so sums over the vocabulary are two-level: blocks of
  about sqrt(V) entries, then the block sums.
* Positions are processed in chunks of rows, forced to run one after another
  with ``mx.depends``, so temporaries stay at chunk size. On the CPU the
  chunks alternate between one stream per core: MLX runs a stream's
  element-wise kernels on one thread, so this is up to cores-x faster.
* Logits are clipped to ``[-1e30, 1e30]``: a ``-inf`` reference logit becomes
  an exact zero probability that contributes 0 (never NaN).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import mlx.core as mx

from rsa_mlx.ops.kernels import Plan, block_plan, make_op
from rsa_mlx.util.errors import InputError

Measure = Literal["kl", "cvar", "erm", "truncated"]
__all__ = [
    "DEFAULT_MEASURE",
    "DEFAULT_MU",
    "MEASURES",
    "SequenceStats",
    "TokenStats",
    "resolve_mu",
    "segment_stats",
    "sequence_stats",
    "token_risk",
    "token_stats",
]

MEASURES: tuple[str, ...] = ("kl", "cvar", "erm", "truncated")
DEFAULT_MEASURE = "cvar"  # RSA's
# docs/method.md §3 defaults (Ra-DPO): cvar mu = 0.95, erm mu = 5.
DEFAULT_MU: dict[str, float | None] = {
    "kl": None,
    "cvar": 0.95,
    "erm": 5.0,
    "truncated": 0.95,
}

# The smallest CVaR level: mu * P (P ~ 1, the reference mass) and 1 / (mu * P)
# must stay normal float32 numbers. Down to it CVaR is exact; at tiny mu it is
# the largest Z over the reference support.
MIN_CVAR_MU = 1e-30
_CHUNK_ELEMS = 1 << 20  # about 4 MB of float32 per temporary per chunk ...
_CHUNK_MIN_ROWS = 16  # ... but at least this many rows: fewer, larger kernels


def resolve_mu(measure: str, mu: float | None) -> float | None:
    """Check ``measure`` and ``mu``; return mu or the measure's default.

    Levels: cvar ``MIN_CVAR_MU <= mu <= 1`` (1e-30), truncated ``0 < mu <= 1``,
    erm ``0 < mu < inf``; kl takes none (returns None). Raises
    :class:`~rsa_mlx.util.errors.InputError` (a ``ValueError``) otherwise.
    """
    if measure not in MEASURES:
        raise InputError(f"unknown risk measure {measure!r}; choose from {MEASURES}")
    if measure == "kl":
        return None
    mu = DEFAULT_MU[measure] if mu is None else float(mu)
    if measure in ("cvar", "truncated") and not 0.0 < mu <= 1.0:
        raise InputError(f"{measure} needs 0 < mu <= 1, got {mu}")
    if measure == "cvar" and mu < MIN_CVAR_MU:
        raise InputError(
            f"cvar mu {mu} is below the smallest supported level {MIN_CVAR_MU:g} "
            "(CVaR there is already the largest log-ratio)"
        )
    if measure == "erm" and not (mu > 0.0 and math.isfinite(mu)):
        raise InputError(f"erm needs a finite mu > 0, got {mu}")
    return mu


class TokenStats(NamedTuple):
    """Per-position statistics, each of shape ``logits.shape[:-1]``."""

    logratio: mx.array  # log q(y_t) - log p(y_t)
    kl: mx.array  # KL(p || q); monitoring only (no gradient)
    risk: mx.array  # Phi(Z_t); differentiable w.r.t. the policy logits
    logprob: mx.array  # log q(y_t); differentiable (the NLL term's)


def token_stats(
    policy_logits: mx.array,
    ref_logits: mx.array,
    targets: mx.array,
    measure: Measure = "kl",
    mu: float | None = None,
    chunk_size: int | None = None,
    risk_grad: bool = True,
) -> TokenStats:
    """Log-ratio at the targets, KL and risk at every position, in one pass.

    For each position t (all leading axes), with ``p = softmax(ref_logits)``,
    ``q = softmax(policy_logits)`` and ``Z = log p - log q``::

        logratio_t = log q(y_t) - log p(y_t)
        kl_t       = sum_v p(v) Z(v)
        risk_t     = Phi(Z_t)            (see the module docstring)
        logprob_t  = log q(y_t)

    Computed in float32 whatever the input dtype. Gradients flow to
    ``policy_logits`` only, through ``logratio``, ``risk`` and ``logprob``
    (whose gradient is the log-ratio's: no extra vocabulary pass); ``kl`` is
    returned under ``stop_gradient`` (use ``measure="kl"`` to train on it).

    Args:
        policy_logits: ``[..., V]`` policy logits.
        ref_logits: ``[..., V]`` reference logits (treated as constants).
        targets: ``[...]`` integer token ids in ``[0, V)``.
        measure: ``"kl"``, ``"cvar"``, ``"erm"`` or ``"truncated"``.
        mu: level (cvar/truncated: ``0 < mu <= 1``; erm: ``mu > 0``);
            ``None`` takes the default (0.95, 5.0, 0.95).
        chunk_size: rows (positions) per chunk; default: about 4 MB per
            temporary, and at least 16 rows.
        risk_grad: False when ``risk`` is only monitored (plain DPO): it is
            then returned under ``stop_gradient`` and the backward skips it.
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy and reference logits differ in shape: "
            f"{policy_logits.shape} vs {ref_logits.shape}"
        )
    if targets.shape != policy_logits.shape[:-1]:
        raise ValueError(
            f"targets shape {targets.shape} does not match logits "
            f"{policy_logits.shape[:-1]}"
        )
    mu = resolve_mu(measure, mu)
    lead, vocab = policy_logits.shape[:-1], policy_logits.shape[-1]
    block, width = block_plan(vocab)
    a = policy_logits.reshape(-1, vocab).astype(mx.float32)
    b = ref_logits.reshape(-1, vocab).astype(mx.float32)
    y = targets.reshape(-1).astype(mx.int32)
    if width > vocab:
        pad = [(0, 0), (0, width - vocab)]
        a = mx.pad(a, pad, constant_values=-mx.inf)
        b = mx.pad(b, pad, constant_values=-mx.inf)
    chunk = chunk_size or max(_CHUNK_MIN_ROWS, _CHUNK_ELEMS // width)
    plan = Plan(measure, mu, vocab, block, int(chunk), risk_grad)
    outputs = make_op(plan)(a, mx.stop_gradient(b), y)
    logratio, kl, risk, logprob = *outputs[:3], outputs[-1]
    if not risk_grad:
        risk = mx.stop_gradient(risk)
    return TokenStats(
        logratio.reshape(lead),
        mx.stop_gradient(kl).reshape(lead),
        risk.reshape(lead),
        logprob.reshape(lead),
    )


def token_risk(
    policy_logits: mx.array,
    ref_logits: mx.array,
    measure: Measure = "kl",
    mu: float | None = None,
) -> mx.array:
    """Per-position risk ``Phi(Z_t)``, shape ``logits.shape[:-1]``.

    ``Z_t(v) = log p(v) - log q(v)`` with ``p = softmax(ref_logits)``,
    ``q = softmax(policy_logits)``; see :func:`token_stats` and the module
    docstring for the measures. Gradients flow to ``policy_logits`` only.
    """
    targets = mx.zeros(policy_logits.shape[:-1], dtype=mx.int32)
    return token_stats(policy_logits, ref_logits, targets, measure, mu).risk


class SequenceStats(NamedTuple):
    """Per-sequence sums over response positions, each of shape ``[B]``."""

    logratio: mx.array  # m(x, y) = sum_t log q(y_t) - log p(y_t)
    kl: mx.array  # sequential KL, sum_t KL(p_t || q_t) (monitoring)
    risk: mx.array  # D(x, y) = sum_t Phi(Z_t)
    ntokens: mx.array  # number of response positions
    logprob: mx.array  # log pi(y | x) = sum_t log q(y_t), never normalised


def segment_stats(
    policy_logits: mx.array,
    ref_logits: mx.array,
    targets: mx.array,
    segments: mx.array,
    mask: mx.array,
    num_segments: int,
    measure: Measure = "kl",
    mu: float | None = None,
    length_normalize: bool = False,
    chunk_size: int | None = None,
    risk_grad: bool = True,
) -> SequenceStats:
    """Per-sequence sums over a flat list of scored positions.

    Position ``i`` (a row of the ``[N, V]`` logits) belongs to sequence
    ``segments[i]`` and counts only where ``mask[i]``::

        m_s = sum_{i: seg_i = s, M_i} [log q(y_i) - log p(y_i)]
        KL_s = sum_{i: seg_i = s, M_i} KL(p_i || q_i)
        D_s = sum_{i: seg_i = s, M_i} Phi(Z_i)
        logprob_s = sum_{i: seg_i = s, M_i} log q(y_i)   (never normalised)

    This is the layout the trainer uses: the response positions of a whole
    batch packed together, so no vocabulary-sized work is spent on padding.
    """
    stats = token_stats(
        policy_logits, ref_logits, targets, measure, mu, chunk_size, risk_grad
    )
    keep = mask.astype(mx.bool_)
    member = (segments[:, None] == mx.arange(num_segments)[None, :]) & keep[:, None]
    weights = member.astype(mx.float32)  # [N, S]
    ntokens = member.sum(0)

    def total(x, normalize=length_normalize):
        s = mx.where(keep, x, 0.0) @ weights
        return s / mx.maximum(ntokens, 1) if normalize else s

    return SequenceStats(
        total(stats.logratio),
        total(stats.kl),
        total(stats.risk),
        ntokens,
        total(stats.logprob, normalize=False),
    )


def sequence_stats(
    policy_logits: mx.array,
    ref_logits: mx.array,
    targets: mx.array,
    mask: mx.array,
    measure: Measure = "kl",
    mu: float | None = None,
    length_normalize: bool = False,
    chunk_size: int | None = None,
    risk_grad: bool = True,
) -> SequenceStats:
    """Sequence log-ratio ``m``, sequential KL and sequential risk ``D``.

    With ``M_t`` the response mask (1 on response positions only)::

        m(x, y) = sum_t M_t [log q(y_t) - log p(y_t)]
        KL(x, y) = sum_t M_t KL(p_t || q_t)
        D(x, y) = sum_t M_t Phi(Z_t)

    Positions outside the mask contribute exactly 0 whatever their logits.
    With ``length_normalize`` each sum is divided by the sequence's number of
    response tokens. :func:`segment_stats` is the same on packed positions.

    Args:
        policy_logits, ref_logits: ``[B, T, V]``.
        targets: ``[B, T]`` the token predicted at each position.
        mask: ``[B, T]`` bool or 0/1 response mask.
    """
    B, T, V = policy_logits.shape
    segments = mx.repeat(mx.arange(B), T)
    return segment_stats(
        policy_logits.reshape(B * T, V),
        ref_logits.reshape(B * T, V),
        targets.reshape(-1),
        segments,
        mask.reshape(-1),
        B,
        measure,
        mu,
        length_normalize,
        chunk_size,
        risk_grad,
    )
