"""What GGUF and Hugging Face call the same thing, both ways: architectures,
tensor names, llama.cpp's q/k row order, and Llama-3 RoPE scaling.

Shared by the reader (:mod:`rsa_mlx.io.gguf`) and the writer
(:mod:`rsa_mlx.export.gguf`), so that one table serves both directions (the
``gguf`` package's ``TensorNameMap`` maps many HF spellings onto one GGUF
name and has no inverse).
"""

from __future__ import annotations

import math

import numpy as np

# GGUF architecture -> (HF model_type, HF architecture class, q/k permuted?).
# llama.cpp permutes the q/k rows only for the llama architecture
# (convert_hf_to_gguf.py: LlamaModel.permute); qwen2 keeps HF's layout.
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}
# HF model_type -> GGUF architecture (llama.cpp writes Mistral as llama).
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

# GGUF tensor name (after ``blk.N.``) -> HF name (after ``model.layers.N.``).
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_HF_LAYER = {v: k for k, v in LAYER_TENSORS.items()}
_HF_GLOBAL = {v: k for k, v in GLOBAL_TENSORS.items()}
ROPE_FREQS = "rope_freqs.weight"  # Llama-3 RoPE scaling, one factor per pair


def hf_name(name: str) -> str | None:
    """The HF name of GGUF tensor ``name`` (``blk.3.attn_q.weight``), or None."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
    return None


def gguf_name(name: str) -> str | None:
    """The GGUF name of HF tensor ``name``, or None."""
    stem, _, kind = name.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, layer, module = stem.split(".", 3)
        if module in _HF_LAYER:
            return f"blk.{layer}.{_HF_LAYER[module]}.{kind}"
        return None
    return f"{_HF_GLOBAL[stem]}.{kind}" if stem in _HF_GLOBAL else None


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf: LlamaModel.permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute(w, n_head: int):
    """Undo :func:`permute` (numpy or MLX arrays)."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama3_factors(rope: dict, theta: float, head_dim: int) -> np.ndarray:
    """The rope_freqs.weight llama.cpp writes for Llama-3 RoPE scaling
    (convert_hf_to_gguf: LlamaModel.generate_extra_tensors)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs.astype(np.float64):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, old: int):
    """The HF ``rope_scaling`` that gives ``factors`` (a rope_freqs.weight),
    or None if no Llama-3 scaling does.

    Only ``factor`` and the two wavelengths ``old / low_freq_factor`` and
    ``old / high_freq_factor`` matter, so Llama 3.1's own factors (1 and 4)
    are tried first; otherwise the two are fitted to the smoothly scaled
    pairs, for the given ``old`` (original_max_position_embeddings).
    """
    factor = float(factors.max())
    tries = [(1.0, 4.0)]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    mid = (factors > 1) & (factors < factor)
    if mid.sum() >= 2:  # smooth = a * freq + b, where 1/f = (1 - s)/factor + s
        smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(freqs[mid].astype(np.float64), smooth, 1)
        if a > 0:
            span = old / (2 * math.pi * a)  # high - low
            tries.append((float(-b * span), float(-b * span + span)))
    for low, high in tries:
        rope = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": old,
        }
        if np.allclose(llama3_factors(rope, theta, head_dim), factors, rtol=1e-5):
            return rope
    return None
