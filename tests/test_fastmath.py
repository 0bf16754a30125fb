"""rsa_mlx.ops.fastmath against float64 NumPy and MLX's own kernels."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from rsa_mlx.ops import fastmath as fm


def _ulps(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(got - ref) / np.spacing(np.abs(ref).astype(np.float32))


def test_exp_poly_within_one_ulp():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.uniform(-87.3, 88.0, 200_000),
            rng.uniform(-1.0, 1.0, 50_000),
            rng.normal(0, 1e-4, 1000),
            np.arange(-87, 88.5, 0.5),  # round numbers up to the clip at 88
        ]
    ).astype(np.float32)
    got = np.array(fm.exp_poly(mx.array(x))).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    normal = ref > np.finfo(np.float32).tiny
    assert _ulps(got[normal], ref[normal]).max() <= 1.0


def test_exp_poly_special_values():
    x = mx.array([0.0, -0.0, -mx.inf, -1e30, -88.0, -100.0, mx.nan, 1e-30, mx.inf])
    got = np.array(fm.exp_poly(x))
    assert got[0] == 1.0 and got[1] == 1.0  # exp(0) exactly: the row max
    assert (got[2:6] == 0.0).all()
    assert np.isnan(got[6])
    assert got[7] == 1.0
    assert np.isfinite(got[8]) and got[8] > 1e38  # clipped at exp(88)


def test_exp_poly_fused_under_compile_and_bf16_input():
    x = mx.random.uniform(-20, 5, (64, 333), key=mx.random.key(1))
    eager, compiled = fm.exp_poly(x), mx.compile(fm.exp_poly)(x)
    assert mx.array_equal(eager, compiled)
    half = fm.exp_poly(x.astype(mx.bfloat16))
    assert half.dtype == mx.float32
    np.testing.assert_allclose(
        np.array(half), np.exp(np.array(x.astype(mx.bfloat16).astype(mx.float32)).astype(np.float64)),
        rtol=2e-7,
    )  # fmt: skip


def _softmax64(x):
    x = x.astype(np.float64)
    m = np.max(x, -1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind", ["normal", "peaked", "flat", "masked"])
def test_softmax_against_float64(kind):
    rng = np.random.default_rng(2)
    x = rng.normal(0, 3, (6, 257)).astype(np.float32)
    if kind == "peaked":
        x[:, 5] += 40.0
    elif kind == "flat":
        x[:] = 0.25
    elif kind == "masked":
        x[:, ::3] = -np.inf
    got = np.array(fm.softmax(mx.array(x)))
    np.testing.assert_allclose(got, _softmax64(x), rtol=2e-6, atol=1e-30)
    # Gradient: the same VJP as MLX's precise softmax.
    g = mx.array(rng.normal(size=x.shape).astype(np.float32))
    mine = mx.grad(lambda a: (fm.softmax(a) * g).sum())(mx.array(x))
    own = mx.grad(lambda a: (mx.softmax(a, axis=-1, precise=True) * g).sum())(
        mx.array(x)
    )
    np.testing.assert_allclose(np.array(mine), np.array(own), rtol=1e-4, atol=1e-6)


def test_sigmoid_value_and_gradient():
    x = mx.array(np.linspace(-100, 100, 4001).astype(np.float32))
    ref = 1.0 / (1.0 + np.exp(-np.array(x).astype(np.float64)))
    # Below x = -88 the exp is clipped: 6e-39 instead of ~1e-44.
    np.testing.assert_allclose(np.array(fm.sigmoid(x)), ref, rtol=3e-7, atol=1e-38)
    # The gradient is MLX's formula, s (1 - s), on our s: 1 - s near s = 1
    # carries the 6e-8 of one ulp of s.
    grad = mx.grad(lambda a: fm.sigmoid(a).sum())(x)
    own = mx.grad(lambda a: mx.sigmoid(a).sum())(x)
    np.testing.assert_allclose(np.array(grad), np.array(own), rtol=1e-5, atol=1.2e-7)
    assert fm.sigmoid(x.astype(mx.float16)).dtype == mx.float16


def _attention64(q, k, v, scale, keep=None, add=None):
    """Brute force: every head, every query, one explicit softmax."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, H, Tq, _ = q.shape
    rep = H // k.shape[1]
    out = np.zeros((B, H, Tq, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            s = scale * q[b, h] @ k[b, h // rep].T
            if add is not None:
                s = s + np.broadcast_to(add, (B, H, *s.shape))[b, h]
            if keep is not None:
                s = np.where(np.broadcast_to(keep, (B, H, *s.shape))[b, h], s, -np.inf)
            out[b, h] = _softmax64(s) @ v[b, h // rep]
    return out


@pytest.mark.parametrize("heads,kv_heads,tq,tk", [(4, 4, 7, 7), (8, 2, 5, 9)])
@pytest.mark.parametrize(
    "mask", [None, "causal", "bool", "bool-heads", "add", "add-2d"]
)
def test_attention_against_float64(heads, kv_heads, tq, tk, mask):
    rng = np.random.default_rng(3)
    B, D, scale = 2, 8, 0.35
    q = rng.normal(size=(B, heads, tq, D)).astype(np.float32)
    k = rng.normal(size=(B, kv_heads, tk, D)).astype(np.float32)
    v = rng.normal(size=(B, kv_heads, tk, D)).astype(np.float32)
    keep = add = arg = None
    if mask == "causal":
        keep = np.arange(tq)[:, None] + (tk - tq) >= np.arange(tk)[None]
        arg = "causal"
    elif mask in ("bool", "bool-heads"):
        shape = (B, 1 if mask == "bool" else heads, tq, tk)
        keep = rng.uniform(size=shape) > 0.4
        keep[..., 0] = True  # every query keeps a key
        arg = mx.array(keep)
    elif mask == "add":
        add = rng.normal(size=(B, heads, tq, tk)).astype(np.float32)
        arg = mx.array(add)
    elif mask == "add-2d":
        add = rng.normal(size=(tq, tk)).astype(np.float32)
        arg = mx.array(add)
    got = fm.attention(mx.array(q), mx.array(k), mx.array(v), scale=scale, mask=arg)
    ref = _attention64(q, k, v, scale, keep, add)
    np.testing.assert_allclose(np.array(got), ref, rtol=1e-5, atol=1e-5)

    # Gradients against MLX's own attention (its CPU fallback, autodiff).
    def loss(fn):
        return lambda a, b, c: (fn(a, b, c, scale=scale, mask=arg) ** 2).sum()

    args = (mx.array(q), mx.array(k), mx.array(v))
    mine = mx.grad(loss(fm.attention), argnums=(0, 1, 2))(*args)
    own = mx.grad(loss(mx.fast.scaled_dot_product_attention), argnums=(0, 1, 2))(*args)
    for a, b in zip(mine, own):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


def test_cpu_kernels_patch_and_restore(monkeypatch):
    own_sigmoid, own_sdpa = mx.sigmoid, mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(fm, "_on_cpu", lambda: True)
    with pytest.raises(RuntimeError), fm.cpu_kernels():
        assert mx.sigmoid is not own_sigmoid
        assert mx.fast.scaled_dot_product_attention is not own_sdpa
        x = mx.array([-3.0, 0.0, 2.0])
        np.testing.assert_allclose(np.array(mx.sigmoid(x)), np.array(own_sigmoid(x)))
        # Integer input and a stream argument go to MLX's own.
        assert mx.sigmoid(x, stream=mx.cpu).dtype == mx.float32
        raise RuntimeError("restored even on an error")
    assert mx.sigmoid is own_sigmoid
    assert mx.fast.scaled_dot_product_attention is own_sdpa
    monkeypatch.setattr(fm, "_on_cpu", lambda: False)
    with fm.cpu_kernels():
        assert mx.sigmoid is own_sigmoid  # a GPU (or RSA_MLX_FAST_EXP=0): no patch


def test_cpu_kernels_fall_back_for_sinks(monkeypatch):
    monkeypatch.setattr(fm, "_on_cpu", lambda: True)
    q = mx.random.normal((1, 2, 3, 4), key=mx.random.key(0))
    sinks = mx.zeros((2,))
    own = mx.fast.scaled_dot_product_attention(q, q, q, scale=0.5, sinks=sinks)
    with fm.cpu_kernels():
        got = mx.fast.scaled_dot_product_attention(q, q, q, scale=0.5, sinks=sinks)
    assert mx.array_equal(own, got)


def test_response_logits_match_the_model_with_cpu_kernels():
    from mlx_lm.models import llama

    from rsa_mlx.tuner.model import ResponseLogits
    from tests.tiny import model_args

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(model_args(64, tied=False)))
    tokens = mx.array(np.random.default_rng(4).integers(1, 64, (3, 12)), mx.int32)
    index = mx.arange(3 * 12)
    full = model(tokens).reshape(3 * 12, -1)
    got = ResponseLogits(model)(tokens, index)
    np.testing.assert_allclose(np.array(got), np.array(full), rtol=1e-5, atol=1e-5)


def test_attention_rows_with_no_key_match_mlx():
    # A query row with every key masked averages the values (MLX fills with
    # the lowest finite score), it does not give NaN.
    q = mx.ones((1, 1, 4, 1))
    k = mx.zeros((1, 1, 2, 1))
    v = mx.arange(2).reshape(1, 1, 2, 1).astype(mx.float32)
    keep = mx.array([[False, False], [True, True], [True, False], [True, True]])
    for mask in ("causal", keep):  # causal with Tq > Tk masks rows 0 and 1
        own = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        got = fm.attention(q, k, v, scale=1.0, mask=mask)
        np.testing.assert_allclose(np.array(got), np.array(own), atol=1e-6)


def _traces(counter):
    @mx.compile
    def f(x):
        counter[0] += 1
        return x * 2

    counter[0] = 0
    for _ in range(3):
        mx.eval(f(mx.ones(2)))
    return counter[0]


def test_cpu_kernels_leave_the_compile_state_as_they_found_it(monkeypatch):
    monkeypatch.setattr(fm, "_on_cpu", lambda: True)
    counter = [0]
    try:
        assert _traces(counter) == 1  # compile on: one trace
        with fm.cpu_kernels():
            assert _traces(counter) == 3  # off inside the block
            with fm.cpu_kernels():
                pass
            assert _traces(counter) == 3  # a nested block does not switch it on
            assert mx.sigmoid(0.5) is not None  # a Python scalar goes to MLX
        assert _traces(counter) == 1
        mx.disable_compile()  # the user's choice survives the block
        with fm.cpu_kernels():
            pass
        assert _traces(counter) == 3
    finally:
        mx.enable_compile()
