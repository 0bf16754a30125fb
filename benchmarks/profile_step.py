"""Where the time of one rsa_mlx training step goes.

    python benchmarks/profile_step.py --model DIR [--length 247 --prompt 48]
    python benchmarks/profile_step.py --model /path/to/SmolLM2-135M --repeats 3

On one batch (4 pairs, by default 48 prompt + 199 response tokens, the
bench_peers fixed shape) each part of the step is compiled and timed on
its own, median of ``--repeats`` after a warm-up, the parts interleaved:

* ``ref fwd``: the reference forward (adapter off): trunk + head at the
  response positions;
* ``policy fwd``: the same with the adapter on;
* ``stats fwd`` / ``stats fwd+bwd``: the vocabulary-sized work of the loss
  (``segment_stats`` + the preference loss) on given logits, forward only
  and with its gradient w.r.t. the policy logits;
* ``grad``: value and gradient of the whole loss (reference forward, policy
  forward and backward, vocabulary work);
* ``step``: the compiled training step (``grad`` + clipping + AdamW);
* ``host``: collating the batch and copying it to MLX arrays.

Derived: trunk backward = grad - ref fwd - policy fwd - (stats fwd+bwd);
optimizer = step - grad.
"""

from __future__ import annotations

import argparse
import statistics
import time

import rsa_mlx  # noqa: F401  (first: OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from rsa_mlx.tuner import adapters
from rsa_mlx.tuner.adapters import disabled
from rsa_mlx.tuner.data import Encoded, collate
from rsa_mlx.tuner.model import ResponseLogits, load
from rsa_mlx.tuner.step import Objective, make_step, pair_loss

METHODS = {
    "dpo": Objective("dpo", "kl"),
    "tdpo": Objective("variant2", "kl"),
    "rsa-cvar": Objective("variant2", "cvar", 0.95),
    "rsa-erm": Objective("variant2", "erm", 5.0),
}


def timeit(fns: dict, repeats: int) -> dict:
    for fn in fns.values():  # compile and warm up
        fn()
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            tic = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - tic)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--response", type=int, default=199)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()

    model, _ = load(args.model)
    mx.random.seed(0)
    layers = adapters.add_adapter(
        model, adapters.LoRAConfig(rank=8, scale=10.0, num_layers=-1)
    )
    # A trained-looking adapter: policy != reference.
    for layer in layers:
        layer.lora_b = 0.01 * mx.random.normal(layer.lora_b.shape)
    mx.eval(model.parameters())
    vocab = model.model.embed_tokens.weight.shape[0]
    rng = np.random.default_rng(0)

    def ids(n):
        return rng.integers(3, vocab, n).astype(np.int32)

    pairs = args.pairs
    data = Encoded(
        [ids(args.prompt) for _ in range(pairs)],
        [ids(args.response) for _ in range(pairs)],
        [ids(args.response) for _ in range(pairs)],
    )
    batch = collate(data, list(range(pairs)))
    arrays = batch.arrays()
    tokens, index, targets, segments, mask = arrays
    forward = ResponseLogits(model)
    print(
        f"{args.model}: V={vocab}, batch {tokens.shape[0]} x {tokens.shape[1]}, "
        f"{int(batch.mask.sum())} response positions (+{len(batch.mask) - int(batch.mask.sum())} "
        f"padding rows), mlx {mx.__version__}"
    )

    ref_fwd = mx.compile(lambda: mx.stop_gradient(_ref(forward, layers, tokens, index)))
    pol_fwd = mx.compile(lambda: forward(tokens, index))
    ref_logits = ref_fwd()
    logits = pol_fwd()
    mx.eval(ref_logits, logits)
    n_seq = tokens.shape[0]

    def collate_host():
        return collate(data, list(range(pairs))).arrays()

    parts = {
        "ref fwd": lambda: mx.eval(ref_fwd()),
        "policy fwd": lambda: mx.eval(pol_fwd()),
        "host": lambda: mx.eval(collate_host()),
    }
    for name in args.methods:
        objective = METHODS[name]

        def stats_loss(lg, objective=objective):
            return pair_loss(lg, ref_logits, targets, segments, mask, n_seq, objective)[
                0
            ]

        def full_loss(model, objective=objective):
            ref = mx.stop_gradient(_ref(forward, layers, tokens, index))
            return pair_loss(
                forward(tokens, index), ref, targets, segments, mask, n_seq, objective
            )[0]

        s_fwd = mx.compile(stats_loss)
        s_bwd = mx.compile(mx.grad(stats_loss))
        vg = nn.value_and_grad(model, full_loss)
        state = [model.state]
        grad = mx.compile(lambda vg=vg: vg(model), inputs=state, outputs=state)
        optimizer = optim.AdamW(learning_rate=0.0)
        optimizer.init(model.trainable_parameters())
        step = make_step(model, optimizer, layers, objective, forward=forward)
        parts[f"{name}: stats fwd"] = lambda f=s_fwd: mx.eval(f(logits))
        parts[f"{name}: stats fwd+bwd"] = lambda f=s_bwd: mx.eval(f(logits))
        parts[f"{name}: grad"] = lambda f=grad: mx.eval(f())
        parts[f"{name}: step"] = lambda f=step, o=optimizer: mx.eval(
            f(arrays, None, True), model.state, o.state
        )
    t = timeit(parts, args.repeats)
    print(f"{'part':28s} {'s':>8s}")
    for k, v in t.items():
        print(f"{k:28s} {v:8.3f}")
    print("\nderived per method (s):")
    print(
        f"{'method':10s} {'step':>7s} {'ref fwd':>8s} {'pol fwd':>8s} {'vocab':>7s} "
        f"{'trunk bwd':>9s} {'optim':>7s} {'host':>6s}"
    )
    for name in args.methods:
        g, s = t[f"{name}: grad"], t[f"{name}: step"]
        v = t[f"{name}: stats fwd+bwd"]
        bwd = g - t["ref fwd"] - t["policy fwd"] - v
        print(
            f"{name:10s} {s:7.3f} {t['ref fwd']:8.3f} {t['policy fwd']:8.3f} {v:7.3f} "
            f"{bwd:9.3f} {s - g:7.3f} {t['host']:6.3f}"
        )


def _ref(forward, layers, tokens, index):
    with disabled(layers):
        return forward(tokens, index)


if __name__ == "__main__":
    main()
