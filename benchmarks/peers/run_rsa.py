"""rsa_mlx's step for bench_peers.py: DPO, or RSA (variant 2) with a risk.

    PYTHONPATH=. python benchmarks/peers/run_rsa.py --model DIR --data pairs.json --method dpo

(``rsa_mlx`` is the one on ``PYTHONPATH``: bench_peers.py points it at this
checkout, or at an older one for a before/after comparison.)

The loop is the trainer's: the length-sorted, shuffled ``BatchSampler``,
the compiled step of :func:`rsa_mlx.tuner.step.make_step` (reference = this
network with the adapter switched off) and one ``mx.eval`` per step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rsa_mlx  # noqa: F401  (first: OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import protocol

from rsa_mlx.tuner import adapters
from rsa_mlx.tuner.data import BatchSampler, Encoded
from rsa_mlx.tuner.model import ResponseLogits, load
from rsa_mlx.tuner.step import Objective, make_step

METHODS = {
    "dpo": Objective("dpo", "kl"),
    "tdpo": Objective("variant2", "kl"),
    "rsa-cvar": Objective("variant2", "cvar", 0.95),
    "rsa-erm": Objective("variant2", "erm", 5.0),
}


def build(model_path, pairs, method, batch_size, seed=0, rank=8, scale=10.0):
    """``(step_once, model)``: one training step of our own loop per call."""
    model, _ = load(model_path)
    mx.random.seed(seed)
    layers = adapters.add_adapter(
        model, adapters.LoRAConfig(rank=rank, scale=scale, num_layers=-1)
    )
    optimizer = optim.AdamW(learning_rate=1e-5, weight_decay=0.0)
    optimizer.init(model.trainable_parameters())
    forward = ResponseLogits(model)
    step = make_step(model, optimizer, layers, METHODS[method], forward=forward)
    data = Encoded(
        [np.asarray(p["prompt"], np.int32) for p in pairs],
        [np.asarray(p["chosen"], np.int32) for p in pairs],
        [np.asarray(p["rejected"], np.int32) for p in pairs],
    )
    batches = iter(BatchSampler(data, batch_size, seed=seed))
    state = [model.state, optimizer.state]

    def step_once() -> float:
        metrics, _ = step(next(batches).arrays(), None, True)
        mx.eval(state, metrics)
        return metrics["loss"].item()

    return step_once, model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--method", default="dpo", choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    step_once, _ = build(
        args.model, protocol.load_pairs(args.data), args.method, args.batch_size
    )
    session = protocol.Session()
    session.ready(system=f"rsa_mlx {args.method}", mlx=mx.__version__)
    while True:
        tic = time.perf_counter()
        loss = step_once()
        session.record(time.perf_counter() - tic, loss, mx.get_peak_memory() / 1e9)


if __name__ == "__main__":
    main()
