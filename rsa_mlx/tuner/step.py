"""One compiled training step for every loss of docs/method.md §3.

The step runs the reference policy (the same network with the stage's
adapter switched off, under stop-gradient) and the policy on one
``[chosen; rejected]`` batch, computes the sequence statistics at response
positions only, the preference loss and its gradient, accumulates gradients
over micro-batches and, on the last one, clips them and updates AdamW.
Metrics stay on device; nothing in the step touches the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
from mlx.utils import tree_map

from rsa_mlx.ops.losses import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_LOSS,
    preference_loss,
    split_pairs,
)
from rsa_mlx.ops.risk import DEFAULT_MEASURE, segment_stats
from rsa_mlx.tuner.adapters import disabled
from rsa_mlx.tuner.model import ResponseLogits


@dataclass(frozen=True)
class Objective:
    """What one stage optimises (docs/method.md §3): loss, risk measure and constants."""

    loss: str = DEFAULT_LOSS
    risk: str = DEFAULT_MEASURE
    mu: float | None = None
    beta: float = DEFAULT_BETA
    alpha: float = DEFAULT_ALPHA
    length_normalize: bool = False
    sft_weight: float = 0.0  # NLL term on the chosen answer (RPO)


def pair_loss(logits, ref_logits, targets, segments, mask, num_sequences, objective):
    """Mean preference loss and metrics of a ``[chosen; rejected]`` batch
    whose scored positions are packed (see :class:`rsa_mlx.tuner.data.Batch`).

    DPO's loss has no risk term, so its step computes none (a tail measure
    only a metric would show costs as much as RSA's risk: CVaR's exact
    threshold alone is 32 passes over the vocabulary) and reports none: its
    metrics have the sequential KL as ``kl/*`` and no ``risk/*``, whatever
    ``risk`` says.
    """
    dpo = objective.loss == "dpo"
    stats = segment_stats(
        logits,
        ref_logits,
        targets,
        segments,
        mask,
        num_sequences,
        "kl" if dpo else objective.risk,
        None if dpo else objective.mu,
        objective.length_normalize,
        risk_grad=not dpo,  # DPO's gradient is the log-ratio's alone
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


def make_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    layers: list[nn.Module],
    objective: Objective,
    grad_accumulation_steps: int = 1,
    max_grad_norm: float | None = 1.0,
    compile: bool = True,
    forward: ResponseLogits | None = None,
    data_parallel: bool = False,
):
    """Build ``step(batch, prev_grad, do_update) -> (metrics, grad)``.

    ``batch`` is :meth:`rsa_mlx.tuner.data.Batch.arrays`: ``(tokens, index,
    targets, segments, mask)``, and with ``data_parallel`` the shard's
    ``weight`` after them: the rank's gradient is scaled by it at every
    micro-batch and, on the update, averaged over the process group (the
    global per-pair mean, with mlx's ``average_gradients``) before
    clipping, so every rank applies the same update. Metrics stay the
    shard's own. ``layers`` are the trainable adapter layers (switched off
    for the reference). Call it after the adapters exist: the compiled
    function captures ``model.state`` as it is then.
    """
    if grad_accumulation_steps < 1:
        raise ValueError("grad_accumulation_steps must be at least 1")
    forward = forward or ResponseLogits(model)

    def loss_fn(model, tokens, index, targets, segments, mask, ref_logits):
        logits = forward(tokens, index)
        return pair_loss(
            logits, ref_logits, targets, segments, mask, tokens.shape[0], objective
        )

    value_and_grad = nn.value_and_grad(model, loss_fn)

    def step(batch, prev_grad, do_update):
        if data_parallel:
            batch, weight = batch[:5], batch[5]
        tokens, index = batch[0], batch[1]
        with disabled(layers):
            ref_logits = mx.stop_gradient(forward(tokens, index))
        (_, metrics), grad = value_and_grad(model, *batch, ref_logits)
        if data_parallel:
            grad = tree_map(lambda g: g * weight.astype(g.dtype), grad)
        if prev_grad is not None:
            grad = tree_map(lambda g, p: g + p, grad, prev_grad)
        if do_update:
            if data_parallel:  # one all-reduce per update, not per micro-batch
                grad = average_gradients(grad)
            if grad_accumulation_steps > 1:
                grad = tree_map(lambda g: g / grad_accumulation_steps, grad)
            if max_grad_norm:
                grad, norm = optim.clip_grad_norm(grad, max_grad_norm)
                metrics = {**metrics, "grad_norm": norm}
            optimizer.update(model, grad)
            grad = None
        return metrics, grad

    if not compile:
        return step
    state = [model.state, optimizer.state, mx.random.state]
    return partial(mx.compile, inputs=state, outputs=state)(step)


def make_eval(layers: list[nn.Module], objective: Objective, forward: ResponseLogits):
    """``evaluate(batch) -> metrics`` without gradients (validation)."""

    def evaluate(batch):
        tokens, index, targets, segments, mask = batch[:5]
        with disabled(layers):
            ref_logits = forward(tokens, index)
        logits = forward(tokens, index)
        return pair_loss(
            logits, ref_logits, targets, segments, mask, tokens.shape[0], objective
        )[1]

    return evaluate
