"""Data-parallel scaling: steps/s and tokens/s for 1 and 2 local processes.

    python benchmarks/bench_distributed.py                  # ~30 s on 2 cores
    python benchmarks/bench_distributed.py --steps 20 --batch-size 16

The same model (a random llama, LoRA on every block), the same global batch
of ``--batch-size`` pairs and the same compiled RSA step (variant2 + CVaR)
run once as a single process and once as two processes on 127.0.0.1 over
the ring backend (``python -m rsa_mlx.launch -n 2``), each process with
``OPENBLAS_NUM_THREADS=--threads``. Reported per world size: the median step
time, steps/s and tokens/s of the whole group, and the share of the step
spent in the gradient all-reduce (mlx's ``average_gradients`` of the LoRA
gradient, timed on its own between steps: in the step it is part of one
graph). On one machine the processes share its cores, so this measures the
cost of the machinery rather than a speed-up; on several machines each
process has its own.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args) -> None:
    import rsa_mlx  # noqa: F401  (first: loads the fast BLAS before mlx)

    # isort: split
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.nn.utils import average_gradients
    from mlx.utils import tree_map
    from mlx_lm.models import llama

    from rsa_mlx.tuner import adapters
    from rsa_mlx.tuner import distributed as dist
    from rsa_mlx.tuner.data import BatchSampler, Encoded
    from rsa_mlx.tuner.step import Objective, make_step

    world, rank = dist.world_size(), dist.rank()
    mx.random.seed(0)
    model = llama.Model(
        llama.ModelArgs.from_dict(
            {
                "model_type": "llama",
                "hidden_size": args.hidden,
                "num_hidden_layers": args.layers,
                "intermediate_size": 2 * args.hidden,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
                "rms_norm_eps": 1e-5,
                "vocab_size": args.vocab,
                "tie_word_embeddings": True,
            }
        )
    )
    model.freeze()
    layers = adapters.add_adapter(model, adapters.LoRAConfig(num_layers=-1))
    optimizer = optim.AdamW(learning_rate=1e-5)
    optimizer.init(model.trainable_parameters())
    step = make_step(
        model, optimizer, layers, Objective("variant2", "cvar", 0.95), 1, 1.0,
        data_parallel=world > 1,
    )  # fmt: skip

    rng = np.random.default_rng(0)
    n, half = args.batch_size, args.length // 2
    ids = [rng.integers(3, args.vocab, half).astype(np.int32) for _ in range(3 * n)]
    data = Encoded(ids[:n], ids[n : 2 * n], ids[2 * n :])
    batch = next(iter(BatchSampler(data, n, 0, 0, rank, world)))
    arrays = batch.arrays()
    tokens = dist.sum_values([batch.real_tokens], dtype=mx.int32)[0]

    state = [model.state, optimizer.state]
    for _ in range(2):  # compile and warm up
        metrics, _ = step(arrays, None, True)
        mx.eval(state, metrics)
    times = []
    for _ in range(args.steps):
        tic = time.perf_counter()
        metrics, _ = step(arrays, None, True)
        mx.eval(state, metrics)
        times.append(time.perf_counter() - tic)
    reduce_times = []
    if world > 1:
        grad = tree_map(mx.ones_like, model.trainable_parameters())
        mx.eval(grad)
        for _ in range(args.steps):
            tic = time.perf_counter()
            mx.eval(average_gradients(grad))
            reduce_times.append(time.perf_counter() - tic)
    step_s = statistics.median(times)
    reduce_s = statistics.median(reduce_times) if reduce_times else 0.0
    if rank == 0:
        print(
            "RESULT "
            + json.dumps(
                {
                    "world": world,
                    "step_ms": 1e3 * step_s,
                    "steps_per_s": 1 / step_s,
                    "tokens_per_s": tokens / step_s,
                    "allreduce_ms": 1e3 * reduce_s,
                    "allreduce_share": reduce_s / step_s,
                    "grad_mb": sum(v.nbytes for v in _leaves(model)) / 1e6,
                }
            ),
            flush=True,
        )


def _leaves(model):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(model.trainable_parameters())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int, args, passthrough: list[str]) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OPENBLAS_NUM_THREADS": str(args.threads),
    }
    command = [sys.executable, __file__, "--worker", *passthrough]
    if world > 1:
        launcher = [sys.executable, "-m", "rsa_mlx.launch", "-n", str(world)]
        command = [*launcher, "--backend", "ring", "-p", str(free_port()), "--"]
        command += [sys.executable, __file__, "--worker", *passthrough]
    out = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=args.timeout
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"world {world} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=8, help="global pairs")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads each")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--worlds", default="1,2")
    args, _ = parser.parse_known_args()
    if args.worker:
        worker(args)
        return
    passthrough = [
        a for a in sys.argv[1:] if not a.startswith("--worlds") and a != args.worlds
    ]
    results = [measure(int(w), args, passthrough) for w in args.worlds.split(",")]
    print(
        f"global batch {args.batch_size} pairs x {args.length} tokens, llama "
        f"{args.layers}x{args.hidden} (V={args.vocab}), LoRA on every block "
        f"({results[0]['grad_mb']:.2f} MB of gradient), "
        f"OPENBLAS_NUM_THREADS={args.threads} per process, median of {args.steps}"
    )
    print("| processes | step ms | steps/s | tokens/s | all-reduce ms | share |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['world']} | {r['step_ms']:.1f} | {r['steps_per_s']:.2f} "
            f"| {r['tokens_per_s']:.0f} | {r['allreduce_ms']:.2f} "
            f"| {100 * r['allreduce_share']:.1f}% |"
        )


if __name__ == "__main__":
    main()
