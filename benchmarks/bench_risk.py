"""Time and peak memory of the token-level risk operators, as ratios to kl.

    python benchmarks/bench_risk.py                 # B=4, T=256, V in {32000, 151936}
    python benchmarks/bench_risk.py --vocab 32000 --repeats 5

For each vocabulary size and measure it times, side by side in one run,

* ``fwd``:     sequence statistics (log-ratio, KL, risk) for B x T positions;
* ``fwd+bwd``: the same plus the gradient w.r.t. the policy logits,

both inside ``mx.compile`` as in training, and records the peak memory of
each case (``mx.reset_peak_memory`` before each). ``work`` is the peak minus
the memory the inputs already hold. Cases are timed round-robin and ratios
are to ``kl`` in the same run, so they hold on a noisy shared machine where
absolute times drift.
"""

from __future__ import annotations

import argparse
import statistics
import time

import rsa_mlx  # noqa: F401  (first: loads the fast BLAS before mlx)

# isort: split
import mlx.core as mx

from rsa_mlx.ops.risk import MEASURES, sequence_stats


def make_inputs(batch: int, length: int, vocab: int, seed: int = 0):
    mx.random.seed(seed)
    policy = mx.random.normal((batch, length, vocab)) * 2.0
    ref = policy + 0.5 * mx.random.normal((batch, length, vocab))
    targets = mx.random.randint(0, vocab, (batch, length))
    mask = mx.ones((batch, length), dtype=mx.bool_)
    mx.eval(policy, ref, targets, mask)
    return policy, ref, targets, mask


def build(measure: str, backward: bool):
    def objective(policy, ref, targets, mask):
        s = sequence_stats(policy, ref, targets, mask, measure)
        return (s.logratio + s.risk).sum(), s.kl

    if backward:
        grad_fn = mx.value_and_grad(lambda p, r, t, m: objective(p, r, t, m)[0])
        return mx.compile(grad_fn)
    return mx.compile(objective)


def measure_cases(cases: dict, inputs, repeats: int) -> dict:
    """Peak memory one case at a time, then times round-robin over cases.

    Interleaving (every case once, then again, ...) means drift on a shared
    machine affects all cases alike; each time is the median of ``repeats``.
    """
    memory = {}
    for name, fn in cases.items():
        mx.eval(fn(*inputs))  # trace and warm up
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(fn(*inputs))
        memory[name] = mx.get_peak_memory()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            tic = time.perf_counter()
            mx.eval(fn(*inputs))
            times[name].append(time.perf_counter() - tic)
    return {name: (statistics.median(times[name]), memory[name]) for name in cases}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--measures", nargs="+", default=list(MEASURES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    gb = 1e9
    print(f"mlx {mx.__version__}, device {mx.default_device()}")
    print(f"B={args.batch} T={args.length}, compiled, median of {args.repeats}")
    for vocab in args.vocab:
        inputs = make_inputs(args.batch, args.length, vocab)
        held = sum(x.nbytes for x in inputs)
        cases = {(m, b): build(m, b) for m in args.measures for b in (False, True)}
        rows = measure_cases(cases, inputs, args.repeats)
        print(f"\nV={vocab}  (inputs hold {held / gb:.2f} GB)")
        print(
            f"{'measure':10s} {'pass':8s} {'time s':>8s} {'x kl':>6s} "
            f"{'peak GB':>8s} {'x kl':>6s} {'work GB':>8s} {'x kl':>6s}"
        )
        for (measure, backward), (t, peak) in rows.items():
            t0, p0 = rows.get(("kl", backward), (t, peak))
            work, work0 = peak - held, p0 - held
            print(
                f"{measure:10s} {'fwd+bwd' if backward else 'fwd':8s} {t:8.3f} "
                f"{t / t0:6.2f} {peak / gb:8.2f} {peak / p0:6.2f} "
                f"{work / gb:8.2f} {work / max(work0, 1):6.2f}"
            )
        del inputs


if __name__ == "__main__":
    main()
