"""Tiny random Hugging Face models written with transformers + torch.

The folders are what a user downloads from the Hub (``save_pretrained``:
safetensors, config.json, tokenizer files), at a size that converts, trains
and exports in seconds. torch is a test-only tool: :func:`torch_or_skip`
skips locally when it is missing, and fails in CI, where the test command
installs it.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.tiny import write_tokenizer

ARCHS = ("llama", "qwen2")


def torch_or_skip():
    """Import torch and transformers, or skip (outside CI) / fail (in CI)."""
    if os.environ.get("CI"):
        import torch
        import transformers

        return torch, transformers
    return pytest.importorskip("torch"), pytest.importorskip("transformers")


def peft_or_skip():
    """Import peft, or skip (outside CI) / fail (in CI)."""
    torch_or_skip()
    if os.environ.get("CI"):
        import peft

        return peft
    return pytest.importorskip("peft")


def hf_config(arch: str, vocab: int, hidden: int = 64, tied: bool = True) -> dict:
    config = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
    }
    if arch == "qwen2":
        config["use_sliding_window"] = False
    return config


def write_hf_model(
    folder: Path, arch: str = "llama", seed: int = 0, tied: bool = True, **kwargs
) -> Path:
    """A random ``arch`` model + byte-level chat tokenizer via save_pretrained."""
    torch, transformers = torch_or_skip()
    folder = Path(folder)
    vocab = write_tokenizer(folder)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    config = config_cls(**hf_config(arch, vocab, tied=tied, **kwargs))
    config.torch_dtype = "float32"
    model = model_cls(config).eval()
    with torch.no_grad():  # larger than the default init: non-trivial logits
        for p in model.parameters():
            p.mul_(8.0 if p.dim() == 2 else 1.0)
    model.save_pretrained(str(folder))
    return folder


def write_sentencepiece_model(folder: Path, seed: int = 0) -> Path:
    """A random llama whose tokenizer is only a sentencepiece tokenizer.model."""
    import sentencepiece as spm

    torch, transformers = torch_or_skip()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = [
        "hello world, this is a tiny corpus for a tiny tokenizer",
        "the quick brown fox jumps over the lazy dog",
        "safety first; helpfulness second. How can I help you today?",
    ] * 40
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=buffer,
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**hf_config("llama", 320))
    config.torch_dtype = "float32"
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def torch_logits(folder: Path, tokens: np.ndarray, adapter: Path | None = None):
    """float32 logits of the HF folder (plus a PEFT adapter) in PyTorch."""
    torch, transformers = torch_or_skip()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long)).logits
    return out.float().numpy()


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a folder's model*.safetensors, as float32 NumPy."""
    from safetensors.numpy import load_file

    out = {}
    for path in sorted(Path(folder).glob("model*.safetensors")):
        out.update(load_file(str(path)))
    return out
