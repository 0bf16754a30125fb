"""Recipe scoring: fluency from the model shift's own passes, against two calls.

    python benchmarks/bench_scoring.py --model work/smollm2/run/model
    python benchmarks/bench_scoring.py --model M --adapter work/smollm2/run/runs/sacpo

The recipe's evaluator needs, for every greedy answer, its fluency (mean
log-probability per token under the base model) and the model shift (the
per-token KL of the policy from the base). Cases, on the same
``(prompt_ids, response_ids)`` from :func:`sample_with_ids`:

* (a) ``two calls``: :func:`fluency` (the base model over the answers' text)
      then :func:`model_shift` (policy and base over the answers' ids);
* (b) ``one call``: :func:`shift_and_fluency`, which takes the fluency from
      the base model's passes that the shift makes anyway.

Without ``--adapter`` the policy is a second copy of the base model (a
separate object, so both models still run). Each case runs once untimed,
then the cases are timed round-robin; the load average is printed with each
measurement, and the fluency and shift of the two cases are compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import rsa_mlx  # noqa: F401  (first: loads the fast BLAS before mlx)

# isort: split
import numpy as np
from bench_generate import PROMPTS

from rsa_mlx.eval.prompts import PromptRecord
from rsa_mlx.eval.sampling import sample_with_ids
from rsa_mlx.eval.shift import fluency, model_shift, shift_and_fluency
from rsa_mlx.tuner.model import load
from rsa_mlx.util import blas


def two_calls(policy, base, tok, records, texts, sequences):
    logps = fluency(base, tok, records, [[t] for t in texts])
    return model_shift(policy, base, tok, sequences), [row[0] for row in logps]


def one_call(policy, base, tok, records, texts, sequences):
    return shift_and_fluency(policy, base, sequences)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the base model's folder")
    ap.add_argument("--adapter", help="a trained run folder: the policy")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    base, tok = load(args.model)
    policy, _ = load(args.model, adapter_path=args.adapter)
    records = [PromptRecord(p) for p in PROMPTS[: args.prompts]]
    texts, ids = sample_with_ids(
        policy,
        tok,
        records,
        k=1,
        max_tokens=args.tokens,
        temperature=0.0,
        label="answers",
    )
    texts = [row[0] for row in texts]
    sequences = [row[0] for row in ids]
    tokens = sum(len(r) for _, r in sequences)
    name = blas.STATUS.path if blas.STATUS.loaded else "reference BLAS"
    print(f"BLAS: {name}; {len(sequences)} answers, {tokens} tokens")
    cases = {"two calls": two_calls, "one call": one_call}
    results = {}
    for case, fn in cases.items():  # untimed: compilation
        results[case] = fn(policy, base, tok, records, texts, sequences)
    times = {name: [] for name in cases}
    for r in range(args.rounds):
        for name, fn in cases.items():
            tic = time.perf_counter()
            fn(policy, base, tok, records, texts, sequences)
            times[name].append(time.perf_counter() - tic)
            load1 = os.getloadavg()[0]
            print(f"round {r + 1} {name:9s} {times[name][-1]:7.2f} s  load {load1:.2f}")
    (s_a, f_a), (s_b, f_b) = results["two calls"], results["one call"]
    gap = np.nanmax(np.abs(np.array(f_a, float) - np.array(f_b, float)))
    print(
        f"fluency max |diff| {gap:.2e}; shift {s_a['kl_mean']:.6f} vs {s_b['kl_mean']:.6f}"
    )
    a, b = (statistics.median(times[n]) for n in cases)
    print(f"median: two calls {a:.2f} s, one call {b:.2f} s, ratio {a / b:.2f}x")


if __name__ == "__main__":
    main()
