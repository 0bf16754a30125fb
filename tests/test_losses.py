"""Preference losses (docs/method.md §3) against closed forms and the NumPy reference."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from rsa_mlx.ops import losses as L
from rsa_mlx.ops.risk import SequenceStats, sequence_stats
from tests import reference as ref
from tests.test_risk import make_logits


def stats(m, d, kl=None, n=None, logprob=None):
    m, d = mx.array(m, mx.float32), mx.array(d, mx.float32)
    kl = d if kl is None else mx.array(kl, mx.float32)
    n = mx.full(m.shape, 5, mx.int32) if n is None else mx.array(n, mx.int32)
    lp = mx.zeros_like(m) if logprob is None else mx.array(logprob, mx.float32)
    return SequenceStats(m, kl, d, n, lp)


@pytest.mark.parametrize("loss", L.LOSSES)
def test_policy_equal_reference_gives_log2(loss):
    zero = stats([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    value, metrics = L.preference_loss(zero, zero, loss, beta=0.1)
    assert math.isclose(value.item(), math.log(2), rel_tol=1e-7)
    assert metrics["accuracy"].item() == 0.0  # logit 0 is not > 0
    assert metrics["margins"].item() == 0.0
    # the names distributed validation sums by (a rank may see no pairs)
    assert tuple(metrics) == L.metric_keys(loss)


@pytest.mark.parametrize("loss", L.LOSSES)
@pytest.mark.parametrize(("beta", "alpha"), [(0.1, 0.5), (0.025, 0.5), (1.0, 2.0)])
def test_matches_reference(loss, beta, alpha):
    rng = np.random.default_rng(0)
    m_w, m_l, d_w, d_l = rng.normal(size=(4, 16)) * 5
    d_w, d_l = np.abs(d_w), np.abs(d_l)
    value, metrics = L.preference_loss(
        stats(m_w, d_w), stats(m_l, d_l), loss, beta=beta, alpha=alpha
    )
    losses, z = ref.preference_loss(m_w, m_l, d_w, d_l, loss, beta, alpha)
    assert math.isclose(value.item(), losses.mean(), rel_tol=1e-5)
    assert math.isclose(metrics["accuracy"].item(), np.mean(z > 0), rel_tol=1e-6)
    assert math.isclose(
        metrics["rewards/chosen"].item(), beta * m_w.mean(), rel_tol=1e-5
    )
    assert math.isclose(
        metrics["margins"].item(), beta * (m_w - m_l).mean(), rel_tol=1e-5, abs_tol=1e-6
    )
    if loss == "dpo":  # no risk term, so no risk reported
        assert "risk/rejected" not in metrics
    else:
        assert math.isclose(metrics["risk/rejected"].item(), d_l.mean(), rel_tol=1e-5)


def test_accuracy_is_per_pair_not_batch_means():
    # Pair 1 is right by a lot, pairs 2 and 3 wrong by a little: the batch
    # means of the rewards favour "chosen", but 1 of 3 pairs is right.
    _, metrics = L.preference_loss(
        stats([10.0, -0.1, -0.1], [0, 0, 0]),
        stats([0.0, 0.0, 0.0], [0, 0, 0]),
        "dpo",
    )
    assert math.isclose(metrics["accuracy"].item(), 1 / 3, rel_tol=1e-6)


def test_large_logits_are_stable():
    value, _ = L.preference_loss(
        stats([1e4, -1e4], [0, 0]), stats([0.0, 0.0], [0, 0]), "dpo", beta=1.0
    )
    assert math.isclose(value.item(), 1e4 / 2, rel_tol=1e-6)


def grads(loss, m_w, m_l, d_w, d_l, beta=0.5, alpha=0.5):
    def f(d_w, d_l):
        return L.preference_loss(
            SequenceStats(m_w, d_w, d_w, mx.ones_like(m_w), mx.zeros_like(m_w)),
            SequenceStats(m_l, d_l, d_l, mx.ones_like(m_l), mx.zeros_like(m_l)),
            loss,
            beta,
            alpha,
        )[0]

    return mx.grad(f, argnums=(0, 1))(d_w, d_l)


def test_variant2_stops_the_gradient_on_the_chosen_risk():
    m_w, m_l = mx.array([0.3, -0.2]), mx.array([0.1, 0.4])
    d_w, d_l = mx.array([0.5, 1.0]), mx.array([0.7, 0.2])
    g_w, g_l = grads("variant2", m_w, m_l, d_w, d_l, beta=0.5, alpha=0.5)
    assert np.all(np.array(g_w) == 0)
    z = 0.5 * ((m_w - m_l) - 0.5 * (d_l - d_w))
    # d/dD_l mean(-log sigmoid(z)) = beta * alpha * sigmoid(-z) / P
    want = 0.5 * 0.5 * mx.sigmoid(-z) / 2
    assert np.allclose(np.array(g_l), np.array(want), rtol=1e-6)


def test_variant1_gradient_reaches_both_risks():
    m_w, m_l = mx.array([0.3, -0.2]), mx.array([0.1, 0.4])
    d_w, d_l = mx.array([0.5, 1.0]), mx.array([0.7, 0.2])
    g_w, g_l = grads("variant1", m_w, m_l, d_w, d_l, beta=0.5)
    z = 0.5 * ((m_w - m_l) - (d_l - d_w))
    want = 0.5 * mx.sigmoid(-z) / 2
    assert np.allclose(np.array(g_l), np.array(want), rtol=1e-6)
    assert np.allclose(np.array(g_w), -np.array(want), rtol=1e-6)


def test_dpo_ignores_the_risk():
    m_w, m_l = mx.array([0.3]), mx.array([0.1])
    g_w, g_l = grads("dpo", m_w, m_l, mx.array([0.5]), mx.array([0.7]))
    assert g_w.item() == 0 and g_l.item() == 0


@pytest.mark.parametrize("loss", L.LOSSES)
@pytest.mark.parametrize("measure", ["kl", "cvar", "erm"])
def test_end_to_end_from_logits(loss, measure):
    """Logits -> sequence_stats -> loss equals the reference computed per token."""
    P, T, V = 3, 4, 25
    policy, ref_logits, _ = make_logits("random", 2 * P * T, V, seed=12)
    rng = np.random.default_rng(5)
    targets = rng.integers(0, V, size=(2 * P, T))
    mask = rng.random((2 * P, T)) < 0.7
    mask[:, 0] = True
    s = sequence_stats(
        mx.array(policy.reshape(2 * P, T, V)),
        mx.array(ref_logits.reshape(2 * P, T, V)),
        mx.array(targets),
        mx.array(mask),
        measure,
    )
    chosen, rejected = L.split_pairs(s)
    value, metrics = L.preference_loss(chosen, rejected, loss, beta=0.1, alpha=0.5)

    mu = {"kl": None, "cvar": 0.95, "erm": 5.0}[measure]
    per_tok = ref.token_values(policy, ref_logits, targets.reshape(-1), measure, mu)
    per_seq = (per_tok.reshape(2 * P, T, 3) * mask[..., None]).sum(1)
    m, d = per_seq[:, 0], per_seq[:, 2]
    losses, _ = ref.preference_loss(m[:P], m[P:], d[:P], d[P:], loss, 0.1, 0.5)
    assert math.isclose(value.item(), losses.mean(), rel_tol=1e-5)
    assert math.isclose(
        metrics["kl/chosen"].item(), per_seq[:P, 1].mean(), rel_tol=1e-5
    )
    assert metrics["ntokens/rejected"].item() == mask[P:].sum(1).mean()


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss"):
        L.loss_logits(stats([0.0], [0.0]), stats([0.0], [0.0]), "ipo")


def random_pairs(seed=1, pairs=12):
    rng = np.random.default_rng(seed)
    m_w, m_l, d_w, d_l = rng.normal(size=(4, pairs)) * 5
    logprob = -np.abs(rng.normal(size=pairs)) * 30  # log pi(y_w | x) < 0
    n = rng.integers(0, 40, size=pairs)  # one empty answer among them, maybe
    n[0] = 0
    return m_w, m_l, np.abs(d_w), np.abs(d_l), logprob, n


@pytest.mark.parametrize("loss", L.LOSSES)
@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0, 5.0])
def test_nll_term_matches_reference(loss, weight):
    m_w, m_l, d_w, d_l, logprob, n = random_pairs()
    value, metrics = L.preference_loss(
        stats(m_w, d_w, n=n, logprob=logprob),
        stats(m_l, d_l, n=n),
        loss,
        beta=0.1,
        alpha=0.5,
        sft_weight=weight,
    )
    want = ref.objective(m_w, m_l, d_w, d_l, loss, 0.1, 0.5, weight, logprob, n)
    assert math.isclose(value.item(), want, rel_tol=1e-5)
    nll = ref.chosen_nll(logprob, n).mean()
    assert math.isclose(metrics["nll/chosen"].item(), nll, rel_tol=1e-5)


def test_zero_nll_weight_leaves_every_loss_unchanged():
    m_w, m_l, d_w, d_l, logprob, n = random_pairs(seed=2)
    for loss in L.LOSSES:
        plain = L.preference_loss(stats(m_w, d_w), stats(m_l, d_l), loss)[0]
        with_lp = L.preference_loss(
            stats(m_w, d_w, logprob=logprob, n=n), stats(m_l, d_l), loss
        )[0]
        assert plain.item() == with_lp.item()


@pytest.mark.parametrize("loss", L.LOSSES)
def test_nll_term_gradient_by_finite_differences(loss):
    """d loss / d (m_w, log pi(y_w)) against central differences of the
    float64 reference."""
    m_w, m_l, d_w, d_l, logprob, n = random_pairs(seed=3, pairs=5)
    weight = 0.8

    def f(m, lp):
        return L.preference_loss(
            SequenceStats(m, mx.array(d_w, mx.float32), mx.array(d_w, mx.float32),
                          mx.array(n, mx.int32), lp),
            stats(m_l, d_l, n=n),
            loss, 0.1, 0.5, weight,
        )[0]  # fmt: skip

    g_m, g_lp = mx.grad(f, argnums=(0, 1))(
        mx.array(m_w, mx.float32), mx.array(logprob, mx.float32)
    )
    eps = 1e-4
    for values, grad, which in ((m_w, g_m, 0), (logprob, g_lp, 1)):
        for i in range(len(values)):
            up, down = values.astype(np.float64), values.astype(np.float64)
            up, down = up.copy(), down.copy()
            up[i] += eps
            down[i] -= eps

            def obj(x, which=which):
                mw, lp = (x, logprob) if which == 0 else (m_w, x)
                return ref.objective(mw, m_l, d_w, d_l, loss, 0.1, 0.5, weight, lp, n)

            fd = (obj(up) - obj(down)) / (2 * eps)
            assert math.isclose(np.array(grad)[i], fd, rel_tol=1e-3, abs_tol=1e-6)


@pytest.mark.parametrize("loss", L.LOSSES)
def test_nll_term_end_to_end_from_logits(loss):
    """Logits -> sequence_stats -> loss with the NLL term equals the reference
    computed per token (log q at the chosen answers' tokens)."""
    P, T, V = 3, 5, 30
    policy, ref_logits, _ = make_logits("random", 2 * P * T, V, seed=21)
    rng = np.random.default_rng(8)
    targets = rng.integers(0, V, size=(2 * P, T))
    mask = rng.random((2 * P, T)) < 0.7
    mask[:, 0] = True
    s = sequence_stats(
        mx.array(policy.reshape(2 * P, T, V)),
        mx.array(ref_logits.reshape(2 * P, T, V)),
        mx.array(targets),
        mx.array(mask),
        "cvar",
    )
    chosen, rejected = L.split_pairs(s)
    value, _ = L.preference_loss(chosen, rejected, loss, 0.1, 0.5, sft_weight=2.0)
    per_tok = ref.token_values(policy, ref_logits, targets.reshape(-1), "cvar", 0.95)
    per_seq = (per_tok.reshape(2 * P, T, 3) * mask[..., None]).sum(1)
    logq = np.array(
        [ref.log_softmax(a)[y] for a, y in zip(policy, targets.reshape(-1))]
    ).reshape(2 * P, T)
    logprob = (logq * mask).sum(1)
    m, d, n = per_seq[:, 0], per_seq[:, 2], mask.sum(1)
    want = ref.objective(
        m[:P], m[P:], d[:P], d[P:], loss, 0.1, 0.5, 2.0, logprob[:P], n[:P]
    )
    assert math.isclose(value.item(), want, rel_tol=1e-5)
