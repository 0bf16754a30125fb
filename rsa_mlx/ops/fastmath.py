"""Float32 ``exp``, softmax, sigmoid and attention for MLX's CPU backend.

MLX's CPU ``exp`` is a scalar call: ~12 ns per entry on our CI CPU, where a
multiply-add costs ~0.3 ns. In a training step that is the largest single
cost after the matrix products: the log-softmax of both models over the
vocabulary, the attention softmax of every layer and every SiLU's sigmoid.
:func:`exp` computes it from multiply-adds instead, which ``mx.compile``
fuses into vectorised loops (~2.4 ns per entry, and at most 1 ulp from the
true value where the CPU ``exp`` measured up to ~60).

:func:`cpu_kernels` routes mlx-lm's attention and SiLU through these while a
model is traced on the CPU (see :class:`rsa_mlx.tuner.model.ResponseLogits`); on a
GPU, or with ``RSA_MLX_FAST_EXP=0``, nothing changes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache

import mlx.core as mx

# exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 with ln 2 split in
# two (the high part exact in float32), exp(r) by Cephes' expf polynomial on
# |r| <= ln(2) / 2.
_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
         4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)  # fmt: skip


def exp_poly(x: mx.array) -> mx.array:
    """``exp(x)`` in float32 from multiply-adds: ``2^n p(r)``.

    At most 1 ulp from the true value for ``x`` in [-87.3, 88]; 0 below
    -88 (no denormals: ``2^n`` is built from the exponent bits,
    ``(n + 127) << 23``, which is 0.0 at n = -127), ``exp(88)`` above 88;
    NaN stays NaN. Only cheap ops (no ``floor``/``clip``, ~2 ns each on the
    CPU): ``n + 128`` is rounded by a float-to-int cast of a positive
    number. Its gradient would be the polynomial's; custom VJPs use it in
    forward passes only.
    """
    x = mx.minimum(mx.maximum(x.astype(mx.float32), -88.0), 88.0)
    k = (x * _LOG2E + 128.5).astype(mx.int32)  # n + 128 = round(x / ln 2) + 128
    n = k.astype(mx.float32) - 128.0
    r = x - n * _LN2_HI - n * _LN2_LO
    p = _POLY[0]
    for c in _POLY[1:]:
        p = p * r + c
    p = p * r * r + r + 1.0
    return p * mx.view((k - 1) << 23, mx.float32)


@lru_cache(maxsize=1)
def enabled() -> bool:
    """False when ``$RSA_MLX_FAST_EXP`` is 0/off/no/false (for A/B runs)."""
    flag = os.environ.get("RSA_MLX_FAST_EXP", "1").lower()
    return flag not in {"0", "off", "no", "false"}


def _on_cpu() -> bool:
    return mx.default_device().type == mx.cpu and enabled()


def exp(x: mx.array) -> mx.array:
    """``exp`` with the polynomial on the CPU, MLX's own elsewhere (a GPU's
    ``exp`` is fast). Forward only: used inside custom VJPs."""
    return exp_poly(x) if _on_cpu() else mx.exp(x)


@mx.custom_function
def _softmax_last(x):
    e = exp_poly(x - x.max(-1, keepdims=True))  # the VJP below is the gradient
    return e / e.sum(-1, keepdims=True)


@_softmax_last.vjp
def _softmax_last_vjp(primals, cotangent, output):
    # d softmax: y * (g - sum(g * y)), as MLX's own softmax VJP.
    y = output
    return (y * (cotangent - (cotangent * y).sum(-1, keepdims=True)),)


def softmax(x: mx.array) -> mx.array:
    """``softmax(x)`` over the last axis, computed in float32 and returned
    in ``x``'s dtype: ``e / sum(e)``, ``e = exp(x - max)``."""
    return _softmax_last(x.astype(mx.float32)).astype(x.dtype)


@mx.custom_function
def _sigmoid32(x):
    return 1.0 / (1.0 + exp_poly(-x))


@_sigmoid32.vjp
def _sigmoid32_vjp(primals, cotangent, output):
    return (cotangent * output * (1.0 - output),)


def sigmoid(x: mx.array) -> mx.array:
    """``1 / (1 + exp(-x))`` in float32, returned in ``x``'s dtype."""
    return _sigmoid32(x.astype(mx.float32)).astype(x.dtype)


def attention(q, k, v, *, scale, mask=None):
    """``softmax(scale q k^T + mask) v`` as MLX's CPU fallback computes it
    (grouped heads, ``"causal"``, boolean or additive masks; the causal
    mask aligns the last query with the last key), with :func:`softmax`.
    ``q``: [B, H, Tq, D]; ``k``, ``v``: [B, Hkv, Tk, D]."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    rep = H // Hkv
    # The heads sharing a key are rows of one product, [rep * Tq, D] @ [D, Tk]:
    # a batched matmul broadcasting k over rep copies it (decode: ~40% slower).
    q = (q * mx.array(scale, q.dtype)).reshape(B, Hkv, rep * Tq, D)
    scores = (q @ k.swapaxes(-1, -2)).reshape(B, Hkv, rep, Tq, Tk)
    # Masked scores get the lowest finite value, as in MLX: a query with no
    # key left averages them all instead of giving NaN.
    low = mx.array(mx.finfo(scores.dtype).min, scores.dtype)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported attention mask {mask!r}")
        keep = mx.arange(Tq)[:, None] + (Tk - Tq) >= mx.arange(Tk)[None]
        scores = mx.where(keep, scores, low)
    elif mask is not None:
        if mask.ndim >= 3:  # [..., H or 1, Tq, Tk] -> grouped heads
            lead, (heads, mq, mk) = mask.shape[:-3], mask.shape[-3:]
            if heads > 1:
                mask = mask.reshape(*lead, Hkv, rep, mq, mk)
            else:
                mask = mx.expand_dims(mask, -3)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, low)
        else:
            scores = scores + mask.astype(scores.dtype)
    weights = softmax(scores).astype(v.dtype).reshape(B, Hkv, rep * Tq, Tk)
    return (weights @ v).reshape(B, H, Tq, -1)


_probe_traces = [0]


@mx.compile
def _probe(x):
    _probe_traces[0] += 1
    return x


def _compiling() -> bool:
    """Whether ``mx.compile`` functions use cached traces right now: false
    when compile is off (``mx.disable_compile``, ``MLX_DISABLE_COMPILE``,
    an enclosing :func:`cpu_kernels`) and while an outer function is being
    traced (which inlines them)."""
    x = mx.array(0)
    _probe(x)
    before = _probe_traces[0]
    _probe(x)
    return _probe_traces[0] == before


@contextmanager
def cpu_kernels():
    """While tracing on the CPU: ``mx.fast.scaled_dot_product_attention``
    (mlx-lm's attention) runs :func:`attention` and ``mx.sigmoid`` (SiLU)
    :func:`sigmoid`. Calls these do not cover (a stream argument, attention
    sinks, non-float inputs) go to MLX's own. No-op on a GPU.

    mlx-lm's ``swiglu`` and mlx's ``silu`` are ``mx.compile`` functions,
    whose cached traces would keep whichever sigmoid they first saw; where
    compiled functions would use such traces (an eager call), compile is
    off inside the block, so they run as Python and a compiled step (which
    inlines them anyway) and an eager one compute the same. Compile is
    switched back on only if this block switched it off.
    """
    if not _on_cpu():
        yield
        return
    own_sigmoid = mx.sigmoid
    own_sdpa = mx.fast.scaled_dot_product_attention

    def patched_sigmoid(x, *args, **kwargs):
        if (
            args
            or kwargs
            or not isinstance(x, mx.array)
            or not mx.issubdtype(x.dtype, mx.floating)
        ):
            return own_sigmoid(x, *args, **kwargs)
        return sigmoid(x)

    def patched_sdpa(q, k, v, *, scale, mask=None, sinks=None, stream=None):
        if sinks is not None or stream is not None:
            return own_sdpa(q, k, v, scale=scale, mask=mask, sinks=sinks, stream=stream)
        return attention(q, k, v, scale=scale, mask=mask)

    switch = _compiling()
    mx.sigmoid = patched_sigmoid
    mx.fast.scaled_dot_product_attention = patched_sdpa
    if switch:
        mx.disable_compile()
    try:
        yield
    finally:
        mx.sigmoid = own_sigmoid
        mx.fast.scaled_dot_product_attention = own_sdpa
        if switch:
            mx.enable_compile()
