"""Build the demo's base ("SFT") model, deterministically.

    python -m rsa_mlx.demo.build --out rsa_mlx/demo/assets/base

1. A sentencepiece tokenizer (BPE) trained on the world's text, with chat
   markers ``<|system|> <|user|> <|assistant|> <|end|>`` and a chat template.
2. A small mlx-lm llama trained from scratch (all parameters) to imitate the
   base behaviour of :mod:`rsa_mlx.demo.world`: responses to training
   requests sampled from ``BASE_BEHAVIOUR``, next-token loss on the response.
3. A normal mlx-lm model folder (``config.json``, ``model.safetensors``,
   ``tokenizer.model`` + ``tokenizer.json``, ``tokenizer_config.json``) that
   ``mlx_lm.load`` opens, and ``BUILD.json`` with the settings and the
   model's measured behaviour on held-out requests.

The package ships the result (about 2 MB), so the demo never has to build it;
this script is how it was made and how to remake it.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import sentencepiece as spm
from mlx_lm import load
from mlx_lm.models import llama
from mlx_lm.utils import save_config, save_model
from transformers import AutoTokenizer

from rsa_mlx.demo import world
from rsa_mlx.demo.behaviour import kind_probabilities

SPECIAL = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class BuildConfig:
    seed: int = 0
    vocab_size: int = 400
    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 2e-3
    samples_per_request: int = 60


def corpus() -> list[str]:
    texts = [r.text for r in world.requests(world.all_tasks())]
    texts += [t for k in world.KINDS for t in k.texts]
    return texts


def train_tokenizer(out: Path, cfg: BuildConfig) -> None:

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus() * 4),
        model_writer=model,
        vocab_size=cfg.vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        hard_vocab_limit=False,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=SPECIAL,
        split_digits=True,
        byte_fallback=False,  # the world's text is plain ASCII
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "<|end|>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "additional_special_tokens": SPECIAL,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 256,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Also write the fast tokenizer (tokenizer.json): loading is then instant.

    AutoTokenizer.from_pretrained(str(out)).save_pretrained(str(out))


def sft_examples(tokenizer, cfg: BuildConfig):
    """(tokens, response start) for sampled responses to training requests."""
    rng = random.Random(cfg.seed)
    data = world.make_world(cfg.seed)
    eot = tokenizer.convert_tokens_to_ids("<|end|>")
    out = []
    for request in data.train:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": request.text}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for _ in range(cfg.samples_per_request):
            _, text = world.sample_response(request, rng)
            response = [*tokenizer.encode(text, add_special_tokens=False), eot]
            out.append((list(prompt) + response, len(prompt)))
    rng.shuffle(out)
    return out


def train_model(out: Path, cfg: BuildConfig, log=print) -> None:

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    args = {
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(tokenizer),
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|end|>"),
    }
    mx.random.seed(cfg.seed)
    model = llama.Model(llama.ModelArgs.from_dict(args))
    examples = sft_examples(tokenizer, cfg)
    width = max(len(t) for t, _ in examples)
    tokens = np.zeros((len(examples), width), np.int32)
    mask = np.zeros((len(examples), width - 1), np.float32)
    for i, (toks, start) in enumerate(examples):
        tokens[i, : len(toks)] = toks
        mask[i, start - 1 : len(toks) - 1] = 1.0  # predict the response only

    def loss_fn(model, x, m):
        logits = model(x[:, :-1])
        ce = nn.losses.cross_entropy(logits, x[:, 1:], reduction="none")
        return (ce * m).sum() / m.sum()

    schedule = optim.cosine_decay(
        cfg.learning_rate, cfg.steps, cfg.learning_rate * 0.05
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step(x, m):
        loss, grad = value_and_grad(model, x, m)
        optimizer.update(model, grad)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    rng = np.random.default_rng(cfg.seed)
    tic = time.perf_counter()
    for it in range(1, cfg.steps + 1):
        idx = rng.integers(0, len(examples), cfg.batch_size)
        loss = step(mx.array(tokens[idx]), mx.array(mask[idx]))
        mx.eval(state, loss)
        if it % 100 == 0 or it == cfg.steps:
            log(
                f"[build] step {it}/{cfg.steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - tic:.0f}s)"
            )
    save_model(out, model)
    save_config({**args, "architectures": ["LlamaForCausalLM"]}, out / "config.json")


def build(out: Path, cfg: BuildConfig | None = None, log=print) -> dict:
    """Build tokenizer and model into ``out``; return the measured behaviour."""

    cfg = cfg or BuildConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    train_tokenizer(out, cfg)
    train_model(out, cfg, log)

    model, tokenizer = load(str(out))
    test = world.make_world(cfg.seed).test
    measured = kind_probabilities(model, tokenizer, test)
    measured.pop("per_request")
    info = {
        "settings": asdict(cfg),
        "seconds": round(time.perf_counter() - tic, 1),
        "target": {
            ("harmful" if h else "benign"): t for h, t in world.BASE_BEHAVIOUR.items()
        },
        "measured_on_held_out": measured,
    }
    (out / "BUILD.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main():
    parser = argparse.ArgumentParser(description="Build the demo's base model.")
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets" / "base"))
    parser.add_argument("--steps", type=int, default=BuildConfig.steps)
    args = parser.parse_args()
    info = build(Path(args.out), BuildConfig(steps=args.steps))
    print(json.dumps(info["measured_on_held_out"], indent=2))


if __name__ == "__main__":
    main()
