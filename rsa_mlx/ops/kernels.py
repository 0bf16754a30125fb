"""Kernels of the token-level risk operators (see :mod:`rsa_mlx.ops.risk`).

The row work behind :func:`rsa_mlx.ops.risk.token_stats`: float32 log-softmax
with two-level sums, the exact CVaR boundary by bisection, the forward and
backward of every measure for one chunk of rows, and the custom-VJP op that
runs the chunks on per-core streams. The design notes are in the docstring
of :mod:`rsa_mlx.ops.risk`.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from functools import lru_cache
from typing import NamedTuple

import mlx.core as mx

from rsa_mlx.ops.fastmath import exp as _exp

_BIG = 1e30
_INT_MIN = -(2**31)
_ERM_EXPM1_MAX = 80.0  # expm1(80) * 1 < float32 max, so no overflow below it


def block_plan(V: int) -> tuple[int, int]:
    """Block size and padded width for two-level sums over V entries."""
    if V <= 256:
        return V, V
    root = math.isqrt(V)
    divisors = [b for b in range(max(16, root // 4), 4 * root + 1) if V % b == 0]
    if divisors:
        return min(divisors, key=lambda b: abs(b - root)), V
    block = 1 << round(math.log2(root))
    return block, -(-V // block) * block


def bsum(x: mx.array, block: int) -> mx.array:
    """Row sums ``[c, W] -> [c, 1]`` summed block-wise for float32 accuracy."""
    c, width = x.shape
    if block == width:
        return x.sum(-1, keepdims=True)
    return x.reshape(c, width // block, block).sum(-1).sum(-1, keepdims=True)


def _logsumexp(x: mx.array, block: int) -> mx.array:
    m = x.max(-1, keepdims=True)
    return m + mx.log(bsum(_exp(x - m), block))


def _log_softmax(x: mx.array, block: int) -> tuple[mx.array, mx.array, mx.array]:
    """``log softmax(x)`` as ``(x - max) - log1p(sum' exp(x - max))``, the
    shift, and ``exp(x - max)``.

    Keeping the max apart makes each entry's rounding error proportional to
    its own |log-probability|, instead of adding the rounding of the full
    logsumexp to every entry. ``sum'`` leaves out one maximal entry (its
    term is exactly 1), so a confident row (top probability 1 - 1e-6) keeps
    its top log-probability to float32 precision; ``log(1 + 1e-6)`` would
    lose a few percent of it. ``exp(x - max)`` is returned so that the
    caller gets the probabilities without a second ``exp`` over the row
    (an ``exp`` is the costliest pass: ~2.4 ns per entry with the CPU
    polynomial of :mod:`rsa_mlx.ops.fastmath`, ~12 ns with MLX's own).
    """
    m = x.max(-1, keepdims=True)
    shifted = x - m
    e = _exp(shifted)
    # Masks multiply rather than mx.where: 4x cheaper on the CPU.
    rest = bsum(e * (shifted < 0), block)
    rest = rest + (bsum((shifted == 0).astype(mx.float32), block) - 1.0)
    log_s = mx.log1p(rest)
    return shifted - log_s, mx.concatenate([m, log_s], axis=-1), e


def _apply_norm(x: mx.array, norm: mx.array) -> mx.array:
    """Recompute ``log softmax(x)`` from the ``[c, 2]`` (max, log-sum) pair."""
    return (x - norm[:, :1]) - norm[:, 1:]


def _take(x: mx.array, idx: mx.array) -> mx.array:
    return mx.take_along_axis(x, idx, axis=-1)


def _order_key(x: mx.array) -> mx.array:
    """The uint32 order key of float32 ``x``, so that keys and floats sort
    alike (``-0.0`` just below ``+0.0``, NaNs above ``+inf``): the bits
    ``b ^ 0x80000000`` of a non-negative float, ``~b`` of a negative one."""
    bits = mx.view(x, mx.int32)
    return mx.view(bits ^ ((bits >> 31) | _INT_MIN), mx.uint32)


def _key_value(key: mx.array) -> mx.array:
    """The float32 whose order key is ``key`` (uint32): the inverse of
    :func:`_order_key` (the key's top bit is set for non-negative floats)."""
    bits = mx.view(key, mx.int32)
    return mx.view(bits ^ (((bits >> 31) ^ -1) | _INT_MIN), mx.float32)


def _cvar_boundary(z, p, mass, mu, block):
    """The boundary value ``z*``: the largest t with ``mass(Z >= t) >= mu P``.

    Exact bisection over the 2^32 float32 values in key order: the order
    keys of the row are computed once, then 32 steps of one integer compare
    and one masked sum each (fused by ``mx.compile``), no sort and no
    histogram. Comparing keys rather than floats saves turning each
    candidate back into a float and ~25% of the time.

    The test sums the smaller side, so that it rounds like that small mass:
    for ``mu > 1/2`` the mass *below* t, ``mass(Z < t) <= (1 - mu) P`` (at
    mu = 1 the test is ``mass(Z < t) <= 0``, exact however light the lowest
    entries are); for ``mu <= 1/2`` the mass above, ``mass(Z >= t) >= mu P``
    (``(1 - mu) P`` rounds to ``P`` in float32 for mu below ~6e-8).
    """
    upper = mu <= 0.5
    bound = mu * mass if upper else (1.0 - mu) * mass
    keys = _order_key(z)
    lo = mx.zeros((z.shape[0], 1), mx.uint32)
    hi = mx.full((z.shape[0], 1), 0xFFFFFFFF, mx.uint32)
    for _ in range(32):
        mid = lo + ((hi - lo) >> 1) + ((hi - lo) & 1)  # upper middle: > lo
        if upper:
            ok = bsum(p * (keys >= mid), block) >= bound
        else:
            ok = bsum(p * (keys < mid), block) <= bound
        lo, hi = mx.where(ok, mid, lo), mx.where(ok, hi, mid - 1)
    return _key_value(lo)


def _cvar_weights(z, p, z_star, c_above, c_at):
    """CVaR envelope weights: ``p/(mu P)`` above the boundary value, its
    fractional share at it, 0 below."""
    return p * ((z > z_star) * c_above + (z == z_star) * c_at)


class Plan(NamedTuple):
    measure: str
    mu: float | None
    vocab: int  # V before padding
    block: int
    chunk: int  # rows per chunk
    risk_grad: bool = True  # False: the backward skips the risk's weights


def _forward_rows(a, b, y, plan: Plan):
    """Per-row (logratio, kl, risk, norm_a, norm_b, *aux, logprob) for one
    chunk; ``logprob = log q(y)``, the NLL term's."""
    blk = plan.block
    a, b = mx.clip(a, -_BIG, _BIG), mx.clip(b, -_BIG, _BIG)
    lq, norm_a, _ = _log_softmax(a, blk)
    lp, norm_b, e_b = _log_softmax(b, blk)
    # p = exp(lp) = exp(b - max) / sum: the row's exp is already there.
    p = e_b * mx.exp(-norm_b[:, 1:])
    # Rounding error eps * (|log p| + |log q|): small where p is large.
    z = lp - lq
    kl = bsum(p * z, blk)
    idx = y[:, None]
    logprob = _take(lq, idx)
    logratio = logprob - _take(lp, idx)
    mu = plan.mu
    if plan.measure == "kl":
        risk, aux = kl, ()
    elif plan.measure == "cvar":
        mass = bsum(p, blk)
        target = mu * mass
        z_star = _cvar_boundary(z, p, mass, mu, blk)
        # mu P - mass(Z > z*) as one sum of p (mu - 1[Z > z*]): exact at
        # mu = 1, and no cancellation of two sums near 1 when the boundary
        # entry is light.
        need = bsum(p * (mu - (z > z_star)), blk)
        at = bsum(p * (z == z_star), blk)
        c_above = 1.0 / target
        # at > 0 unless the row has no reference mass at all (all -inf).
        share = mx.where(at > 0, need / mx.maximum(at, 1e-38), 0.0)
        c_at = mx.clip(share, 0.0, 1.0) * c_above
        risk = bsum(_cvar_weights(z, p, z_star, c_above, c_at) * z, blk)
        aux = (z_star, c_above, c_at)
    elif plan.measure == "erm":
        # log E_p[e^{mu Z}] two ways: log1p(sum p expm1(mu Z)) keeps precision
        # as mu -> 0; logsumexp(log p + mu Z) cannot overflow. The first is
        # used wherever mu * max Z leaves expm1 finite.
        mass = bsum(p, blk)
        tilt = lp + mu * z
        small = mx.log1p(
            bsum(p * mx.expm1(mx.minimum(mu * z, _ERM_EXPM1_MAX)), blk) / mass
        )
        large = _logsumexp(tilt, blk) - mx.log(mass)
        use_small = mu * z.max(-1, keepdims=True) <= _ERM_EXPM1_MAX
        log_mgf = mx.where(use_small, small, large)
        risk = log_mgf / mu
        aux = (log_mgf + mx.log(mass),)  # normaliser of the tilt in the backward
    else:  # truncated
        width = a.shape[-1]
        # Entries outside the reference support rank lowest (as -inf).
        zq = mx.where(p > 0, z, -mx.inf)
        h = (plan.vocab - 1) * (1.0 - mu)
        k = math.floor(h) + (width - plan.vocab)  # padding ranks first
        frac = h - math.floor(h)
        part = mx.partition(zq, k, axis=-1)
        lo = part[:, k : k + 1]
        hi = part[:, k + 1 :].min(-1, keepdims=True) if k + 1 < width else lo
        q_thr = mx.where(lo == -mx.inf, lo, lo + frac * (hi - lo) if frac else lo)
        w = p * (z > q_thr)
        risk = bsum(w * z, blk)
        aux = (q_thr, bsum(w, blk))
    return (logratio[:, 0], kl[:, 0], risk[:, 0], norm_a, norm_b, *aux, logprob[:, 0])


def _backward_rows(a, b, y, norm_a, norm_b, aux, g_lr, g_risk, plan: Plan):
    """d(sum g_lr * logratio + g_risk * risk) / d policy logits for one chunk."""
    a, b = mx.clip(a, -_BIG, _BIG), mx.clip(b, -_BIG, _BIG)
    lq, lp = _apply_norm(a, norm_a), _apply_norm(b, norm_b)
    q = _exp(lq)
    g_lr, g_risk = g_lr[:, None], g_risk[:, None]
    onehot = mx.arange(a.shape[-1], dtype=y.dtype) == y[:, None]
    if not plan.risk_grad:  # the log-ratio alone: d log q(y) = onehot - q
        return (onehot - q) * g_lr
    total = 1.0  # sum(w): 1 except for truncated
    if plan.measure == "kl":
        w = _exp(lp)
    elif plan.measure == "cvar":
        w = _cvar_weights(lp - lq, _exp(lp), *aux)
    elif plan.measure == "erm":
        w = _exp(lp + plan.mu * (lp - lq) - aux[0])
    else:  # truncated: sum(w) != 1
        q_thr, total = aux
        w = _exp(lp) * ((lp - lq) > q_thr)
    coef_q = g_risk * total - g_lr
    return coef_q * q - g_risk * w + onehot * g_lr


@lru_cache(maxsize=4)
def _lanes(device_type) -> tuple:
    """Streams to spread chunks over: on the CPU one per core (up to 4, or
    ``$RSA_MLX_CPU_STREAMS``), because MLX runs each stream's element-wise
    kernels on one thread; elsewhere the default stream only."""
    if device_type != mx.cpu:
        return (None,)
    count = int(os.environ.get("RSA_MLX_CPU_STREAMS", min(os.cpu_count() or 1, 4)))
    return tuple(mx.new_stream(mx.cpu) for _ in range(max(1, count)))


def _chunks(n: int, size: int, lanes: int):
    """Row ranges of at most ``size`` rows, and at least one per lane."""
    size = max(1, min(size, -(-n // lanes)))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _on_lanes(n: int, size: int, work):
    """Run ``work(start, end, prev)`` over row chunks, round-robin on the lanes.

    Each lane's chunks run one after another (``mx.depends`` on the lane's
    previous result), so temporaries stay at one chunk per lane; lanes run
    in parallel. Returns the results in row order.
    """
    lanes = _lanes(mx.default_device().type)
    prev: list = [None] * len(lanes)
    results = []
    for i, (s, e) in enumerate(_chunks(n, size, len(lanes))):
        k = i % len(lanes)
        with mx.stream(lanes[k]) if lanes[k] is not None else nullcontext():
            prev[k] = work(s, e, prev[k])
        results.append(prev[k])
    return results


def _sequenced(arrays, prev):
    """Make ``arrays`` wait for ``prev`` (a lane's previous chunk)."""
    return arrays if prev is None else mx.depends(arrays, prev)


@lru_cache(maxsize=64)
def make_op(plan: Plan):
    n_aux = {"kl": 0, "cvar": 3, "erm": 1, "truncated": 2}[plan.measure]

    @mx.custom_function
    def op(a, b, y):
        def forward(s, e, prev):
            ai, bi = _sequenced([a[s:e], b[s:e]], prev)
            return list(_forward_rows(ai, bi, y[s:e], plan))

        outs = _on_lanes(a.shape[0], plan.chunk, forward)
        if len(outs) == 1:
            return tuple(outs[0])
        return tuple(mx.concatenate(parts, axis=0) for parts in zip(*outs))

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        a, b, y = primals
        g_lr, _, g_risk = cotangents[:3]  # kl is monitoring-only
        # log q(y) and the log-ratio have the same gradient, onehot(y) - q
        g_lr = g_lr + cotangents[-1]
        norm_a, norm_b = outputs[3], outputs[4]
        aux = outputs[5 : 5 + n_aux]

        def backward(s, e, prev):
            ai, bi = _sequenced([a[s:e], b[s:e]], prev)
            slices = tuple(x[s:e] for x in aux)
            return _backward_rows(
                ai, bi, y[s:e], norm_a[s:e], norm_b[s:e], slices,
                g_lr[s:e], g_risk[s:e], plan,
            )  # fmt: skip

        parts = _on_lanes(a.shape[0], plan.chunk, backward)
        if len(parts) == 1:
            return parts[0], mx.zeros_like(b), mx.zeros_like(y)
        # Chunk gradients go into one buffer (updated in place) rather than
        # through concatenate, which would hold every chunk plus the result.
        grad, start = mx.zeros(a.shape, mx.float32), 0
        for part in parts:
            grad = grad.at[start : start + part.shape[0]].add(part)
            start += part.shape[0]
        return grad, mx.zeros_like(b), mx.zeros_like(y)

    return op
