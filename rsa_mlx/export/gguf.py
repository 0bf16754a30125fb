"""MLX -> GGUF: the fused aligned model as one file for llama.cpp and Ollama.

:func:`export_gguf` loads the base model with the run's adapters (both
stages, merge ratio q), fuses and de-quantises them as the Hugging Face
export does (:func:`rsa_mlx.export.hf.hf_weights`), and writes the result
with the ``gguf`` package's ``GGUFWriter`` under llama.cpp's tensor names and
metadata keys, permuting the q/k rows of the llama architecture as
``convert_hf_to_gguf.py`` does. 2-d tensors are F16 or Q8_0 (``gguf.quants``,
bit-exact with ggml's reference quantiser; rows that are not whole blocks of
32 stay F16), 1-d ones (norms, biases) F32, as llama.cpp writes them. The
vocabulary, special tokens, add-BOS/EOS flags and chat template come from
the base model's tokenizer (:mod:`rsa_mlx.export.gguf_vocab`); Llama-3 RoPE
scaling becomes ``rope_freqs.weight``.

Architectures: llama, mistral (written as llama, as llama.cpp does) and
qwen2. The output path is checked before any work and the file appears only
when complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T

from rsa_mlx.export.gguf_vocab import add_vocab
from rsa_mlx.export.hf import hf_weights, sources
from rsa_mlx.io import hf
from rsa_mlx.io.gguf_layout import (
    ARCHITECTURES,
    GGUF_ARCHITECTURES,
    ROPE_FREQS,
    gguf_name,
    llama3_factors,
    permute,
)
from rsa_mlx.tuner.model import load
from rsa_mlx.util.atomic import write_atomic
from rsa_mlx.util.errors import InputError, quote

# --gguf-type -> (ggml type of 2-d tensors, general.file_type)
GGUF_TYPES = {
    "f16": (T.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
F16_MAX = float(np.finfo(np.float16).max)
REQUIRED = (
    "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
    "rms_norm_eps", "max_position_embeddings", "vocab_size",
)  # fmt: skip


def export_gguf(
    out_path: str | Path,
    model: str | None = None,
    adapter_path: str | Path | None = None,
    merge: float | None = None,
    gguf_type: str = "f16",
) -> Path:
    """Write base model + adapters (+ merge q) as the GGUF file ``out_path``."""
    if gguf_type not in GGUF_TYPES:
        raise InputError(
            f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}"
        )
    out = Path(out_path)
    if os.path.lexists(out):  # a dangling link too: before the slow part
        raise InputError(
            f"{quote(out)}: already exists; remove it or choose another --gguf path"
        )
    base, config, run = sources(model, adapter_path, merge)
    arch = check_gguf_exportable(base, config)
    writer = gguf.GGUFWriter(None, arch)
    rope = add_model_keys(writer, config, base, gguf_type, run)
    add_vocab(writer, base, config["vocab_size"])  # refused before the model loads
    net, _ = load(str(base), adapter_path, merge)
    add_tensors(writer, hf_weights(net, {}), config, arch, gguf_type)
    if rope is not None:
        writer.add_tensor(ROPE_FREQS, rope)
    write_atomic(out, lambda tmp: _write(writer, Path(tmp)))
    return out


def check_gguf_exportable(base: str | Path, config: dict | None = None) -> str:
    """The GGUF architecture of the model folder ``base``, or one line saying
    why it cannot be exported (its architecture, a size key or its
    tokenizer), before any training or conversion work."""
    config = config if config is not None else hf.check_model_folder(Path(base))
    where = quote(Path(base) / "config.json")
    arch = GGUF_ARCHITECTURES.get(config.get("model_type"))
    if arch is None:
        raise InputError(
            f"{where}: cannot export model_type {config.get('model_type')!r} to "
            f"GGUF (supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise InputError(
            f"{where}: no {', '.join(missing)} (GGUF's metadata needs them)"
        )
    add_vocab(gguf.GGUFWriter(None, arch), Path(base), config["vocab_size"])
    return arch


def _write(writer: gguf.GGUFWriter, path: Path) -> None:
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def rope_parameters(config: dict) -> tuple[float, dict]:
    """(rope_theta, scaling) of an HF config, old or transformers-5 style."""
    nested = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", nested.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or {
        k: v for k, v in nested.items() if k != "rope_theta"
    }
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), {**scaling, "rope_type": kind}


def add_model_keys(w, config: dict, base: Path, gguf_type: str, run: dict):
    """The architecture keys; returns Llama-3 RoPE factors to write, or None."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    w.add_name(f"{Path(str(run['model'])).name} (rsa-mlx)")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(config.get("num_key_value_heads", heads))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(GGUF_TYPES[gguf_type][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    theta, rope = rope_parameters(config)
    w.add_rope_freq_base(theta)
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "llama3":
        return llama3_factors(rope, theta, head_dim)
    elif rope["rope_type"] != "default":
        raise InputError(
            f"{quote(Path(base) / 'config.json')}: RoPE scaling "
            f"{rope['rope_type']!r} is not written to GGUF (default, linear, llama3)"
        )
    return None


def add_tensors(w, weights: dict, config: dict, arch: str, gguf_type: str) -> None:
    """Every tensor, renamed, q/k permuted for llama, as F32/F16/Q8_0."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    kind = GGUF_TYPES[gguf_type][0]
    for name, value in weights.items():
        target = gguf_name(name)
        if target is None:
            raise InputError(f"tensor {name!r} has no GGUF name for {arch}")
        a = np.array(value.astype(mx.float32))
        if ARCHITECTURES[arch][2] and ".q_proj." in name:
            a = permute(a, heads)
        elif ARCHITECTURES[arch][2] and ".k_proj." in name:
            a = permute(a, kv_heads)
        if a.ndim == 1:
            w.add_tensor(target, a)
        elif kind == T.Q8_0 and a.shape[-1] % 32 == 0:
            w.add_tensor(target, gguf.quants.quantize(a, T.Q8_0), raw_dtype=T.Q8_0)
        else:
            if np.abs(a).max() > F16_MAX:
                raise InputError(
                    f"tensor {name!r} has values beyond float16's range "
                    f"({np.abs(a).max():.3g}); F16 cannot hold it"
                )
            w.add_tensor(target, a.astype(np.float16))
