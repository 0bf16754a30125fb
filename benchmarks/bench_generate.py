"""Sampling tokens/s: our decoder against mlx-lm's batch generation.

    python benchmarks/bench_generate.py --model /path/to/SmolLM2-135M-f32
    python benchmarks/bench_generate.py --model M --samples 1 --rounds 2

Cases, on one model, batch (``--batch`` rows, ``--tokens`` new tokens at
most) and prompts, at temperature 0 (greedy) and ``--temperature``:

* (a) ``old``:      ``sample_with_ids(impl="mlx_lm")``, the library's path
                    before the fast decoder (mlx-lm's ``batch_generate``);
* (b) ``new``:      ``sample_with_ids(impl="fast")`` (rsa_mlx.eval.decode);
* (b') ``new-keep``: the same with finished rows kept in the batch to the
                    end (the decoder before it dropped them), to show what
                    dropping them gains;
* (c) ``mlx-lm``:   ``mlx_lm.batch_generate`` with its own defaults.

``--adapter-path`` loads a trained run (e.g. a recipe's ``runs/rsa-cvar``)
and ``--prompts FILE --set NAME`` asks the prompts of a JSONL file (a
recipe's ``data/eval.jsonl``: ``--set advbench``, which an aligned model
refuses in a few tokens): the recipe's evaluation, where rows finish at
very different steps.

The batch is ``--batch / --samples`` chat prompts each sampled
``--samples`` times (the recipe samples k = 8 answers per prompt;
``--samples 1`` gives distinct prompts). Tokens/s counts the tokens
generated (end of sequence excluded), prefill included in the time. Each
case runs once untimed first (compilation), then the cases are timed
round-robin (round 1 of every case, then round 2, ...) so that the drift of
a shared machine hits all alike; the load average is printed with each
measurement. Ratios are of median tokens/s to (a).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import rsa_mlx  # noqa: F401  (first: loads the fast BLAS before mlx)

# isort: split
import mlx.core as mx
from mlx_lm.generate import batch_generate
from mlx_lm.sample_utils import make_sampler

from rsa_mlx.eval import decode
from rsa_mlx.eval.prompts import PromptRecord, prompt_ids
from rsa_mlx.eval.sampling import sample_with_ids
from rsa_mlx.tuner.model import load
from rsa_mlx.util import blas

PROMPTS = [
    "How do I bake a simple loaf of bread?",
    "Write a short story about a dragon who is afraid of the dark.",
    "What is the capital of Australia?",
    "Explain photosynthesis to a ten-year-old.",
    "Give me three tips for a job interview.",
    "Why is the sky blue?",
    "Translate 'good morning' into French and Spanish.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What are the health benefits of walking every day?",
    "How does a bicycle stay upright?",
    "Write a haiku about autumn leaves.",
    "What is the difference between weather and climate?",
    "Suggest a name for a coffee shop by the sea.",
    "How do vaccines work?",
    "List five fruits that are rich in vitamin C.",
    "Explain what a prime number is, with examples.",
    "How can I improve my sleep?",
    "What causes earthquakes?",
    "Describe a sunset over the mountains.",
    "Give me a recipe for a quick vegetable soup.",
    "What is machine learning in one paragraph?",
    "How do I change a flat tyre?",
    "Why do cats purr?",
    "Write a polite email declining a meeting.",
    "What is the Pythagorean theorem?",
    "How do bees make honey?",
    "Name three famous painters and one work of each.",
    "What should I pack for a weekend hike?",
    "Explain how a rainbow forms.",
    "Give me a motivational quote and explain it.",
    "How does the internet work, briefly?",
    "What is the tallest mountain in Africa?",
]


class RowsKept:
    """Within the block, the decoder keeps finished rows to the end."""

    def __enter__(self):
        self.saved, decode._survivors = decode._survivors, lambda finished: None

    def __exit__(self, *exc):
        decode._survivors = self.saved


def read_prompts(path: str, name: str | None) -> list[str]:
    """The ``prompt`` of every row of JSONL ``path`` (of set ``name``)."""
    lines = Path(path).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r["prompt"] for r in rows if name is None or r.get("set") == name]


def timed(run) -> tuple[float, int]:
    mx.random.seed(0)
    start = time.perf_counter()
    tokens = run()
    return time.perf_counter() - start, tokens


def cases(model, tokenizer, records, samples, batch, max_tokens, temperature):
    def ours(impl, keep=False):
        def run():
            if keep:
                with RowsKept():
                    return ours(impl)()
            _, ids = sample_with_ids(
                model, tokenizer, records, k=samples, max_tokens=max_tokens,
                temperature=temperature, batch_size=batch, impl=impl,
                label=f"{impl} T={temperature}",
            )  # fmt: skip
            return sum(len(r) for row in ids for _, r in row)

        return run

    flat = [prompt_ids(tokenizer, r) for r in records for _ in range(samples)]

    def mlx_lm():
        result = batch_generate(
            model, tokenizer, flat, max_tokens=max_tokens,
            sampler=make_sampler(temp=temperature), return_token_ids=True,
        )  # fmt: skip
        return sum(len(r) for r in result.token_ids)

    return {
        "old": ours("mlx_lm"),
        "new": ours("fast"),
        "new-keep": ours("fast", keep=True),
        "mlx-lm": mlx_lm,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder or HF id")
    parser.add_argument("--adapter-path", help="a trained run or stage folder")
    parser.add_argument(
        "--prompts", help="JSONL with a prompt per row (default: benign)"
    )
    parser.add_argument("--set", help="with --prompts: only rows of this set")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens at most")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.batch % args.samples:
        parser.error("--batch must be a multiple of --samples")

    model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    n_prompts = args.batch // args.samples
    if args.set and not args.prompts:
        parser.error("--set needs --prompts")
    texts = read_prompts(args.prompts, args.set) if args.prompts else PROMPTS
    if not texts:
        parser.error(f"--prompts {args.prompts}: no rows of set {args.set}")
    records = [PromptRecord(texts[i % len(texts)]) for i in range(n_prompts)]
    blas_name = blas.STATUS.path if blas.STATUS.loaded else "reference BLAS"
    print(f"BLAS: {blas_name}; {os.cpu_count()} CPUs")
    print(
        f"batch {args.batch} = {n_prompts} prompts x {args.samples} samples, "
        f"{args.tokens} new tokens at most, rounds {args.rounds}, "
        f"prompts {args.prompts or 'benign'} (set {args.set or 'all'}), "
        f"adapter {args.adapter_path or 'none'}"
    )
    temps = [0.0, args.temperature]
    table = {
        t: cases(model, tokenizer, records, args.samples, args.batch, args.tokens, t)
        for t in temps
    }
    for t in temps:  # compile and warm up, untimed
        for run in table[t].values():
            run()
    rates = {(t, name): [] for t in temps for name in table[t]}
    for r in range(args.rounds):
        for t in temps:
            for name, run in table[t].items():
                seconds, tokens = timed(run)
                rates[t, name].append(tokens / seconds)
                load1 = os.getloadavg()[0]
                print(
                    f"round {r + 1} T={t:<4} {name:<7} {tokens:5d} tokens "
                    f"{seconds:6.2f} s {tokens / seconds:7.1f} tok/s  load {load1:.2f}",
                    flush=True,
                )
    print("\nmedian tokens/s (ratio to old):")
    for t in temps:
        base = statistics.median(rates[t, "old"])
        row = [
            f"{name} {statistics.median(v):.1f} ({statistics.median(v) / base:.2f}x)"
            for (tt, name), v in rates.items()
            if tt == t
        ]
        print(f"  T={t}: " + ", ".join(row))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
