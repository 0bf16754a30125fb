"""Tiny GGUF files for the tests: tiny random HF models written as llama.cpp
would write them (its tensor names, metadata keys and q/k row permutation),
with the ``gguf`` package's GGUFWriter, and with any tensor type
(:mod:`tests.ggml_ref` packs the blocks).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from tests.ggml_ref import F16, F32, decode, encode
from tests.hf_tiny import hf_config, torch_or_skip
from tests.tiny import CHATML, SPECIALS

BF16 = 30
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "In 2024, 1234 people paid $56.78 each; 90% said it's fine, they'll return.",
    "Grüße aus Köln! Ça va? 東京は日本の首都です。 Emoji: 🙂🚀",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\ttabs",
    "How can I help you today? I can not help with that, sorry.",
] * 20
GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


# --- writing GGUF files -------------------------------------------------------


def _put(w, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(
            key, np.asarray(value).tolist() if hasattr(value, "dtype") else value
        )


def write_gguf(path: Path, tensors: dict, meta: dict) -> Path:
    """``tensors``: name -> (ggml type, data): float32/float16 values for
    F32/F16, uint8 blocks (rows, bytes) for the others."""
    import gguf

    meta = dict(meta)
    w = gguf.GGUFWriter(str(path), meta.pop("general.architecture"))
    for key, value in meta.items():
        _put(w, key, value)
    for name, (kind, data) in tensors.items():
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def tensor(a: np.ndarray, kind: int = F32):
    """(ggml type, data) of ``a`` in type ``kind``, and the float32 values a
    reader must give back (ggml's decoding of the blocks)."""
    a = np.asarray(a, np.float32)
    if kind == F32:
        return (kind, a), a
    if kind == F16:
        return (kind, a.astype(np.float16)), a.astype(np.float16).astype(np.float32)
    if kind == BF16:
        bits = (a.view(np.uint32) >> 16).astype(np.uint16)
        values = (bits.astype(np.uint32) << 16).view(np.float32)
        return (kind, bits.view(np.uint8).reshape(*a.shape[:-1], -1)), values
    raw = encode(a, kind).reshape(*a.shape[:-1], -1)
    return (kind, raw), decode(raw, kind, a.shape)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf LlamaModel.permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def permute_back(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(name: str) -> str:
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{GGUF_NAMES[module]}.{kind}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[name]


def tiny_gguf(path: Path, tensors: dict | None = None, **overrides) -> Path:
    """A two-tensor GGUF with llama metadata (not a whole model)."""
    meta = {
        "general.architecture": "llama",
        "llama.block_count": 1,
        "llama.context_length": 64,
        "llama.embedding_length": 32,
        "llama.feed_forward_length": 64,
        "llama.attention.head_count": 4,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
    }
    meta.update(overrides)
    base = {
        "token_embd.weight": (F32, np.ones((3, 32), np.float32)),
        "output_norm.weight": (F32, np.ones(32, np.float32)),
    }
    return write_gguf(path, {**base, **(tensors or {})}, meta)


# --- tiny HF models -------------------------------------------------------------


def write_tokenizer(folder: Path, pre: str) -> int:
    """A byte-level BPE with merges, trained on CORPUS; returns its size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    if pre == "smollm":
        core.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
    else:
        core.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=448,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))
    return core.get_vocab_size()


def write_hf(
    folder: Path, arch: str, tied: bool, seed: int = 0, hidden: int = 64, **extra
) -> Path:
    """A random llama/mistral/qwen2 model with a trained byte-level BPE tokenizer."""
    torch, transformers = torch_or_skip()
    vocab = write_tokenizer(folder, "qwen2" if arch == "qwen2" else "smollm")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    config = hf_config(arch, vocab, hidden=hidden, tied=tied)
    config.update(bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() == 2 else 1.0)
            if p.dim() == 1:  # norms and biases away from their init
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder))
    return folder


def bpe_meta(folder: Path, pre: str) -> dict:
    """The GGUF tokenizer keys for an HF tokenizer.json (as llama.cpp writes)."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    for t in spec["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }


def rope_theta(config: dict) -> float:
    """transformers >= 5 nests rope_theta under rope_parameters."""
    return float(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])


def model_meta(config: dict) -> dict:
    arch = config["model_type"]
    return {
        "general.architecture": arch,
        "general.name": "tiny",
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": config["num_attention_heads"],
        f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
        f"{arch}.rope.freq_base": rope_theta(config),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
    }


def hf_to_gguf(
    folder: Path,
    path: Path,
    kind: int = F32,
    quant: dict | None = None,
    extra: dict | None = None,
    **meta,
) -> dict:
    """Write the HF model in ``folder`` as a GGUF file, as llama.cpp would.

    2-d tensors are ``kind`` unless ``quant`` names another type for them;
    1-d ones (norms, biases) float32; ``extra`` tensors (rope_freqs) are
    added as float32. Returns every tensor's values as a
    reader must give them back (in HF layout).
    """
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    arch = config["model_type"]
    weights = load_file(str(folder / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors, refs = {}, {}
    for name, w in sorted(weights.items()):
        permuted = arch == "llama" and (".q_proj." in name or ".k_proj." in name)
        n_head = heads if ".q_proj." in name else kv_heads
        if permuted:
            w = permute(w, n_head)
        want = (quant or {}).get(name, kind) if w.ndim == 2 else F32
        tensors[gguf_name(name)], ref = tensor(w, want)
        refs[name] = permute_back(ref, n_head) if permuted else ref
    for name, values in (extra or {}).items():
        tensors[name] = (F32, np.asarray(values, np.float32))
    pre = "smollm" if arch == "llama" else "qwen2"
    write_gguf(path, tensors, {**model_meta(config), **bpe_meta(folder, pre), **meta})
    return refs


def load_all(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def save_reference(folder: Path, refs: dict, out: Path) -> Path:
    """The HF folder with the weights a GGUF reader must give (for torch)."""
    import shutil

    from safetensors.numpy import save_file

    shutil.copytree(folder, out)
    save_file(refs, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# --- sentencepiece ----------------------------------------------------------------


SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world!",
    "Grüße aus Köln, ça va? Über den Wolken, naïve café.",
    "東京は日本の首都です。 大阪と京都も有名です。",
    "Numbers 2024 and 12345, prices $3.50; time 10:45.",
    "  two leading spaces, then\nnew lines\n\nand\ttabs.",
    "How can I help you today? I cannot help with that, sorry.",
] * 30


def train_sentencepiece(vocab_size: int = 400) -> bytes:
    """A Llama-style sentencepiece BPE model (byte fallback, split digits,
    identity normalisation, a dummy prefix), trained on SPM_CORPUS."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        minloglevel=2,
    )
    return buffer.getvalue()


def sentencepiece_meta(model: bytes, **flags) -> dict:
    """The GGUF keys llama.cpp writes for a sentencepiece model
    (convert_hf_to_gguf: _create_vocab_sentencepiece)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = 1
        if sp.is_unknown(i):
            kind = 2
        elif sp.is_control(i):
            kind = 3
        elif sp.is_unused(i):
            kind = 5
        elif sp.is_byte(i):
            kind = 6
        elif tokens[-1] in ("<|im_start|>", "<|im_end|>"):
            kind = 4  # sentencepiece's user-defined symbols
        types.append(kind)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array(scores, np.float32),
        "tokenizer.ggml.token_type": np.array(types, np.int32),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        **flags,
    }
