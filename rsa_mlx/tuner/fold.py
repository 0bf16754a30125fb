"""Folding stacked LoRA layers into one mlx-lm LoRA layer (for ``final/``).

A stack ``y = base(x) + sum_k s_k * update_k(x)`` of LoRA layers (stage 2
wrapping stage 1) is one LoRA layer of rank ``sum r_k`` and scale 1 with the
factors concatenated and each ``B_k`` scaled by ``s_k``. This holds for the
three mlx-lm LoRA layers: ``LoRALinear`` (``x A B``), ``LoRASwitchLinear``
(per expert ``x A_e^T B_e^T``) and ``LoRAEmbedding`` (``A[ids] B``, and
``x B^T A^T`` as a tied output layer).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

LORA_TYPES = (LoRALinear, LoRASwitchLinear, LoRAEmbedding)


def combined_adapter(model: nn.Module) -> tuple[dict[str, mx.array], int]:
    """Fold every stacked LoRA layer into one mlx-lm LoRA layer.

    A stack ``y = base(x) + sum_k s_k x A_k B_k`` equals one LoRA layer with
    ``A = [A_1 ... A_K]``, ``B = [s_1 B_1; ...; s_K B_K]`` and scale 1, of
    rank ``sum r_k``; ranks are zero-padded to the largest total so every
    layer has the same rank. Returns the tensors (by mlx-lm name) and rank.
    """
    stacks = {}
    for path, module in model.named_modules():
        if not isinstance(module, LORA_TYPES) or any(
            path.startswith(p + ".") for p in stacks
        ):
            continue
        chain, m = [], module
        while isinstance(m, LORA_TYPES):
            chain.append(m)
            m = m.embedding if isinstance(m, LoRAEmbedding) else m.linear
        stacks[path] = chain
    rank = max(sum(_rank(m) for m in chain) for chain in stacks.values())
    out = {}
    for path, chain in stacks.items():
        a, b = _fold(chain, rank)
        out[f"{path}.lora_a"], out[f"{path}.lora_b"] = a, b
    return out, rank


def _rank(m: nn.Module) -> int:
    return m.lora_a.shape[-2] if isinstance(m, LoRASwitchLinear) else m.lora_a.shape[-1]


def _fold(chain: list[nn.Module], rank: int) -> tuple[mx.array, mx.array]:
    first = chain[0]
    if isinstance(first, LoRASwitchLinear):  # a: [E, r, in], b: [E, out, r]
        a = mx.concatenate([m.lora_a for m in chain], axis=1)
        b = mx.concatenate([m.scale * m.lora_b for m in chain], axis=2)
        pad = rank - a.shape[1]
        a = mx.pad(a, [(0, 0), (0, pad), (0, 0)])
        b = mx.pad(b, [(0, 0), (0, 0), (0, pad)])
    else:  # a: [in, r], b: [r, out] (embeddings: [num, r], [r, dims])
        a = mx.concatenate([m.lora_a for m in chain], axis=1)
        b = mx.concatenate([m.scale * m.lora_b for m in chain], axis=0)
        pad = rank - a.shape[1]
        a = mx.pad(a, [(0, 0), (0, pad)])
        b = mx.pad(b, [(0, pad), (0, 0)])
    return a, b


def relative_key(model: nn.Module, path: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``."""
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[i + 2 :])
    return path
