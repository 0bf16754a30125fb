"""Training-step time and peak memory: our steps against the common DPO step.

    python benchmarks/bench_step.py                 # ~42M llama (V=32000) and a tiny one
    python benchmarks/bench_step.py --sizes small --steps 5

Cases, on the same model, batch (4 pairs x 256 tokens) and LoRA settings,
all compiled with ``mx.compile``, measured side by side in one run:

* (a) ``dpo``:       our DPO step: in-network reference (adapter switched off),
                     logits at response positions only, bucketed padding;
* (b) ``rsa-cvar``,  ``rsa-erm``: our RSA step (variant2 + the risk measure);
* (c) ``common-dpo``: DPO built the common way (as mlx-lm-lora does): a
                     separate frozen reference model, logits and log-softmax
                     at every position of both models, padding to the
                     longest sequence.

Each time is the median of ``--steps`` steps after two warm-up steps, the
cases timed round-robin (step 1 of every case, then step 2, ...) so that the
drift of a shared machine hits all alike. Peak memory is what each case holds
(weights, optimizer, a reference copy) plus its step's working memory.
Ratios are to (a).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import rsa_mlx  # noqa: F401  (first: loads the fast BLAS before mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from rsa_mlx.tuner import adapters
from rsa_mlx.tuner.data import Encoded, collate
from rsa_mlx.tuner.step import Objective, make_step

SIZES = {
    # ~42M parameters: 8 blocks of width 512, vocabulary 32000 (tied)
    "small": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "intermediate_size": 1408,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    },
}


def build_model(size: str, seed: int = 0) -> nn.Module:
    args = llama.ModelArgs(
        model_type="llama", rms_norm_eps=1e-5, tie_word_embeddings=True, **SIZES[size]
    )
    mx.random.seed(seed)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def make_batch(vocab: int, pairs: int, length: int, seed: int = 0):
    """Pairs whose sequences are exactly ``length`` tokens: a prompt of a
    quarter to a half of it, the rest response."""
    rng = np.random.default_rng(seed)
    prompts, chosen, rejected = [], [], []
    for _ in range(pairs):
        p = int(rng.integers(length // 4, length // 2))
        prompts.append(rng.integers(1, vocab, p).astype(np.int32))
        chosen.append(rng.integers(1, vocab, length - p).astype(np.int32))
        rejected.append(rng.integers(1, vocab, length - p).astype(np.int32))
    data = Encoded(prompts, chosen, rejected)
    return collate(data, list(range(pairs)))


def common_dpo_step(policy, reference, optimizer, beta=0.1):
    """DPO the common way: full logits of both models at every position."""

    def scores(model, inputs, targets, mask):
        logits = model(inputs).astype(mx.float32)
        logps = nn.log_softmax(logits, axis=-1)
        picked = mx.take_along_axis(logps, targets[..., None], axis=-1)[..., 0]
        return (picked * mask).sum(-1)

    def loss_fn(policy, inputs, targets, mask):
        pol = scores(policy, inputs, targets, mask)
        ref = mx.stop_gradient(scores(reference, inputs, targets, mask))
        half = pol.shape[0] // 2
        u = (pol[:half] - ref[:half]) - (pol[half:] - ref[half:])
        return mx.logaddexp(0.0, -beta * u).mean()

    value_and_grad = nn.value_and_grad(policy, loss_fn)
    state = [policy.state, reference.state, optimizer.state]

    def step(inputs, targets, mask):
        loss, grad = value_and_grad(policy, inputs, targets, mask)
        optimizer.update(policy, grad)
        return loss

    return mx.compile(step, inputs=state, outputs=state)


def common_inputs(batch):
    """Padded to the longest sequence, full-sequence targets and mask."""
    rows, width = batch.tokens.shape
    scored = [
        batch.index[batch.mask & (batch.segments == s)] - s * width for s in range(rows)
    ]
    longest = max(int(pos.max()) + 2 for pos in scored)
    inputs = batch.tokens[:, : longest - 1]
    targets = batch.tokens[:, 1:longest]
    mask = np.zeros(targets.shape, np.float32)
    for s, pos in enumerate(scored):
        mask[s, pos] = 1.0  # the response targets, as in our step
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def nbytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree))


def measure(cases: dict, steps: int) -> dict:
    """Memory one case at a time, then time the cases round-robin.

    A case is ``(run, state, held)``: one training step, the arrays to
    evaluate with it, and the model/optimizer arrays it holds. Peak memory
    is what the case holds plus its step's working memory (the peak above
    everything resident before the step). Timings interleave the cases step
    by step, so a slow minute on a shared machine hits all of them.
    """
    memory = {}
    for name, (run, state, held) in cases.items():
        for _ in range(2):  # trace and warm up
            mx.eval(run(), state)
        mx.synchronize()
        mx.clear_cache()
        resting = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(run(), state)
        memory[name] = nbytes(held) + mx.get_peak_memory() - resting
    times = {name: [] for name in cases}
    for _ in range(steps):
        for name, (run, state, _) in cases.items():
            tic = time.perf_counter()
            mx.eval(run(), state)
            times[name].append(time.perf_counter() - tic)
    return {name: (statistics.median(times[name]), memory[name]) for name in cases}


def run_size(size: str, steps: int, pairs: int, length: int, num_layers: int):
    model = build_model(size)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    batch = make_batch(SIZES[size]["vocab_size"], pairs, length)
    lora = adapters.LoRAConfig(rank=8, scale=20.0, num_layers=num_layers)
    arrays = batch.arrays()
    cases = {}
    for name, objective in [
        ("dpo", Objective("dpo", "kl")),
        ("rsa-cvar", Objective("variant2", "cvar")),
        ("rsa-erm", Objective("variant2", "erm")),
    ]:
        policy = copy.deepcopy(model)
        mx.random.seed(1)
        layers = adapters.add_adapter(policy, lora)
        optimizer = optim.AdamW(learning_rate=1e-5)
        optimizer.init(policy.trainable_parameters())
        step = make_step(policy, optimizer, layers, objective)
        cases[name] = (
            lambda s=step: s(arrays, None, True)[0]["loss"],
            [policy.state, optimizer.state],
            [policy.parameters(), optimizer.state],
        )

    policy = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    reference.freeze()
    mx.random.seed(1)
    adapters.add_adapter(policy, lora)
    optimizer = optim.AdamW(learning_rate=1e-5)
    optimizer.init(policy.trainable_parameters())
    step = common_dpo_step(policy, reference, optimizer)
    inputs = common_inputs(batch)
    cases["common-dpo"] = (
        lambda: step(*inputs),
        [policy.state, optimizer.state],
        [policy.parameters(), reference.parameters(), optimizer.state],
    )
    return n_params, batch, measure(cases, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "tiny"], choices=SIZES)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=-1)
    args = parser.parse_args()
    print(
        f"mlx {mx.__version__}, device {mx.default_device()}, compiled, "
        f"median of {args.steps} steps, {args.pairs} pairs x {args.length} tokens"
    )
    for size in args.sizes:
        n_params, batch, results = run_size(
            size, args.steps, args.pairs, args.length, args.num_layers
        )
        responses = batch.ntokens
        print(
            f"\n{size}: {n_params / 1e6:.1f}M parameters, V={SIZES[size]['vocab_size']}, "
            f"{responses} response tokens of {batch.real_tokens} in the batch"
        )
        print(
            f"{'step':12s} {'s/step':>8s} {'x dpo':>6s} {'peak GB':>8s} {'x dpo':>6s}"
        )
        t0, m0 = results["dpo"]
        for name, (t, m) in results.items():
            print(f"{name:12s} {t:8.3f} {t / t0:6.2f} {m / 1e9:8.3f} {m / m0:6.2f}")


if __name__ == "__main__":
    main()
