"""Token sampling from logits with one uniform number per row.

``mx.random.categorical`` draws a Gumbel variable per vocabulary entry:
a uniform and two logs for each of the ~50k entries of every row, on MLX's
one-thread CPU kernels (~12 ns per ``log``). The inverse CDF needs one
uniform per row: with ``p_i = exp((l_i - max l) / T)`` (unnormalised, by
:func:`rsa_mlx.ops.fastmath.exp_poly`) and ``C_i = p_0 + ... + p_i``,

    token = min { i : C_i > u C_{V-1} },   u ~ U[0, 1),

which is token ``i`` with probability ``p_i / sum(p)``: the softmax of
``l / T``, the distribution ``categorical`` samples.

The prefix sums run in two levels (blocks of :data:`BLOCK` entries, then
within the chosen block), so a token's probability is off by float32
rounding of its block's mass rather than of the row's total: a one-level
float32 ``cumsum`` over 49k entries moves tail tokens' probabilities by
tens of percent.
"""

from __future__ import annotations

import mlx.core as mx

from rsa_mlx.ops.fastmath import exp_poly

__all__ = ["BLOCK", "greedy", "inverse_cdf", "sample"]

BLOCK = 256


def greedy(logits: mx.array) -> mx.array:
    """``argmax_i l_i`` per row (temperature 0), uint32 as mlx-lm's."""
    return mx.argmax(logits, axis=-1).astype(mx.uint32)


def _first_above(cumulative: mx.array, threshold: mx.array) -> mx.array:
    """``min {i : C_i > t}`` per row: the count of ``C_i <= t``."""
    return (cumulative <= threshold).astype(mx.int32).sum(-1)


def inverse_cdf(weights: mx.array, u: mx.array) -> mx.array:
    """Index ``i`` drawn with probability ``w_i / sum(w)`` per row, from one
    uniform ``u`` in [0, 1) per row: ``min {i : C_i > u C_{V-1}}``.

    ``weights``: [B, V], non-negative float32, each row with a positive
    entry; ``u``: [B]. Two levels: the block ``k`` whose prefix sums of
    block masses ``S_k`` pass ``t = u S_last``, then, within it, the entry
    whose prefix sum passes ``t - S_{k-1}``. An entry of weight 0 is never
    drawn (rounding is clamped to the block's last positive entry).
    """
    rows, vocab = weights.shape
    blocks = -(-vocab // BLOCK)
    if blocks * BLOCK != vocab:  # pad with zero weights: never drawn
        weights = mx.pad(weights, [(0, 0), (0, blocks * BLOCK - vocab)])
    grid = weights.reshape(rows, blocks, BLOCK)
    mass = grid.sum(-1)  # [B, blocks]
    upto = mx.cumsum(mass, axis=-1)
    t = u.astype(mx.float32) * upto[:, -1]
    k = mx.minimum(_first_above(upto, t[:, None]), blocks - 1)
    # the last block with mass, in case rounding put t past every S_k
    last = blocks - 1 - mx.argmax((mass > 0)[:, ::-1], axis=-1)
    k = mx.minimum(k, last)[:, None]
    before = mx.take_along_axis(upto, k, axis=-1) - mx.take_along_axis(mass, k, axis=-1)
    inside = mx.take_along_axis(grid, k[..., None], axis=1)[:, 0]  # [B, BLOCK]
    within = mx.cumsum(inside, axis=-1)
    j = _first_above(within, t[:, None] - before)
    j = mx.minimum(j, BLOCK - 1 - mx.argmax((inside > 0)[:, ::-1], axis=-1))
    return (k[:, 0] * BLOCK + j).astype(mx.uint32)


def sample(logits: mx.array, u: mx.array, temperature: float) -> mx.array:
    """A token per row from ``softmax(logits / T)``, ``T = temperature``,
    by :func:`inverse_cdf` on ``exp((l - max l) / T)``; argmax at ``T = 0``.

    ``u``: [B] uniforms in [0, 1) (unused at ``T = 0``). Logits of
    ``-inf`` (a top-p mask) get weight 0.
    """
    if temperature == 0:
        return greedy(logits)
    logits = logits.astype(mx.float32)
    shifted = (logits - logits.max(-1, keepdims=True)) * (1.0 / temperature)
    # exp_poly is exactly 0 below -88 (and for -inf): masked entries stay 0
    return inverse_cdf(exp_poly(shifted), u)
