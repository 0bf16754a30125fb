"""rsa_mlx's step against the real peers: mlx-lm-lora's DPO and TRL + PEFT.

    bash benchmarks/peers/setup.sh                       # once: the peers' venvs
    python benchmarks/bench_peers.py --shape fixed       # 64 pairs, 48 + 199 tokens
    python benchmarks/bench_peers.py --shape mix         # PKU-SafeRLHF-like lengths

One random llama (hidden 512, 8 layers, FFN 1408, 8 heads / 4 KV heads,
vocabulary 32000, tied embeddings, float32) is written once as a Hugging
Face folder (safetensors, config.json, a word-level tokenizer whose token
``w<i>`` has id ``i``, EOS ``</s>`` id 2), and the pairs once as token ids, so every system
trains the same weights on the same ids. Each system runs in its own
process (``benchmarks/peers/run_*.py``; the peers with the python of their
own virtual environment under ``.venv-peers/``), loads the model, then
trains when told: LoRA rank 8 (scale 10) on every linear layer of every
block, batch 4 pairs, learning rate 1e-5, fp32, each with its own data
loader, batching, reference and compiled (or eager torch) step.

The driver warms every system up, then runs rounds: in each round every
system trains ``--steps-per-round`` steps in turn (the order rotated per
round), so a slow minute of a shared machine hits all alike. Step times are
each system's own loop's wall time per step (data, forward, backward,
update, evaluated). Reported: median and mean seconds per step after
warm-up, their ratio to rsa_mlx DPO, MLX peak memory
(``mx.get_peak_memory``, what mlx-lm-lora also reports) and peak RSS.
The first loss of every system must be log 2 (a fresh LoRA adapter leaves
the policy equal to the reference).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = ROOT / ".venv-peers"

LLAMA = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "intermediate_size": 1408,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
EOS, PAD = 2, 0

SYSTEMS = {
    # name: (python, runner, extra args)
    "rsa-dpo": ("ours", "run_rsa.py", ["--method", "dpo"]),
    "rsa-cvar": ("ours", "run_rsa.py", ["--method", "rsa-cvar"]),
    "rsa-erm": ("ours", "run_rsa.py", ["--method", "rsa-erm"]),
    "rsa-tdpo": ("ours", "run_rsa.py", ["--method", "tdpo"]),
    # the same runner on another checkout of rsa_mlx (--baseline DIR)
    "base-dpo": ("base", "run_rsa.py", ["--method", "dpo"]),
    "base-cvar": ("base", "run_rsa.py", ["--method", "rsa-cvar"]),
    "mlx-lm-lora": ("mlx-lm-lora", "run_mlx_lm_lora.py", []),
    "trl": ("trl", "run_trl.py", []),  # TRL's defaults: gradient checkpointing on
    "trl-no-ckpt": ("trl", "run_trl.py", ["--no-gradient-checkpointing"]),
}
DEFAULT_SYSTEMS = ["rsa-dpo", "rsa-cvar", "rsa-erm", "mlx-lm-lora", "trl"]


def write_model(folder: Path, config: dict = LLAMA, seed: int = 0) -> Path:
    """A random mlx-lm llama as a Hugging Face folder, and its tokenizer."""
    import rsa_mlx  # noqa: F401  (OpenBLAS before mlx)

    # isort: split
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    args = {
        "model_type": "llama",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 2048,
        **config,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs(**args))
    # Embeddings (and so the tied head) at std 0.05: logits of order 1.
    embed = model.model.embed_tokens
    embed.weight = embed.weight * 0.05
    mx.eval(model.parameters())
    save_model(str(folder), model)
    save_config(
        {
            **args,
            "architectures": ["LlamaForCausalLM"],
            "torch_dtype": "float32",
            "bos_token_id": 1,
            "eos_token_id": EOS,
            "pad_token_id": PAD,
        },
        str(folder / "config.json"),
    )
    write_tokenizer(folder, config["vocab_size"])
    return folder


def write_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {PAD: "<pad>", 1: "<unk>", EOS: "</s>"}
    words = {names.get(i, f"w{i}"): i for i in range(vocab)}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))


def make_pairs(shape: str, vocab: int, pairs: int = 64, seed: int = 0) -> list[dict]:
    """Token ids of ``pairs`` preference pairs; every response ends with EOS.

    ``fixed``: 48 prompt + 199 response tokens each. ``mix``: lengths drawn
    like PKU-SafeRLHF's (short prompts, responses of a few dozen to a few
    hundred tokens): log-normal, prompt median 24 tokens (6-192), each
    response median 90 (8-448), chosen and rejected drawn independently.
    """
    import numpy as np

    rng = np.random.default_rng(seed)

    def ids(n):
        return [int(t) for t in rng.integers(3, vocab, n - 1)] + [EOS]

    def draw(median, lo, hi):
        return int(np.clip(round(median * math.exp(0.6 * rng.normal())), lo, hi))

    out = []
    for _ in range(pairs):
        if shape == "fixed":
            p, c, r = 48, 199, 199
        else:
            p, c, r = draw(24, 6, 192), draw(90, 8, 448), draw(90, 8, 448)
        out.append({"prompt": ids(p + 1)[:-1], "chosen": ids(c), "rejected": ids(r)})
    return out


class Worker:
    def __init__(self, name, model: Path, data: Path, batch_size: int, baseline=None):
        kind, runner, extra = SYSTEMS[name]
        ours = kind in ("ours", "base")
        python = sys.executable if ours else str(PEERS / kind / "bin/python")
        path = ROOT if kind != "base" else baseline
        if path is None:
            raise ValueError(f"{name} needs --baseline DIR (an rsa_mlx checkout)")
        if not os.path.exists(python):
            raise FileNotFoundError(
                f"{python} missing: run `bash benchmarks/peers/setup.sh {kind}`"
            )
        env = {**os.environ, "PYTHONPATH": str(path), "TOKENIZERS_PARALLELISM": "false"}
        self.name = name
        self.log = open(data.parent / f"{name}.log", "w")  # noqa: SIM115
        command = [python, str(HERE / "peers" / runner), "--model", str(model)]
        command += ["--data", str(data), "--batch-size", str(batch_size), *extra]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        self.info = self._read("READY")

    def _read(self, kind: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(kind + " "):
                return json.loads(line[len(kind) + 1 :])
            self.log.write(line)
        raise RuntimeError(f"{self.name} ended early; see {self.log.name}")

    def steps(self, n: int) -> dict:
        self.proc.stdin.write(f"steps {n}\n")
        self.proc.stdin.flush()
        return self._read("RESULT")

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
        self.log.close()


def run(
    systems,
    shape,
    workdir: Path,
    warmup,
    rounds,
    per_round,
    batch_size,
    base=None,
    model=None,
    config=LLAMA,
    pairs=64,
):
    """Train ``systems`` side by side; ``model``: an existing model folder
    (its config's vocabulary sets the token ids), else the random llama of
    ``config`` written under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = write_model(workdir / "model", config)
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    data = workdir / f"pairs-{shape}.json"
    pairs = make_pairs(shape, vocab, pairs)
    data.write_text(json.dumps({"pairs": pairs}))
    workers = []
    try:
        for name in systems:  # one at a time: loading competes for the cores
            tic = time.perf_counter()
            workers.append(Worker(name, model, data, batch_size, base))
            print(f"# {name} ready in {time.perf_counter() - tic:.1f} s", flush=True)
        first, times, peak, rss = {}, {w.name: [] for w in workers}, {}, {}
        for w in workers:
            result = w.steps(warmup)
            first[w.name] = result["losses"][0]
            print(f"# warm-up {w.name}: {result['times']}", flush=True)
        for r in range(rounds):
            k = r % len(workers)
            for w in workers[k:] + workers[:k]:
                result = w.steps(per_round)
                times[w.name] += result["times"]
                peak[w.name], rss[w.name] = result["peak_gb"], result["rss_peak_gb"]
            print(f"# round {r + 1}/{rounds} done", flush=True)
    finally:
        for w in workers:
            w.close()
    tokens = sum(
        len(p["prompt"]) * 2 + len(p["chosen"]) + len(p["rejected"]) for p in pairs
    )
    return {
        "shape": shape,
        "pairs": len(pairs),
        "tokens": tokens,
        "response_tokens": sum(len(p["chosen"]) + len(p["rejected"]) for p in pairs),
        "warmup": warmup,
        "rounds": rounds,
        "steps_per_round": per_round,
        "first_loss": first,
        "times": times,
        "peak_gb": peak,
        "rss_peak_gb": rss,
        "info": {w.name: w.info for w in workers},
    }


def table(result: dict, base: str = "rsa-dpo") -> str:
    """Markdown: median, mean and fastest step of each system, and ratios
    to ``base`` (the fastest step is the least disturbed by other load)."""
    times = result["times"]
    stats = {
        k: (statistics.median(v), statistics.fmean(v), min(v)) for k, v in times.items()
    }
    ref = stats.get(base)
    lines = [
        f"{result['shape']}: {result['pairs']} pairs, {result['tokens']} tokens "
        f"({result['response_tokens']} in responses); {result['rounds']} rounds x "
        f"{result['steps_per_round']} steps after {result['warmup']} warm-up",
        f"| system | median s/step | x {base} | mean | x {base} | fastest | x {base} "
        "| MLX peak GB | peak RSS GB | first loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in times:
        peak = result["peak_gb"].get(name)
        cells = []
        for i in range(3):
            ratio = stats[name][i] / ref[i] if ref else float("nan")
            cells += [f"{stats[name][i]:.2f}", f"{ratio:.2f}"]
        lines.append(
            f"| {name} | {' | '.join(cells)} | "
            f"{'-' if peak is None else f'{peak:.2f}'} | "
            f"{result['rss_peak_gb'][name]:.2f} | {result['first_loss'][name]:.6f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["fixed", "mix"], default="fixed")
    parser.add_argument(
        "--table", type=Path, default=None, help="only print the table of a JSON result"
    )
    parser.add_argument(
        "--systems", nargs="+", default=DEFAULT_SYSTEMS, choices=SYSTEMS
    )
    parser.add_argument("--workdir", type=Path, default=ROOT / "work" / "bench_peers")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="an existing llama folder (e.g. SmolLM2-135M) instead of the random "
        "40M llama; TRL needs the bench's word-level tokenizer, so leave it out",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="an older rsa_mlx checkout for the base-* systems "
        "(e.g. git worktree add /tmp/base main)",
    )
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    result = run(
        args.systems,
        args.shape,
        args.workdir,
        args.warmup,
        args.rounds,
        args.steps_per_round,
        args.batch_size,
        args.baseline,
        args.model,
        pairs=args.pairs,
    )
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
