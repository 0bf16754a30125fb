"""GGUF -> Hugging Face: a llama.cpp model file as a normal HF model folder.

:func:`gguf_to_hf` reads the header with a reader that checks every length
against the file (:mod:`rsa_mlx.io.gguf_file`), de-quantises each tensor
with the ``gguf`` package (F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the
k-quants Q2_K..Q6_K and Q8_K, so mixed files such as Q4_K_M too), casts it
to one dtype, renames it to its HF name and undoes the row permutation
llama.cpp applies to the q/k projections of the llama architecture
(:mod:`rsa_mlx.io.gguf_layout`). The vocabulary, byte-level BPE or
sentencepiece, is rebuilt with ``tokenizers`` (:mod:`rsa_mlx.io.gguf_vocab`).
The result (``model.safetensors``, ``config.json``, ``tokenizer.json``,
``tokenizer_config.json``) loads in mlx-lm and in transformers, so the usual
HF -> MLX conversion applies to it unchanged.

Supported: architectures ``llama`` (which also holds Mistral) and ``qwen2``,
with Llama-3 RoPE scaling (``rope_freqs.weight``) read back into the config.
Anything else (IQ quants, other architectures, a vocabulary the file does
not describe in full) is refused with an
:class:`~rsa_mlx.util.errors.InputError` naming the file, before anything
is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from rsa_mlx.io import hf
from rsa_mlx.io.gguf_file import SUPPORTED, Header, read_header, read_tensor, type_name
from rsa_mlx.io.gguf_layout import (
    ARCHITECTURES,
    ROPE_FREQS,
    hf_name,
    llama3_scaling,
    unpermute,
)
from rsa_mlx.io.gguf_vocab import build_tokenizer, save_tokenizer
from rsa_mlx.util.errors import InputError, quote

DTYPES = ("float32", "float16", "bfloat16")


def gguf_to_hf(
    gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32"
) -> Path:
    """Write the GGUF model ``gguf_path`` as a Hugging Face folder ``out_dir``.

    Every tensor is de-quantised or cast to ``dtype`` ("float32", "float16"
    or "bfloat16"). ``out_dir`` must not exist (nor be a dangling link); it
    appears only when complete. Returns ``out_dir``. Raises
    :class:`InputError` (one line naming the file) for a missing, truncated
    or unsupported file.
    """
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if os.path.lexists(out_dir):  # before the slow part
        raise InputError(
            f"{quote(out_dir)}: already exists; remove it or choose another "
            "output folder"
        )
    header = read_header(gguf_path)
    check_model(header)
    config = hf_config(header, dtype)
    tokenizer, vocab = build_tokenizer(header.path, header.meta)  # fail early
    weights = hf_weights(header, dtype)
    with hf.staged_folder(out_dir, "output folder") as out:
        out.mkdir()
        mx.save_safetensors(
            str(out / "model.safetensors"), weights, metadata={"format": "pt"}
        )
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_tokenizer(tokenizer, vocab, out)
    return Path(out_dir)


def check_model(header: Header) -> None:
    """Refuse an unknown architecture, tensor type or tensor name, by name."""
    path, meta = header.path, header.meta
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise InputError(
            f"{quote(path)}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    bad = [t for t in header.tensors.values() if t.kind not in SUPPORTED]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise InputError(
            f"{quote(path)}: tensor type {type_name(bad[0].kind)} (of "
            f"{bad[0].name!r}{more}) is not supported "
            f"(supported: {', '.join(t.name for t in SUPPORTED)})"
        )
    for name in header.tensors:
        if name != ROPE_FREQS and hf_name(name) is None:
            raise InputError(f"{quote(path)}: unexpected tensor {name!r} for {arch}")
    if "token_embd.weight" not in header.tensors:
        raise InputError(f"{quote(path)}: no token_embd.weight tensor")


def hf_config(header: Header, dtype: str) -> dict:
    """config.json for the model in ``header`` (GGUF metadata)."""
    path, meta = header.path, header.meta
    arch = meta["general.architecture"]
    model_type, cls, _ = ARCHITECTURES[arch]

    def need(key, kind=int):
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise InputError(f"{quote(path)}: metadata key {arch}.{key} is missing")
        if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{quote(path)}: metadata key {arch}.{key} is {value!r}")
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    config = {
        "architectures": [cls],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon", float),
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": need("context_length"),
        "vocab_size": header.tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }
    head_dim = meta.get(f"{arch}.attention.key_length")
    if head_dim is not None and head_dim != hidden // heads:
        config["head_dim"] = head_dim
    rope = rope_scaling(header, config)
    if rope is not None:
        config["rope_scaling"] = rope
    if arch == "qwen2":
        config["use_sliding_window"] = False
    ids = {"bos": "bos", "eos": "eos", "pad": "padding"}
    for key, name in ids.items():
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{key}_token_id"] = token_id
    return config


def rope_scaling(header: Header, config: dict) -> dict | None:
    """HF ``rope_scaling`` from the GGUF keys (linear) or rope_freqs (llama3)."""
    path, meta = header.path, header.meta
    arch = meta["general.architecture"]
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": meta[f"{arch}.rope.scaling.factor"]}
    if kind != "none":
        raise InputError(f"{quote(path)}: RoPE scaling {kind!r} is not supported")
    info = header.tensors.get(ROPE_FREQS)
    if info is None:
        return None
    factors = read_tensor(path, info)
    head_dim = config.get(
        "head_dim", config["hidden_size"] // config["num_attention_heads"]
    )
    old = meta.get(f"{arch}.rope.scaling.original_context_length", 8192)
    if factors.shape != (head_dim // 2,) or not np.isfinite(factors).all():
        raise InputError(f"{quote(path)}: {ROPE_FREQS} has shape {factors.shape}")
    if np.all(factors == 1):
        return None
    rope = llama3_scaling(factors, config["rope_theta"], head_dim, old)
    if rope is None:
        raise InputError(
            f"{quote(path)}: {ROPE_FREQS} is not a Llama-3 RoPE scaling "
            "(no factor, low_freq_factor, high_freq_factor give it)"
        )
    return rope


def hf_weights(header: Header, dtype: str) -> dict:
    """The HF-named ``dtype`` tensors of a GGUF file's tensors."""

    meta = header.meta
    arch = meta["general.architecture"]
    permuted = ARCHITECTURES[arch][2]
    heads = meta.get(f"{arch}.attention.head_count")
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    out = {}
    for name, info in header.tensors.items():
        if name == ROPE_FREQS:  # in the config as rope_scaling
            continue
        w = read_tensor(header.path, info)
        if permuted and ".attn_q." in name:
            w = unpermute(w, heads)
        elif permuted and ".attn_k." in name:
            w = unpermute(w, kv_heads)
        out[hf_name(name)] = mx.array(w).astype(getattr(mx, dtype))
        mx.eval(out[hf_name(name)])
    return out
