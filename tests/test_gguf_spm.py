"""Sentencepiece vocabularies in (tokenizer.ggml.model = llama).

A Llama-style sentencepiece BPE model (byte fallback, split digits) is
trained here with the ``sentencepiece`` package, written to GGUF as
llama.cpp's converter writes it, and converted. The Hugging Face tokenizer
must give sentencepiece's own ids on plain text, and llama.cpp's ids
(its ``llm_tokenizer_spm``, written out below) on text with special tokens,
where llama.cpp puts a space after each special token.
"""

from __future__ import annotations

import heapq
import json
import re

import mlx.core as mx
import numpy as np
import pytest

from rsa_mlx.io.gguf import gguf_to_hf
from rsa_mlx.util.errors import InputError
from tests.gguf_tiny import (
    model_meta,
    sentencepiece_meta,
    train_sentencepiece,
    write_gguf,
)
from tests.hf_tiny import hf_config

TEXTS = [
    "Hello world",  # ASCII
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus Köln, ça va? naïve café",  # accents
    "東京は日本の首都です。",  # CJK
    "emoji 🙂🚀 and ✅",  # byte fallback (not in the vocabulary)
    "Numbers 2024, 12345 and 3.14",  # digits, split
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\n\ttab",  # newlines
    "ŋ ɐ ʃ Ω ж",  # characters the model never saw: bytes
    "",
]
SPECIAL_TEXTS = [
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<s>already a bos</s>",
    "x<|im_end|>y",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


def llama_cpp_ids(text: str, meta: dict, parse_special: bool = True) -> list[int]:
    """llama.cpp's tokenisation of a sentencepiece vocabulary (llama-vocab.cpp:
    llm_tokenizer_spm_session and the SPM branch of tokenize_impl)."""
    tokens = meta["tokenizer.ggml.tokens"]
    scores, types = meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]
    ids = {t: i for i, t in enumerate(tokens)}
    specials = sorted(
        (t for t, k in zip(tokens, types) if k in (2, 3, 4)), key=len, reverse=True
    )
    pattern = "(" + "|".join(map(re.escape, specials)) + ")"
    parts = re.split(pattern, text) if parse_special else [text]
    out = (
        [meta["tokenizer.ggml.bos_token_id"]]
        if meta.get("tokenizer.ggml.add_bos_token", True)
        else []
    )
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    prev_special = True
    for i, part in enumerate(parts):
        if i % 2 == 1 and parse_special:
            out.append(ids[part])
            prev_special = True
        elif part:
            raw = " " + part if prefix and prev_special else part
            out += _spm_session(raw.replace(" ", "▁"), ids, scores)
            prev_special = False
    if meta.get("tokenizer.ggml.add_eos_token", False):
        out.append(meta["tokenizer.ggml.eos_token_id"])
    return out


def _spm_session(text: str, ids: dict, scores) -> list[int]:
    sym = [[c, i - 1, i + 1 if i + 1 < len(text) else -1] for i, c in enumerate(text)]
    heap = []

    def add(left, right):
        if left == -1 or right == -1:
            return
        joined = sym[left][0] + sym[right][0]
        if joined in ids:  # highest score first, then leftmost
            heapq.heappush(heap, (-scores[ids[joined]], left, right, len(joined)))

    for i in range(1, len(sym)):
        add(i - 1, i)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        a, b = sym[left], sym[right]
        if not a[0] or not b[0] or len(a[0]) + len(b[0]) != size:
            continue
        a[0], b[0], a[2] = a[0] + b[0], "", b[2]
        if b[2] != -1:
            sym[b[2]][1] = left
        add(a[1], left)
        add(left, a[2])
    out, i = [], 0 if sym else -1
    while i != -1:
        piece = sym[i][0]
        out += (
            [ids[piece]]
            if piece in ids
            else [ids[f"<0x{c:02X}>"] for c in piece.encode()]
        )
        i = sym[i][2]
    return out


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """(sentencepiece processor, GGUF metadata, converted folder)."""
    import sentencepiece

    root = tmp_path_factory.mktemp("spm")
    model = train_sentencepiece()
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    meta = sentencepiece_meta(model, **{"tokenizer.chat_template": CHAT_TEMPLATE})
    out = convert(root, meta, sp.get_piece_size())
    return sp, meta, out


def convert(root, meta: dict, vocab: int, name: str = "m"):
    """A tiny random llama with vocabulary ``meta``, as GGUF, converted."""
    config = {**hf_config("llama", vocab), "model_type": "llama"}
    rng = np.random.default_rng(0)
    hidden, ff, layers = config["hidden_size"], config["intermediate_size"], 2
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden),
            f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ff, hidden), f"blk.{i}.ffn_up.weight": (ff, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ff),
        })  # fmt: skip
    tensors = {
        n: (0, rng.normal(size=s).astype(np.float32) * 0.2) for n, s in shapes.items()
    }
    path = write_gguf(root / f"{name}.gguf", tensors, {**model_meta(config), **meta})
    return gguf_to_hf(path, root / name)


def test_plain_text_gives_sentencepiece_ids(spm):
    from transformers import AutoTokenizer

    sp, meta, out = spm
    tok = AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        want = [1, *sp.encode(text)]  # add_bos: llama.cpp's default
        assert tok.encode(text) == want, text
        assert llama_cpp_ids(text, meta) == want, text
        assert tok.decode(want, skip_special_tokens=True) == sp.decode(want) == text
    assert sp.encode("🙂", out_type=str)[-4:] == [
        "<0xF0>",
        "<0x9F>",
        "<0x99>",
        "<0x82>",
    ]


def test_special_tokens_split_as_llama_cpp_splits_them(spm):
    from transformers import AutoTokenizer

    _, meta, out = spm
    tok = AutoTokenizer.from_pretrained(str(out))
    for text in SPECIAL_TEXTS:
        assert tok.encode(text) == llama_cpp_ids(text, meta), text
    chat = [{"role": "user", "content": "Hello 🙂"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nHello 🙂<|im_end|>\n<|im_start|>assistant\n"
    assert ids == llama_cpp_ids(text, {**meta, "tokenizer.ggml.add_bos_token": False})
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")


def test_flags_and_no_space_prefix(spm, tmp_path):
    from transformers import AutoTokenizer

    sp, meta, _ = spm
    flags = {
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": True,
        "tokenizer.ggml.add_space_prefix": False,
    }
    out = convert(tmp_path, {**meta, **flags}, sp.get_piece_size())
    tok = AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS + SPECIAL_TEXTS:
        want = llama_cpp_ids(text, {**meta, **flags})
        assert tok.encode(text) == want, text
        assert want[-1] == 2 and (want[:1] != [1] or text.startswith("<s>"))
    assert (
        tok.decode(tok.encode("Hello world"), skip_special_tokens=True) == "Hello world"
    )


def test_mlx_lm_loads_it_with_the_sentencepiece_detokenizer(spm):
    from mlx_lm import load

    sp, _, out = spm
    model, tokenizer = load(str(out))
    assert type(tokenizer.detokenizer).__name__ == "SPMStreamingDetokenizer"
    ids = tokenizer.encode("Grüße 🙂 12345\nok")
    assert ids == [1, *sp.encode("Grüße 🙂 12345\nok")]
    detok = tokenizer.detokenizer
    detok.reset()
    for i in ids[1:]:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == "Grüße 🙂 12345\nok"
    assert np.isfinite(np.array(model(mx.array([ids])))).all()


def test_a_vocabulary_that_is_not_fully_described_is_refused(spm, tmp_path):
    sp, meta, _ = spm
    short = {**meta, "tokenizer.ggml.scores": meta["tokenizer.ggml.scores"][:-1]}
    with pytest.raises(InputError, match="scores has 399 entries for 400 tokens"):
        convert(tmp_path, short, sp.get_piece_size(), "short")
    assert not (tmp_path / "short").exists()
