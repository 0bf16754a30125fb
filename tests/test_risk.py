"""Risk operators against the float64 brute-force reference (docs/method.md §2)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rsa_mlx.ops import kernels as K
from rsa_mlx.ops import risk as R
from tests import reference as ref

MEASURE_MUS = [
    ("kl", None),
    ("cvar", 1.0),
    ("cvar", 0.95),
    ("cvar", 0.5),
    ("cvar", 0.1),
    ("erm", 1e-3),
    ("erm", 1.0),
    ("erm", 5.0),
    ("truncated", 0.95),
    ("truncated", 0.5),
]
KINDS = ["random", "peaked", "flat", "masked"]


def make_logits(kind: str, n: int, vocab: int, seed: int):
    """Policy/reference logits [n, V] (float32) and targets in the support."""
    rng = np.random.default_rng(seed)
    policy = rng.normal(size=(n, vocab)) * 2.0
    ref_logits = policy + rng.normal(size=(n, vocab)) * 0.7
    if kind == "peaked":
        top = rng.integers(0, vocab, size=n)
        ref_logits[np.arange(n), top] += 15.0
        policy[np.arange(n), top] += 12.0
    elif kind == "flat":
        policy = rng.normal(size=(n, vocab)) * 1e-3
        ref_logits = rng.normal(size=(n, vocab)) * 1e-3
    elif kind == "masked":
        masked = rng.random((n, vocab)) < 0.3
        masked[np.arange(n), rng.integers(0, vocab, size=n)] = False
        ref_logits[masked] = -np.inf
        # the policy also excludes some tokens, only where the reference does
        policy[masked & (rng.random((n, vocab)) < 0.5)] = -np.inf
    policy, ref_logits = policy.astype(np.float32), ref_logits.astype(np.float32)
    targets = np.array(
        [rng.choice(np.flatnonzero(np.isfinite(row))) for row in ref_logits]
    )
    return policy, ref_logits, targets


def stats_np(policy, ref_logits, targets, measure, mu, **kw):
    s = R.token_stats(
        mx.array(policy), mx.array(ref_logits), mx.array(targets), measure, mu, **kw
    )
    return np.stack([np.array(s.logratio), np.array(s.kl), np.array(s.risk)], -1)


def assert_close_to_reference(got, policy, ref_logits, targets, measure, mu):
    """1e-5 relative to the value, or to the size of its terms when they
    cancel, plus the rounding that float32 log-probabilities put into Z."""
    want = ref.token_values(policy, ref_logits, targets, measure, mu)
    for i, (a, b, y) in enumerate(zip(policy, ref_logits, targets)):
        lq, lp = ref.log_softmax(a), ref.log_softmax(b)
        size = np.array(
            [
                1.0 + abs(want[i, 0]),
                ref.risk_scale(a, b, "kl"),
                ref.risk_scale(a, b, measure, mu),
            ]
        )
        floor = 4 * np.array(
            [
                2.0**-23 * (abs(lq[y]) + abs(lp[y])),
                ref.float32_floor(a, b, "kl"),
                ref.float32_floor(a, b, measure, mu),
            ]
        )
        err = np.abs(got[i] - want[i])
        bound = 1e-5 * np.maximum(np.abs(want[i]), size) + floor + 1e-30
        assert np.all(err <= bound), (
            f"row {i} {measure}({mu}): got {got[i]}, want {want[i]}, "
            f"err {err}, bound {bound}"
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vocab", [1, 2, 7, 33, 257, 1000, 5003])
@pytest.mark.parametrize(("measure", "mu"), MEASURE_MUS)
def test_matches_reference(kind, vocab, measure, mu):
    if kind == "masked" and vocab == 1:
        pytest.skip("a one-entry vocabulary cannot mask its only entry")
    policy, ref_logits, targets = make_logits(kind, 4, vocab, seed=vocab)
    got = stats_np(policy, ref_logits, targets, measure, mu)
    assert_close_to_reference(got, policy, ref_logits, targets, measure, mu)


@pytest.mark.parametrize("vocab", [32000, 151936])
@pytest.mark.parametrize(("measure", "mu"), [m for m in MEASURE_MUS if m[1] != 1.0])
def test_matches_reference_large_vocab(vocab, measure, mu):
    # Long rows are where float32 sums go wrong (MLX CPU sums sequentially).
    policy, ref_logits, targets = make_logits("random", 2, vocab, seed=3)
    got = stats_np(policy, ref_logits, targets, measure, mu)
    assert_close_to_reference(got, policy, ref_logits, targets, measure, mu)


def test_blocked_sum_accuracy():
    block, width = K.block_plan(151936)
    assert width == 151936
    # A constant row is the worst case for float32 summation (rounding always
    # in the same direction): mx.sum is off by ~2e-3 here.
    x = mx.full((1, 151936), 1.0 / 151936)
    assert abs(mx.sum(x).item() - 1.0) > 1e-4  # the problem being solved
    assert abs(K.bsum(x, block).item() - 1.0) < 1e-5
    # Softmax-like terms: mx.sum is off by ~2e-4, the blocked sum by < 1e-6.
    e = np.exp(np.random.default_rng(0).normal(size=(4, 151936)) * 3).astype(np.float32)
    got = np.array(K.bsum(mx.array(e), block))[:, 0]
    assert np.all(np.abs(got / e.astype(np.float64).sum(-1) - 1) < 1e-6)


@pytest.mark.parametrize("vocab", [257, 5003, 50257])
def test_padding_plan_for_awkward_vocab(vocab):
    block, width = K.block_plan(vocab)
    assert width % block == 0 and width >= vocab and width - vocab < block


def test_chunking_does_not_change_values_or_gradients():
    policy, ref_logits, targets = make_logits("random", 9, 700, seed=1)
    a, b, y = mx.array(policy), mx.array(ref_logits), mx.array(targets)
    for measure in R.MEASURES:

        def f(a, chunk, measure=measure):
            s = R.token_stats(a, b, y, measure, chunk_size=chunk)
            return (s.risk + 0.3 * s.logratio).sum()

        v1, g1 = mx.value_and_grad(f)(a, 1)
        v2, g2 = mx.value_and_grad(f)(a, None)
        v3, g3 = mx.value_and_grad(f)(a, 4)  # uneven last chunk
        assert abs(v1.item() - v2.item()) < 1e-6 * (1 + abs(v2.item()))
        assert abs(v3.item() - v2.item()) < 1e-6 * (1 + abs(v2.item()))
        assert np.allclose(np.array(g1), np.array(g2), atol=1e-7)
        assert np.allclose(np.array(g3), np.array(g2), atol=1e-7)


def test_extreme_finite_logits_give_finite_values():
    rng = np.random.default_rng(0)
    for scale in (1e4, 1e30, 3e38):
        a = np.clip(rng.normal(size=(3, 50)) * scale, -3.4e38, 3.4e38)
        b = np.clip(rng.normal(size=(3, 50)) * scale, -3.4e38, 3.4e38)
        a, ref_b = a.astype(np.float32), mx.array(b.astype(np.float32))
        for measure in R.MEASURES:

            def f(a, b=ref_b, measure=measure):
                s = R.token_stats(a, b, mx.zeros((3,), mx.int32), measure)
                return s.risk.sum() + s.logratio.sum(), s

            (_, s), g = mx.value_and_grad(f)(mx.array(a))
            assert np.isfinite(np.array(s.risk)).all(), (measure, scale)
            assert np.isfinite(np.array(s.kl)).all(), (measure, scale)
            assert np.isfinite(np.array(g)).all(), (measure, scale)


def test_extreme_logits_match_reference():
    policy, ref_logits, targets = make_logits("random", 3, 64, seed=5)
    policy, ref_logits = policy * 500, ref_logits * 500
    for measure, mu in MEASURE_MUS:
        got = stats_np(policy, ref_logits, targets, measure, mu)
        assert_close_to_reference(got, policy, ref_logits, targets, measure, mu)


def test_low_precision_logits_computed_in_float32():
    policy, ref_logits, targets = make_logits("random", 4, 300, seed=2)
    a16 = mx.array(policy).astype(mx.bfloat16)
    b16 = mx.array(ref_logits).astype(mx.bfloat16)
    s = R.token_stats(a16, b16, mx.array(targets), "cvar")
    assert s.risk.dtype == mx.float32
    want = ref.token_values(
        np.array(a16.astype(mx.float32)),
        np.array(b16.astype(mx.float32)),
        targets,
        "cvar",
        0.95,
    )
    assert np.allclose(np.array(s.risk), want[:, 2], rtol=1e-5, atol=1e-6)
    g = mx.grad(lambda x: R.token_stats(x, b16, mx.array(targets), "cvar").risk.sum())(
        a16
    )
    assert g.dtype == mx.bfloat16


# --------------------------------------------------------------------------
# gradients


def reference_objective(policy, ref_logits, targets, c_lr, c_risk, measure, mu, thr):
    total = 0.0
    for i, (a, b, y) in enumerate(zip(policy, ref_logits, targets)):
        lq, lp = ref.log_softmax(a), ref.log_softmax(b)
        if measure == "truncated":
            value = ref.truncated(a, b, mu, threshold=thr[i])[0]
        else:
            value = ref.risk(a, b, measure, mu)
        total += c_lr[i] * (lq[y] - lp[y]) + c_risk[i] * value
    return total


@pytest.mark.parametrize(("measure", "mu"), MEASURE_MUS)
@pytest.mark.parametrize("kind", ["random", "masked"])
def test_gradient_matches_finite_differences(measure, mu, kind):
    policy, ref_logits, targets = make_logits(kind, 3, 6, seed=11)
    rng = np.random.default_rng(0)
    c_lr, c_risk = rng.normal(size=3), rng.normal(size=3)
    # The truncated threshold is a constant in the gradient (stop-gradient).
    thr = [
        ref.truncated(a, b, mu)[1] if measure == "truncated" else None
        for a, b in zip(policy, ref_logits)
    ]

    def f(a):
        s = R.token_stats(a, mx.array(ref_logits), mx.array(targets), measure, mu)
        return (mx.array(c_lr) * s.logratio + mx.array(c_risk) * s.risk).sum()

    grad = np.array(mx.grad(f)(mx.array(policy)))
    base = policy.astype(np.float64)
    eps = 1e-5
    fd = np.zeros_like(base)
    for idx in zip(*np.nonzero(np.isfinite(base))):
        up, down = base.copy(), base.copy()
        up[idx] += eps
        down[idx] -= eps
        args = (ref_logits, targets, c_lr, c_risk, measure, mu, thr)
        fd[idx] = (
            reference_objective(up, *args) - reference_objective(down, *args)
        ) / (2 * eps)
    assert np.allclose(grad, fd, atol=2e-5 * (1 + np.abs(fd).max())), (grad, fd)


@pytest.mark.parametrize(("measure", "mu"), MEASURE_MUS)
def test_directional_derivative_large_vocab(measure, mu):
    policy, ref_logits, targets = make_logits("random", 2, 1500, seed=4)
    direction = np.random.default_rng(1).normal(size=policy.shape)
    thr = [
        ref.truncated(a, b, mu)[1] if measure == "truncated" else None
        for a, b in zip(policy, ref_logits)
    ]
    c = np.ones(2)

    def f(a):
        s = R.token_stats(a, mx.array(ref_logits), mx.array(targets), measure, mu)
        return (s.logratio + s.risk).sum()

    grad = np.array(mx.grad(f)(mx.array(policy)))
    eps = 1e-5
    args = (ref_logits, targets, c, c, measure, mu, thr)
    base = policy.astype(np.float64)
    fd = (
        reference_objective(base + eps * direction, *args)
        - reference_objective(base - eps * direction, *args)
    ) / (2 * eps)
    assert abs(np.sum(grad * direction) - fd) < 1e-4 * (1 + abs(fd))


@pytest.mark.parametrize("measure", R.MEASURES)
def test_no_gradient_to_reference_or_through_kl(measure):
    policy, ref_logits, targets = make_logits("random", 3, 20, seed=7)
    a, b, y = mx.array(policy), mx.array(ref_logits), mx.array(targets)

    def f(a, b):
        s = R.token_stats(a, b, y, measure)
        return (s.logratio + s.risk).sum()

    g_ref = mx.grad(f, argnums=1)(a, b)
    assert np.all(np.array(g_ref) == 0)
    g_kl = mx.grad(lambda a: R.token_stats(a, b, y, measure).kl.sum())(a)
    assert np.all(np.array(g_kl) == 0)


# --------------------------------------------------------------------------
# sequences and masks


def test_sequence_stats_sum_masked_positions_exactly():
    rng = np.random.default_rng(3)
    B, T, V = 3, 5, 40
    policy, ref_logits, _ = make_logits("random", B * T, V, seed=8)
    policy, ref_logits = policy.reshape(B, T, V), ref_logits.reshape(B, T, V)
    targets = rng.integers(0, V, size=(B, T))
    mask = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]], bool)
    s = R.sequence_stats(
        mx.array(policy),
        mx.array(ref_logits),
        mx.array(targets),
        mx.array(mask),
        "cvar",
    )
    per_token = ref.token_values(
        policy.reshape(-1, V),
        ref_logits.reshape(-1, V),
        targets.reshape(-1),
        "cvar",
        0.95,
    ).reshape(B, T, 3)
    want = (per_token * mask[..., None]).sum(1)
    assert np.allclose(np.array(s.logratio), want[:, 0], rtol=1e-5, atol=1e-5)
    assert np.allclose(np.array(s.kl), want[:, 1], rtol=1e-5, atol=1e-5)
    assert np.allclose(np.array(s.risk), want[:, 2], rtol=1e-5, atol=1e-5)
    assert np.array(s.ntokens).tolist() == [3, 5, 1]
    normalised = R.sequence_stats(
        mx.array(policy),
        mx.array(ref_logits),
        mx.array(targets),
        mx.array(mask),
        "cvar",
        length_normalize=True,
    )
    assert np.allclose(np.array(normalised.risk), want[:, 2] / [3, 5, 1], rtol=1e-5)


@pytest.mark.parametrize("measure", R.MEASURES)
def test_prompt_and_padding_positions_change_nothing(measure):
    rng = np.random.default_rng(4)
    B, T, V = 2, 6, 30
    policy = rng.normal(size=(B, T, V)).astype(np.float32)
    ref_logits = rng.normal(size=(B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], bool)
    # Garbage (huge, -inf, other targets) everywhere outside the mask.
    policy2, ref2, targets2 = policy.copy(), ref_logits.copy(), targets.copy()
    policy2[~mask] = rng.normal(size=((~mask).sum(), V)) * 1e3
    ref2[~mask] = -np.inf
    ref2[~mask, 0] = 0.0
    targets2[~mask] = 0

    def run(p, r, t):
        def f(p):
            s = R.sequence_stats(p, mx.array(r), mx.array(t), mx.array(mask), measure)
            return (s.logratio + s.risk).sum(), s

        (_, s), g = mx.value_and_grad(f)(mx.array(p))
        return s, np.array(g)

    s1, g1 = run(policy, ref_logits, targets)
    s2, g2 = run(policy2, ref2, targets2)
    for x1, x2 in zip(s1, s2):
        assert np.array_equal(np.array(x1), np.array(x2))
    assert np.all(g1[~mask] == 0) and np.all(g2[~mask] == 0)
    assert np.array_equal(g1[mask], g2[mask])


def test_bad_arguments():
    a = mx.zeros((2, 5))
    y = mx.zeros((2,), mx.int32)
    with pytest.raises(ValueError, match="unknown risk measure"):
        R.token_stats(a, a, y, "var")
    with pytest.raises(ValueError, match="0 < mu <= 1"):
        R.token_stats(a, a, y, "cvar", 1.5)
    with pytest.raises(ValueError, match="mu > 0"):
        R.token_stats(a, a, y, "erm", 0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        R.token_stats(a, mx.zeros((2, 6)), y, "kl")
    with pytest.raises(ValueError, match="targets shape"):
        R.token_stats(a, a, mx.zeros((3,), mx.int32), "kl")


@pytest.mark.parametrize("mu", [3e-8, 1e-9, 1e-12, R.MIN_CVAR_MU])
@pytest.mark.parametrize("kind", ["random", "masked", "peaked"])
def test_cvar_at_tiny_mu_is_the_max_with_its_gradient(kind, mu):
    # (1 - mu) P rounds to P in float32 below mu ~ 6e-8: the boundary must not
    # be sought through it (it gave risk 0 with a non-zero gradient).
    policy, ref_logits, targets = make_logits(kind, 4, 257, seed=11)
    got = stats_np(policy, ref_logits, targets, "cvar", mu)
    assert_close_to_reference(got, policy, ref_logits, targets, "cvar", mu)
    a, b, y = mx.array(policy), mx.array(ref_logits), mx.array(targets)
    grad = np.array(mx.grad(lambda x: R.token_stats(x, b, y, "cvar", mu).risk.sum())(a))
    for i, (pa, pb) in enumerate(zip(policy, ref_logits)):
        p, z = ref._row(pa, pb)
        assert got[i, 2] == pytest.approx(z.max(), rel=1e-5, abs=1e-5)
        w = np.zeros(pa.shape)
        w[np.isfinite(pb)] = ref.cvar_weights(p, z, mu)
        want = np.exp(ref.log_softmax(pa)) - w  # d cvar / d logits = q - w
        np.testing.assert_allclose(grad[i], want, atol=2e-6)


def test_cvar_mu_below_the_smallest_supported_is_refused():
    assert R.resolve_mu("cvar", R.MIN_CVAR_MU) == R.MIN_CVAR_MU
    with pytest.raises(ValueError, match="smallest supported"):
        R.resolve_mu("cvar", R.MIN_CVAR_MU / 2)


# mu, reference p, target Z (before the shift that normalises q), and the
# share of the boundary atom (tied entries together) inside the tail
BOUNDARY_CASES = [
    (0.4, [0.2, 0.3, 0.5], [2.0, 1.0, 0.0], 2 / 3),  # mu <= 1/2: mass above
    (0.4, [0.2, 0.15, 0.15, 0.5], [2.0, 1.0, 1.0, 0.0], 2 / 3),  # a tied atom
    (0.9, [0.2, 0.15, 0.15, 0.5], [2.0, 1.0, 1.0, 0.0], 0.8),  # mu > 1/2
    (0.95, [0.1, 0.2, 0.7], [2.0, 1.0, 0.0], 0.65 / 0.7),
]


@pytest.mark.parametrize(("mu", "p", "zt", "share"), BOUNDARY_CASES)
def test_cvar_boundary_atom_counts_its_share(mu, p, zt, share):
    # With ref logits log p and policy logits log p - zt, Z = zt + c for one
    # constant c, so the tail and the boundary atom are known by hand:
    # CVaR = (sum_above p Z + share * mass_at * Z_at) / mu, and the gradient
    # is q - w with w = p / mu above, share * p / mu at the boundary.
    p, zt = np.array(p), np.array(zt)
    b = np.log(p)
    a = b - zt
    q = np.exp(a) / np.exp(a).sum()
    z = np.log(p) - np.log(q)
    order = np.argsort(-zt, kind="stable")
    boundary = zt[order][np.argmax(np.cumsum(p[order]) >= mu - 1e-12)]
    w = np.where(zt > boundary, p / mu, np.where(zt == boundary, share * p / mu, 0))
    assert w.sum() == pytest.approx(1.0)
    want = (w * z).sum()
    pa, pb = mx.array(a[None].astype(np.float32)), mx.array(b[None].astype(np.float32))
    y = mx.zeros((1,), mx.int32)
    got = R.token_stats(pa, pb, y, "cvar", mu).risk.item()
    assert got == pytest.approx(want, rel=1e-5)
    grad = mx.grad(lambda x: R.token_stats(x, pb, y, "cvar", mu).risk.sum())(pa)
    np.testing.assert_allclose(np.array(grad)[0], q - w, atol=1e-6)


# --------------------------------------------------------------------------
# properties (docs/method.md §2)

finite32 = st.floats(-20, 20, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def distributions(draw, max_vocab=24):
    """A (policy, reference) pair of logit rows; the reference may mask entries."""
    vocab = draw(st.integers(1, max_vocab))
    policy = draw(hnp.arrays(np.float32, vocab, elements=finite32))
    ref_logits = draw(hnp.arrays(np.float32, vocab, elements=finite32))
    masked = draw(hnp.arrays(np.bool_, vocab))
    if masked.all():
        masked[draw(st.integers(0, vocab - 1))] = False
    ref_logits = np.where(masked, -np.inf, ref_logits).astype(np.float32)
    return policy, ref_logits


def risk_of(policy, ref_logits, measure, mu=None):
    a, b = mx.array(policy[None]), mx.array(ref_logits[None])
    return R.token_risk(a, b, measure, mu).item()


def tolerance(policy, ref_logits, measure="kl", mu=None):
    return 1e-5 * (1 + ref.risk_scale(policy, ref_logits, measure, mu))


PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY
@given(distributions())
def test_cvar_at_mu_one_is_kl(pair):
    kl = risk_of(*pair, "kl")
    assert abs(risk_of(*pair, "cvar", 1.0) - kl) <= tolerance(*pair)


@PROPERTY
@given(distributions(), st.floats(0.01, 1.0))
def test_cvar_between_kl_and_max(pair, mu):
    value = risk_of(*pair, "cvar", mu)
    tol = tolerance(*pair, "cvar", mu)
    _, z = ref._row(*pair)
    assert value >= risk_of(*pair, "kl") - tol
    assert value <= z.max() + tol


@PROPERTY
@given(distributions(), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_cvar_non_increasing_in_mu(pair, mu1, mu2):
    lo, hi = sorted((mu1, mu2))
    tol = tolerance(*pair, "cvar", lo)
    assert risk_of(*pair, "cvar", lo) >= risk_of(*pair, "cvar", hi) - tol


@PROPERTY
@given(distributions(), st.floats(0.01, 8.0))
def test_erm_is_renyi_divergence(pair, mu):
    p, z = ref._row(*pair)
    q = np.exp(np.log(p) - z)
    assume(np.all(q > 0))
    want = ref.renyi(p, q, 1.0 + mu)
    got = risk_of(*pair, "erm", mu)
    assert abs(got - want) <= 1e-5 * max(abs(want), 1.0) + tolerance(*pair, "erm", mu)


@PROPERTY
@given(distributions(), st.floats(0.01, 8.0), st.floats(0.01, 8.0))
def test_erm_non_decreasing_in_mu(pair, mu1, mu2):
    lo, hi = sorted((mu1, mu2))
    tol = tolerance(*pair, "erm", hi)
    assert risk_of(*pair, "erm", hi) >= risk_of(*pair, "erm", lo) - tol


@PROPERTY
@given(distributions())
def test_erm_tends_to_kl(pair):
    kl = risk_of(*pair, "kl")
    p, z = ref._row(*pair)
    variance = float(np.sum(p * (z - np.sum(p * z)) ** 2))
    for mu in (1e-2, 1e-4, 1e-6):
        # erm - kl = mu var / 2 + O(mu^2): the gap must shrink with mu.
        gap = abs(risk_of(*pair, "erm", mu) - kl)
        assert gap <= mu * variance + tolerance(*pair)


@PROPERTY
@given(distributions(), st.sampled_from(R.MEASURES), st.floats(0.05, 1.0))
def test_zero_when_policy_equals_reference(pair, measure, mu):
    _, ref_logits = pair
    assert risk_of(ref_logits, ref_logits, measure, mu) == 0.0
    assert risk_of(ref_logits, ref_logits, "kl") == 0.0


def test_erm_smooth_in_float32_as_mu_vanishes():
    # The log1p/expm1 form: erm(mu) - kl must fall like mu, not jump at 1e-7.
    policy, ref_logits, _ = make_logits("random", 1, 1000, seed=9)
    kl = risk_of(policy[0], ref_logits[0], "kl")
    gaps = [risk_of(policy[0], ref_logits[0], "erm", mu) - kl for mu in (1e-3, 1e-4)]
    p, z = ref._row(policy[0], ref_logits[0])
    half_var = 0.5 * float(np.sum(p * (z - np.sum(p * z)) ** 2))
    assert math.isclose(gaps[0], 1e-3 * half_var, rel_tol=0.05)
    assert math.isclose(gaps[1], 1e-4 * half_var, rel_tol=0.2)


@pytest.mark.parametrize("measure", R.MEASURES)
def test_monitoring_only_risk_has_no_gradient_and_same_logratio_gradient(measure):
    policy, ref_logits, targets = make_logits("random", 5, 300, seed=13)
    a, b, y = mx.array(policy), mx.array(ref_logits), mx.array(targets)

    def f(a, risk_grad):
        s = R.token_stats(a, b, y, measure, risk_grad=risk_grad)
        return s.logratio.sum() + 0.0 * s.risk.sum(), s

    (_, s1), g1 = mx.value_and_grad(f)(a, True)
    (_, s2), g2 = mx.value_and_grad(f)(a, False)
    assert np.allclose(np.array(g1), np.array(g2), atol=1e-7)
    assert np.array_equal(np.array(s1.risk), np.array(s2.risk))
    g_risk = mx.grad(
        lambda a: R.token_stats(a, b, y, measure, risk_grad=False).risk.sum()
    )(a)
    assert np.all(np.array(g_risk) == 0)


@pytest.mark.parametrize("measure", ["kl", "cvar"])
def test_logprob_is_the_policy_log_probability_with_its_gradient(measure):
    """``logprob = log q(y)`` (float64 reference), and its gradient is the
    log-softmax's, ``onehot(y) - q``: the NLL term costs no vocabulary pass."""
    policy, ref_logits, targets = make_logits("masked", 6, 40, seed=4)
    s = R.token_stats(
        mx.array(policy), mx.array(ref_logits), mx.array(targets), measure
    )
    want = [ref.log_softmax(a)[y] for a, y in zip(policy, targets)]
    assert np.allclose(np.array(s.logprob), want, rtol=1e-5, atol=1e-5)
    c = np.random.default_rng(0).normal(size=6)

    def f(a):
        t = R.token_stats(a, mx.array(ref_logits), mx.array(targets), measure)
        return (mx.array(c, mx.float32) * t.logprob).sum()

    grad = np.array(mx.grad(f)(mx.array(policy)))
    for i, (a, y) in enumerate(zip(policy, targets)):
        q = np.exp(ref.log_softmax(a))
        expect = -c[i] * q
        expect[y] += c[i]
        finite = np.isfinite(a)
        assert np.allclose(grad[i][finite], expect[finite], atol=1e-6)
