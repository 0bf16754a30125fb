"""Micro-benchmark of the ways to find CVaR's threshold on one row chunk.

    python benchmarks/bench_threshold.py            # 32 rows x 32000, ns per entry

Each candidate is compiled and timed alone on one chunk (the size
:mod:`rsa_mlx.ops.risk` processes at once), median of 7 after 2 warm-ups,
with the load average printed alongside: absolute times drift on a shared
machine, compare rows of one run. The candidates: one bisection pass, the
full 32-pass bisection, K thresholds per pass (broadcast compare, summed or
through a matrix product), and the selection primitives a compacting finish
would need (sort, topk, partition, scatter-add histogram, cumsum).
"""

from __future__ import annotations

import os
import statistics
import time

import rsa_mlx  # noqa: F401  (first: loads the fast BLAS before mlx)

# isort: split
import mlx.core as mx

from rsa_mlx.ops import kernels as K

ROWS, VOCAB = 32, 32000
BLOCK, _ = K.block_plan(VOCAB)


def inputs():
    mx.random.seed(0)
    a = mx.random.normal((ROWS, VOCAB)) * 2.0
    b = a + 0.5 * mx.random.normal((ROWS, VOCAB))
    lq = K._log_softmax(a, BLOCK)[0]
    lp = K._log_softmax(b, BLOCK)[0]
    z, p = lp - lq, mx.exp(lp)
    mx.eval(z, p)
    return z, p


def bench(name, fn, *args, repeats=7):
    fn = mx.compile(fn)
    for _ in range(2):
        mx.eval(fn(*args))
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - tic)
    t = statistics.median(times)
    print(
        f"{name:36s} {t * 1e3:8.2f} ms {t / (ROWS * VOCAB) * 1e9:7.2f} ns/entry"
        f"   load {os.getloadavg()[0]:.2f}",
        flush=True,
    )


def k_thresholds(z, p, t):
    """Masses below K thresholds at once: [c, V, K] compare, then a product."""
    ind = (z[:, :, None] < t[:, None, :]).astype(mx.float32)
    return (p[:, None, :] @ ind)[:, 0]


def main():
    z, p = inputs()
    t1 = mx.full((ROWS, 1), -0.5)
    mass = K.bsum(p, BLOCK)
    bench("1 bisection pass", lambda z, p, t: K.bsum(p * (z < t), BLOCK), z, p, t1)
    bench(
        "32-pass bisection",
        lambda z, p: K._cvar_boundary(z, p, mass, 0.95, BLOCK),
        z,
        p,
    )
    for k in (8, 16, 32):
        tk = mx.linspace(-3.0, 1.0, k)[None, :] + mx.zeros((ROWS, 1))
        bench(f"{k} thresholds, one pass", k_thresholds, z, p, tk)
    bench("sort", lambda z: mx.sort(z, -1), z)
    for k in (16, 2048):
        bench(f"topk {k}", lambda z, k=k: mx.topk(z, k, -1), z)
    bench("partition", lambda z: mx.partition(z, VOCAB // 20, -1), z)
    bench("cumsum", lambda z: mx.cumsum(z, -1), z)
    bins = mx.clip(((z + 10.0) * 12.8).astype(mx.int32), 0, 255)
    bins = bins + mx.arange(ROWS)[:, None] * 256
    flat = mx.zeros((ROWS * 256,))
    bench(
        "scatter-add, 256 bins",
        lambda i, p: flat.at[i.reshape(-1)].add(p.reshape(-1)),
        bins,
        p,
    )


if __name__ == "__main__":
    main()
