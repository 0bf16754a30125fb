"""Tiny random mlx-lm models and tokenizers, written to folders in the test.

Nothing is downloaded: the tokenizer is a byte-level BPE with no merges
(256 byte tokens + specials), built with ``tokenizers``; the model is an
mlx-lm llama with random weights, saved with mlx-lm's own writers.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.utils import save_config, save_model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tokenizer(folder: Path, chat: bool = True) -> int:
    """Write a byte-level tokenizer to ``folder``; return its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>" if chat else "<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
    )
    if chat:
        fast.chat_template = CHATML
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return len(vocab)


def model_args(vocab_size: int, tied: bool = True, layers: int = 2, hidden: int = 32):
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "rope_theta": 10000.0,
    }


def write_model(
    folder: Path,
    chat: bool = True,
    tied: bool = True,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 32,
) -> Path:
    """A tiny random llama + tokenizer as an mlx-lm model folder."""
    folder = Path(folder)
    vocab = write_tokenizer(folder, chat)
    args = model_args(vocab, tied, layers, hidden)
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(args))
    # Larger than the default init, so random models have non-trivial logits.
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 4
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config({**args, "architectures": ["LlamaForCausalLM"]}, folder / "config.json")
    return folder


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def preference_rows(n: int, seed: int = 0):
    """Small synthetic preference rows (text prompts, a few with a system)."""
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "safe", "risky", "help", "no"]
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        chosen = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
        rejected = chosen + " " + rng.choice(words)
        row = {"prompt": f"q{i} {prompt}?", "chosen": chosen, "rejected": rejected}
        if i % 3 == 0:
            row["system"] = "be brief"
        rows.append(row)
    return rows


def pku_rows(n: int, seed: int = 0):
    """PKU-SafeRLHF-style rows where helpfulness and safety labels disagree."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        helpful_unsafe = f"sure, here is how {i}"
        safe = "sorry, I can not help" if i % 2 else f"here is a safe answer {i}"
        flip = rng.random() < 0.5
        responses = [helpful_unsafe, safe] if flip else [safe, helpful_unsafe]
        rows.append(
            {
                "prompt": f"how do I do thing {i}?",
                "response_0": responses[0],
                "response_1": responses[1],
                "better_response_id": 0 if flip else 1,
                "safer_response_id": 1 if flip else 0,
                "is_response_0_safe": not flip,
                "is_response_1_safe": flip,
            }
        )
    return rows
