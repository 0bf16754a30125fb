"""Independent float64 NumPy reference for docs/method.md §2-§3, brute force on purpose.

Written from docs/method.md, not from rsa_mlx: explicit sums, full sorts, plain
loops over rows. Entries whose reference logit is -inf have p = 0 and are left
out of every sum (they contribute 0).
"""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    m = np.max(np.where(finite, x, -np.inf))
    s = np.sum(np.exp(x[finite] - m))
    out = np.full_like(x, -np.inf)
    out[finite] = x[finite] - m - np.log(s)
    return out


def _row(policy_row, ref_row):
    """(p, Z) over the reference support of one position."""
    lp, z = _log_row(policy_row, ref_row)
    return np.exp(lp), z


def _log_row(policy_row, ref_row):
    """(log p, Z) over the reference support: log p stays exact where p
    underflows even float64 (logits in the hundreds)."""
    lp, lq = log_softmax(ref_row), log_softmax(policy_row)
    support = np.isfinite(lp)
    return lp[support], lp[support] - lq[support]


def kl(p, z):
    return float(np.sum(p * z))


def cvar(p, z, mu):
    """Mean of Z over the upper mu-fraction of p-mass, boundary entry split."""
    order = np.argsort(-z, kind="stable")
    zs, ps = z[order], p[order] / np.sum(p)
    total, taken = 0.0, 0.0
    for zi, pi in zip(zs, ps):
        share = min(pi, mu - taken)
        if share <= 0:
            break
        total += share * zi
        taken += share
    return total / mu


def cvar_weights(p, z, mu):
    """The envelope weights w (sum 1) with cvar = sum w z."""
    order = np.argsort(-z, kind="stable")
    w = np.zeros_like(p)
    ps = p / np.sum(p)
    taken = 0.0
    for i in order:
        share = min(ps[i], mu - taken)
        if share <= 0:
            break
        w[i] = share / mu
        taken += share
    return w


def erm(log_p, z, mu):
    """(1/mu) log sum p exp(mu z), in log space, shifted to avoid overflow."""
    a = log_p + mu * z
    m = np.max(a)
    return float((m + np.log(np.sum(np.exp(a - m)))) / mu)


def renyi(p, q, alpha):
    """Rényi divergence D_alpha(p || q) = 1/(alpha-1) log sum p^alpha q^(1-alpha)."""
    la = alpha * np.log(p) + (1 - alpha) * np.log(q)
    m = np.max(la)
    return float((m + np.log(np.sum(np.exp(la - m)))) / (alpha - 1))


def truncated_threshold(z_all, mu):
    """Unweighted (1-mu)-quantile of all V values, -inf for masked entries."""
    s = np.sort(z_all)
    h = (len(s) - 1) * (1 - mu)
    lo, hi = int(np.floor(h)), int(np.ceil(h))
    if s[lo] == -np.inf:
        return -np.inf
    return s[lo] + (h - lo) * (s[hi] - s[lo])


def truncated(policy_row, ref_row, mu, threshold=None):
    lp, lq = log_softmax(ref_row), log_softmax(policy_row)
    z_all = np.where(np.isfinite(lp), lp - np.where(np.isfinite(lp), lq, 0), -np.inf)
    q_thr = truncated_threshold(z_all, mu) if threshold is None else threshold
    keep = np.isfinite(lp) & (z_all > q_thr)
    return float(np.sum(np.exp(lp[keep]) * z_all[keep])), q_thr


def risk(policy_row, ref_row, measure, mu=None):
    p, z = _row(policy_row, ref_row)
    if measure == "kl":
        return kl(p, z)
    if measure == "cvar":
        return cvar(p, z, mu)
    if measure == "erm":
        return erm(_log_row(policy_row, ref_row)[0], z, mu)
    return truncated(policy_row, ref_row, mu)[0]


def _weights(p, z, measure, mu, log_p=None):
    if measure == "cvar":
        return cvar_weights(p, z, mu)
    if measure == "erm":
        a = (np.log(p) if log_p is None else log_p) + mu * z
        w = np.exp(a - np.max(a))
        return w / w.sum()
    return p


def risk_scale(policy_row, ref_row, measure, mu=None):
    """Size of the summed terms, sum w |Z|: a float32 sum whose terms cancel
    cannot be more accurate than about eps times this."""
    lp, z = _log_row(policy_row, ref_row)
    return float(np.sum(_weights(np.exp(lp), z, measure, mu, lp) * np.abs(z)))


def float32_floor(policy_row, ref_row, measure, mu=None):
    """eps32 * sum w (|log p| + |log q|): the error that float32 log-probabilities
    (docs/method.md §2: log-softmax in float32) put into Z = log p - log q, weighted."""
    lp, lq = log_softmax(ref_row), log_softmax(policy_row)
    support = np.isfinite(lp)
    log_p, z = _log_row(policy_row, ref_row)
    size = np.abs(lp[support]) + np.abs(lq[support])
    w = _weights(np.exp(log_p), z, measure, mu, log_p)
    return float(2.0**-23 * np.sum(w * size))


def token_values(policy, ref, targets, measure, mu=None):
    """(logratio, kl, risk) for rows of [n, V] logits, one row at a time."""
    out = []
    for a, b, y in zip(policy, ref, targets):
        lq, lp = log_softmax(a), log_softmax(b)
        p, z = _row(a, b)
        out.append((lq[y] - lp[y], kl(p, z), risk(a, b, measure, mu)))
    return np.array(out, dtype=np.float64).reshape(-1, 3)


def preference_loss(m_w, m_l, d_w, d_l, loss, beta, alpha):
    u = m_w - m_l
    if loss == "dpo":
        z = beta * u
    elif loss == "variant1":
        z = beta * (u - (d_l - d_w))
    else:
        z = beta * (u - alpha * (d_l - d_w))
    return np.log1p(np.exp(-z)), z


def chosen_nll(logprob_w, n_w):
    """Per-pair NLL per token of the chosen answer (RPO), ``-log pi / |y|``."""
    n = np.maximum(np.asarray(n_w, np.float64), 1.0)
    return -np.asarray(logprob_w, np.float64) / n


def objective(m_w, m_l, d_w, d_l, loss, beta, alpha, sft_weight, logprob_w, n_w):
    """Mean preference loss plus the weighted NLL term, float64."""
    losses, _ = preference_loss(m_w, m_l, d_w, d_l, loss, beta, alpha)
    return losses.mean() + sft_weight * chosen_nll(logprob_w, n_w).mean()
