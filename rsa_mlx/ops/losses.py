"""Preference losses on per-sequence statistics (docs/method.md §3).

For a pair (chosen w, rejected l) with sequence log-ratios ``m`` and
sequential risks ``D`` (:func:`rsa_mlx.ops.risk.sequence_stats`)::

    u     = m(x, y_w) - m(x, y_l)
    delta = D(x, y_l) - D(x, y_w)

    dpo:       -log sigmoid(beta * u)
    variant1:  -log sigmoid(beta * (u - delta))                        TDPO1 / Ra-DPO1
    variant2:  -log sigmoid(beta * (u - alpha * (D_l - sg(D_w))))      TDPO2 / Ra-DPO2

``sg`` is stop-gradient. With ``risk=kl`` the variants are TDPO1/2; with
``risk=cvar|erm`` they are Ra-DPO1/2, which RSA uses in each stage.

Any of them may add an NLL term on the chosen answer (RPO, Pang et al.
2024), weighted by ``sft_weight``::

    nll_w = -log pi(y_w | x) / |y_w|        (per token, per pair)
    loss  = mean_pairs(-log sigmoid(z)) + sft_weight * mean_pairs(nll_w)

It keeps the chosen answers likely while the pair's margin grows: without it
DPO can fit its pairs mostly by pushing both answers down.
"""

from __future__ import annotations

from typing import Literal

import mlx.core as mx

from rsa_mlx.ops.risk import SequenceStats

Loss = Literal["dpo", "variant1", "variant2"]
__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_LOSS",
    "LOSSES",
    "METRIC_KEYS",
    "check_loss",
    "chosen_nll",
    "loss_logits",
    "metric_keys",
    "preference_loss",
    "split_pairs",
]

LOSSES: tuple[str, ...] = ("dpo", "variant1", "variant2")
# docs/method.md §3 defaults (Ra-DPO, SACPO); TrainConfig and Objective take them from here.
DEFAULT_LOSS, DEFAULT_BETA, DEFAULT_ALPHA = "variant2", 0.1, 0.5


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")
    return loss


def loss_logits(
    chosen: SequenceStats,
    rejected: SequenceStats,
    loss: Loss = DEFAULT_LOSS,
    beta: float = DEFAULT_BETA,
    alpha: float = DEFAULT_ALPHA,
) -> mx.array:
    """Per-pair logit ``z`` of the loss ``-log sigmoid(z)``, shape ``[P]``.

    ``dpo``: ``beta u``; ``variant1``: ``beta (u - delta)``;
    ``variant2``: ``beta (u - alpha (D_l - sg(D_w)))`` (see module docstring).
    """
    check_loss(loss)
    u = chosen.logratio - rejected.logratio
    if loss == "dpo":
        return beta * u
    if loss == "variant1":
        return beta * (u - (rejected.risk - chosen.risk))
    return beta * (u - alpha * (rejected.risk - mx.stop_gradient(chosen.risk)))


def chosen_nll(chosen: SequenceStats) -> mx.array:
    """Per-pair NLL of the chosen answer per token, ``-log pi(y_w|x) / |y_w|``
    (0 for an answer with no tokens)."""
    return -chosen.logprob / mx.maximum(chosen.ntokens, 1).astype(mx.float32)


def preference_loss(
    chosen: SequenceStats,
    rejected: SequenceStats,
    loss: Loss = DEFAULT_LOSS,
    beta: float = DEFAULT_BETA,
    alpha: float = DEFAULT_ALPHA,
    sft_weight: float = 0.0,
) -> tuple[mx.array, dict[str, mx.array]]:
    """Mean preference loss and its metrics::

        mean_pairs(-log sigmoid(z)) + sft_weight * mean_pairs(nll_w)

    ``z`` is :func:`loss_logits`, ``nll_w`` is :func:`chosen_nll` (the NLL
    term is skipped, not multiplied by 0, when ``sft_weight`` is 0). Every
    metric is a mean over pairs of a per-pair value (never a ratio of batch
    means):

    * ``loss``; ``accuracy``: fraction of pairs with ``z > 0``;
    * ``rewards/chosen|rejected``: ``beta m``; ``margins``: ``beta u``;
    * ``risk/chosen|rejected``: ``D``, the risk the loss uses (variant1 and
      variant2 only: DPO's loss has none, so it reports none);
    * ``kl/chosen|rejected``: the sequential KL, the monitor of every loss;
    * ``ntokens/chosen|rejected``: response tokens per sequence;
    * ``nll/chosen``: the chosen answers' NLL per token (always reported).

    The keys, in order, are :func:`metric_keys` of ``loss``. ``beta`` is the
    stage's temperature (stage 2: ``beta / lambda``).
    """
    z = loss_logits(chosen, rejected, loss, beta, alpha)
    losses = mx.logaddexp(0.0, -z)  # -log sigmoid(z), stable for large |z|
    nll = chosen_nll(chosen)
    mean = losses.mean()
    if sft_weight:
        # (w * nll).mean(), not w * nll.mean(): a compiled step fails in MLX
        # 0.32 when a metric's stop_gradient input is itself on the gradient
        # path ("_Map_base::at"), and "nll/chosen" below is nll.mean().
        mean = mean + (sft_weight * nll).mean()
    reward_w, reward_l = beta * chosen.logratio, beta * rejected.logratio
    metrics = {
        "loss": mean,
        "accuracy": (z > 0).astype(mx.float32).mean(),
        "rewards/chosen": reward_w.mean(),
        "rewards/rejected": reward_l.mean(),
        "margins": (reward_w - reward_l).mean(),
    }
    if loss != "dpo":  # only a loss with a risk term reports the risk
        metrics["risk/chosen"] = chosen.risk.mean()
        metrics["risk/rejected"] = rejected.risk.mean()
    metrics.update(
        {
            "kl/chosen": chosen.kl.mean(),
            "kl/rejected": rejected.kl.mean(),
            "ntokens/chosen": chosen.ntokens.astype(mx.float32).mean(),
            "ntokens/rejected": rejected.ntokens.astype(mx.float32).mean(),
            "nll/chosen": nll.mean(),
        }
    )
    return mean, {k: mx.stop_gradient(v) for k, v in metrics.items()}


# Every metric of :func:`preference_loss`, in its order (see metric_keys).
METRIC_KEYS = (
    "loss",
    "accuracy",
    "rewards/chosen",
    "rewards/rejected",
    "margins",
    "risk/chosen",
    "risk/rejected",
    "kl/chosen",
    "kl/rejected",
    "ntokens/chosen",
    "ntokens/rejected",
    "nll/chosen",
)


def metric_keys(loss: str) -> tuple[str, ...]:
    """The metrics :func:`preference_loss` reports for ``loss``, in order:
    all of :data:`METRIC_KEYS`, except ``risk/*`` for DPO (no risk term)."""
    check_loss(loss)
    risk = loss != "dpo"
    return tuple(k for k in METRIC_KEYS if risk or not k.startswith("risk/"))


def split_pairs(stats: SequenceStats) -> tuple[SequenceStats, SequenceStats]:
    """Split statistics of a ``[chosen; rejected]`` batch into the two halves."""
    half = stats.logratio.shape[0] // 2
    return (
        SequenceStats(*(x[:half] for x in stats)),
        SequenceStats(*(x[half:] for x in stats)),
    )
