"""The lean step computes what the straightforward construction computes.

The step's vocabulary work (``rsa_mlx.ops.kernels``) shares passes between
quantities (one ``exp`` per row gives both the log-softmax and the
reference probabilities), and DPO computes no tail risk for a metric (it
reports the sequential KL as ``kl/*`` and no ``risk/*``). Here every loss
and measure is checked against a dense float32 construction written the
plain way (full log-softmax of both models, ``p = exp(log p)``, the risk
from its definition with the threshold from a sort), on packed logits and
through the whole compiled training step of a tiny model: the same loss,
metrics and gradients to float32 tolerance.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_load

from rsa_mlx.ops.losses import LOSSES, metric_keys, preference_loss, split_pairs
from rsa_mlx.ops.risk import DEFAULT_MU, MEASURES, SequenceStats
from rsa_mlx.tuner import adapters, data
from rsa_mlx.tuner.adapters import disabled
from rsa_mlx.tuner.step import Objective, make_step, pair_loss
from tests.tiny import pku_rows, write_jsonl, write_model


def _cvar_weights(z: np.ndarray, p: np.ndarray, mu: float) -> np.ndarray:
    """Envelope weights of CVaR_mu (upper mu-fraction of p's mass), by sort."""
    w = np.zeros_like(p)
    for i in range(z.shape[0]):
        order = np.argsort(-z[i], kind="stable")
        target = mu * p[i].sum()
        above = 0.0
        for j in order:
            take = min(p[i, j], target - above)
            if take <= 0:
                break
            w[i, j] = take / target
            above += take
    return w


def _truncated_weights(z: np.ndarray, p: np.ndarray, mu: float) -> np.ndarray:
    q = np.quantile(z, 1.0 - mu, axis=-1, keepdims=True)
    return p * (z > q)


def dense_stats(a, b, y, measure, mu):
    """Per-position (logratio, kl, risk, log q(y)), written the plain way."""
    lq = a - mx.logsumexp(a, axis=-1, keepdims=True)
    lp = mx.stop_gradient(b - mx.logsumexp(b, axis=-1, keepdims=True))
    p = mx.exp(lp)
    z = lp - lq
    logratio = mx.take_along_axis(lq - lp, y[:, None], axis=-1)[:, 0]
    kl = (p * z).sum(-1)
    if measure == "kl":
        risk = kl
    elif measure == "erm":
        risk = mx.logsumexp(lp + mu * z, axis=-1) / mu
    else:  # cvar / truncated: the threshold is a constant (stop-gradient)
        zn, pn = np.array(z, np.float64), np.array(p, np.float64)
        w = (_cvar_weights if measure == "cvar" else _truncated_weights)(zn, pn, mu)
        risk = (mx.array(w.astype(np.float32)) * z).sum(-1)
    logprob = mx.take_along_axis(lq, y[:, None], axis=-1)[:, 0]
    return logratio, mx.stop_gradient(kl), risk, logprob


def dense_pair_loss(logits, ref_logits, targets, segments, mask, n_seq, objective):
    dpo = objective.loss == "dpo"
    measure = "kl" if dpo else objective.risk
    mu = None if dpo else (objective.mu or DEFAULT_MU[measure])
    lr, kl, risk, logprob = dense_stats(logits, ref_logits, targets, measure, mu)
    if dpo:
        risk = mx.stop_gradient(risk)
    member = (segments[:, None] == mx.arange(n_seq)[None, :]) & mask[:, None]
    weights = member.astype(mx.float32)
    stats = SequenceStats(
        lr @ weights,
        kl @ weights,
        risk @ weights,
        member.sum(0).astype(mx.int32),
        logprob @ weights,
    )
    chosen, rejected = split_pairs(stats)
    return preference_loss(
        chosen,
        rejected,
        objective.loss,
        objective.beta,
        objective.alpha,
        objective.sft_weight,
    )


def packed(n=72, vocab=300, n_seq=4, seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n, vocab)) * 2.0
    pol = ref + rng.normal(size=(n, vocab)) * 0.5
    targets = rng.integers(0, vocab, n)
    segments = np.sort(rng.integers(0, n_seq, n))
    mask = np.arange(n) < n - 7  # the bucket's padding rows at the end
    return (
        mx.array(pol, mx.float32),
        mx.array(ref, mx.float32),
        mx.array(targets, mx.int32),
        mx.array(segments, mx.int32),
        mx.array(mask),
    )


def close(a, b, rtol=2e-4, atol=2e-5):
    a, b = np.array(a, np.float64), np.array(b, np.float64)
    scale = max(1.0, float(np.abs(b).max(initial=0.0)))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
@pytest.mark.parametrize("vocab", [300, 1000])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("measure", MEASURES)
def test_pair_loss_matches_dense(loss, measure, vocab, sft_weight):
    logits, ref, targets, segments, mask = packed(vocab=vocab)
    objective = Objective(loss, measure, beta=0.5, sft_weight=sft_weight)
    args = (ref, targets, segments, mask, 4, objective)
    value, metrics = pair_loss(logits, *args)
    want, want_metrics = dense_pair_loss(logits, *args)
    assert tuple(metrics) == metric_keys(loss)
    close(value, want)
    for key in metric_keys(loss):
        close(metrics[key], want_metrics[key], atol=1e-4)
    if loss == "dpo":  # DPO reports the sequential KL, and as the KL only
        assert not any(k.startswith("risk/") for k in metrics)
    grad = mx.grad(lambda lg: pair_loss(lg, *args)[0])(logits)
    want_grad = mx.grad(lambda lg: dense_pair_loss(lg, *args)[0])(logits)
    close(grad, want_grad, rtol=1e-3, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean")
    write_model(root / "model", chat=True, tied=True)
    write_jsonl(root / "data" / "train.jsonl", pku_rows(8))
    return root


@pytest.mark.parametrize("sft_weight", [0.0, 1.0])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("measure", MEASURES)
def test_step_gradient_matches_dense(tiny, loss, measure, sft_weight):
    model, tok = mlx_load(str(tiny / "model"))
    mx.random.seed(0)
    layers = adapters.add_adapter(model, adapters.LoRAConfig(num_layers=-1))
    for layer in layers:  # a trained-looking adapter: policy != reference
        layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape)
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(model.trainable_parameters())
    pairs, _ = data.load_pairs(tiny / "data", "reward")
    batch = next(iter(data.BatchSampler(data.encode_pairs(pairs, tok, 128), 4)))
    arrays = batch.arrays()
    objective = Objective(loss, measure, beta=0.5, sft_weight=sft_weight)
    step = make_step(model, optimizer, layers, objective, max_grad_norm=None)
    metrics, grad = step(arrays, None, False)  # no update: the gradient back

    tokens, index, targets, segments, mask = arrays

    def full(model):  # full logits, then the scored rows
        logits = model(tokens)
        return mx.take(logits.reshape(-1, logits.shape[-1]), index, axis=0)

    def dense_loss(model):
        with disabled(layers):
            ref = mx.stop_gradient(full(model))
        return dense_pair_loss(
            full(model), ref, targets, segments, mask, tokens.shape[0], objective
        )

    (want, want_metrics), want_grad = nn.value_and_grad(model, dense_loss)(model)
    close(metrics["loss"], want)
    for key in metric_keys(loss):
        close(metrics[key], want_metrics[key], atol=1e-4)
    got = dict(tree_flatten(grad))
    ref_grad = dict(tree_flatten(want_grad))
    assert got.keys() == ref_grad.keys()
    norm = max(float(mx.abs(g).max()) for g in ref_grad.values())
    assert norm > 0
    for name in got:
        close(got[name], ref_grad[name], rtol=2e-3, atol=1e-4 * norm / max(1.0, norm))


def test_dpo_reports_its_kl_as_kl_only_and_variant2_its_risk(tiny):
    """A DPO step's KL monitor is ``kl/*`` and nothing else (its loss has no
    risk); a variant2 step reports ``risk/*``, and with cvar that is the
    CVaR of its definition, not the KL."""
    model, tok = mlx_load(str(tiny / "model"))
    mx.random.seed(0)
    layers = adapters.add_adapter(model, adapters.LoRAConfig(num_layers=-1))
    for layer in layers:  # a little trained: policy near, not at, the reference
        layer.lora_b = 0.002 * mx.random.normal(layer.lora_b.shape)
    pairs, _ = data.load_pairs(tiny / "data", "reward")
    batch = next(iter(data.BatchSampler(data.encode_pairs(pairs, tok, 128), 4)))
    arrays = batch.arrays()
    tokens, index, targets, segments, mask = arrays

    def metrics_of(objective):
        optimizer = optim.AdamW(learning_rate=1e-3)
        optimizer.init(model.trainable_parameters())
        step = make_step(model, optimizer, layers, objective, max_grad_norm=None)
        return step(arrays, None, False)[0]

    dpo = metrics_of(Objective("dpo", "cvar", 0.5, beta=0.5))
    assert not [k for k in dpo if k.startswith("risk")]
    assert {"kl/chosen", "kl/rejected"} <= set(dpo)

    objective = Objective("variant2", "cvar", 0.5, beta=0.5)
    rsa = metrics_of(objective)
    with disabled(layers):
        ref = model(tokens)
    logits = mx.take(model(tokens).reshape(-1, ref.shape[-1]), index, axis=0)
    ref = mx.take(ref.reshape(-1, ref.shape[-1]), index, axis=0)
    _, want = dense_pair_loss(
        logits, ref, targets, segments, mask, tokens.shape[0], objective
    )
    for side in ("chosen", "rejected"):
        close(rsa[f"risk/{side}"], want[f"risk/{side}"], rtol=1e-3, atol=2e-5)
        close(rsa[f"kl/{side}"], dpo[f"kl/{side}"])  # the same KL monitor
        risk, kl = rsa[f"risk/{side}"].item(), rsa[f"kl/{side}"].item()
        assert risk > 2 * kl > 0, (side, risk, kl)  # CVaR_0.5 is not the KL
