"""Quantised GGUF tensors in (rsa_mlx.io.gguf_file): every type the reader
accepts, block by block against ggml's own formulas (tests/ggml_ref.py,
written from ggml-quants.c, not from the gguf package the reader uses), and
end to end: a tiny model quantised to each type, converted, gives the
logits transformers gives for the de-quantised weights.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from rsa_mlx.io.gguf import gguf_to_hf
from rsa_mlx.io.gguf_file import read_header, read_tensor
from tests.ggml_ref import (
    NAMES,
    Q2_K,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    Q8_K,
    SIZES,
    decode,
    random_blocks,
)
from tests.gguf_tiny import hf_to_gguf, load_all, save_reference, write_gguf, write_hf
from tests.hf_tiny import torch_logits

KQUANTS = [Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K]
ALL = [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, *KQUANTS]


def same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal float32 values (0.0 and -0.0 alike; no NaN here)."""
    return a.shape == b.shape and bool(np.all(a == b))


@pytest.mark.parametrize("kind", ALL, ids=[NAMES[k] for k in ALL])
def test_random_blocks_decode_as_ggml_does(tmp_path, kind):
    """Random bytes (finite scales): every bit pattern of the quants."""
    block, size = SIZES[kind]
    rows = 8 if block == 256 else 64
    raw = random_blocks(kind, rows * 2, seed=kind).reshape(rows, 2 * size)
    path = write_gguf(
        tmp_path / "b.gguf", {"w": (kind, raw)}, {"general.architecture": "llama"}
    )
    info = read_header(path).tensors["w"]
    assert info.shape == (rows, 2 * block) and info.kind == kind
    got = read_tensor(path, info)
    want = decode(raw, kind, (rows, 2 * block))
    assert got.dtype == np.float32
    assert same_values(got, want), NAMES[kind]


@pytest.mark.parametrize("kind", KQUANTS, ids=[NAMES[k] for k in KQUANTS])
def test_quantised_values_are_close_to_the_original(kind):
    """The test's own quantiser is sane (so the models below are models)."""
    from tests.ggml_ref import encode

    x = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    err = np.abs(decode(encode(x, kind), kind, x.shape) - x).max()
    bound = {Q2_K: 1.2, Q3_K: 0.7, Q4_K: 0.25, Q5_K: 0.12, Q6_K: 0.07, Q8_K: 0.02}
    assert err < bound[kind]  # for values of scale 1


def convert_and_compare(tmp_path, quant: dict, kind: int):
    """A tiny llama (rows of 256) as GGUF: tensors exact, logits as torch's."""
    from mlx_lm import load

    orig = write_hf(tmp_path / "hf", "llama", tied=False, hidden=256)
    refs = hf_to_gguf(orig, tmp_path / "q.gguf", kind, quant)
    out = gguf_to_hf(tmp_path / "q.gguf", tmp_path / "out")
    got = load_all(out)
    for name, ref in refs.items():
        assert same_values(got[name], ref), name
    reference = save_reference(orig, refs, tmp_path / "reference")
    model, tokenizer = load(str(out))
    ids = tokenizer.encode("The capital of France is Paris. 1234 Grüße 🙂")
    mine = np.array(model(mx.array([ids])).astype(mx.float32))
    theirs = torch_logits(reference, np.array([ids]))
    gap = float(np.abs(mine - theirs).max() / np.abs(theirs).max())
    assert gap < 1e-5, gap
    return got, refs, gap


def test_a_mixed_file_like_q4_k_m(tmp_path):
    """Q4_K_M mixes Q4_K and Q6_K (and Q5_0/Q8_0 where rows are not whole
    256-blocks); here every type the reader knows, in one model."""
    prefix = "model.layers."
    quant = {
        "model.embed_tokens.weight": Q8_0,
        "lm_head.weight": Q6_K,
        f"{prefix}0.self_attn.q_proj.weight": Q4_K,
        f"{prefix}0.self_attn.k_proj.weight": Q5_0,
        f"{prefix}0.self_attn.v_proj.weight": Q6_K,
        f"{prefix}0.self_attn.o_proj.weight": Q5_K,
        f"{prefix}0.mlp.gate_proj.weight": Q3_K,
        f"{prefix}0.mlp.up_proj.weight": Q2_K,
        f"{prefix}0.mlp.down_proj.weight": Q8_K,
        f"{prefix}1.self_attn.q_proj.weight": Q4_0,
        f"{prefix}1.self_attn.k_proj.weight": Q4_1,
        f"{prefix}1.self_attn.v_proj.weight": Q5_1,
    }
    convert_and_compare(tmp_path, quant, Q4_K)
    kinds = {i.kind for i in read_header(tmp_path / "q.gguf").tensors.values()}
    assert set(ALL) <= kinds


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", [*KQUANTS, Q5_0, Q5_1], ids=[NAMES[k] for k in [*KQUANTS, Q5_0, Q5_1]]
)
def test_a_model_quantised_to_each_type(tmp_path, kind):
    _, _, gap = convert_and_compare(tmp_path, {}, kind)
    print(f"\n{NAMES[kind]}: logits of the converted model vs torch {gap:.1e}")
