"""GGUF files that are damaged, hostile or not fully described: one line
naming the file (an InputError, exit status 2 on the command line), nothing
written, and the output path checked before any work.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from rsa_mlx.io.gguf import gguf_to_hf
from rsa_mlx.io.gguf_file import read_header
from rsa_mlx.util.errors import InputError, quote
from tests.gguf_tiny import tiny_gguf


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


def test_impossible_sizes(tmp_path):
    path = tiny_gguf(tmp_path / "g.gguf", **{"llama.attention.head_count": 0})
    refused(path, tmp_path, "metadata key llama.attention.head_count is 0")
    path = tiny_gguf(tmp_path / "h.gguf", **{"llama.block_count": "two"})
    refused(path, tmp_path, "metadata key llama.block_count is 'two'")


@pytest.mark.parametrize(("kind", "name"), [(16, "IQ2_XXS"), (20, "IQ4_NL")])
def test_iq_quants_are_refused_by_name(tmp_path, kind, name):
    size = {16: 66, 20: 18}[kind]  # one 256-block / eight 32-blocks of bytes
    blocks = np.zeros((2, size if kind == 16 else 8 * size), np.uint8)
    path = tiny_gguf(
        tmp_path / "g.gguf", tensors={"blk.0.ffn_up.weight": (kind, blocks)}
    )
    message = refused(path, tmp_path, f"tensor type {name} (of 'blk.0.ffn_up.weight')")
    assert "Q4_K" in message  # the supported types are listed


def test_unknown_tensor_type_id(tmp_path):
    path = tiny_gguf(tmp_path / "g.gguf")
    data = bytearray(path.read_bytes())
    at = data.index(b"output_norm.weight") + len("output_norm.weight") + 4 + 8
    data[at : at + 4] = struct.pack("<I", 99)  # the tensor's ggml type
    path.write_bytes(bytes(data))
    refused(path, tmp_path, "unknown tensor type id 99")


def test_truncated_file(tmp_path):
    path = tiny_gguf(tmp_path / "g.gguf")
    path.write_bytes(path.read_bytes()[:-64])
    message = refused(path, tmp_path, "not a valid GGUF file")
    assert "extends past the end of the file" in message
    path.write_bytes(path.read_bytes()[:100])
    refused(path, tmp_path, "not a valid GGUF file")


def header(*fields: bytes, n_tensors: int = 0, n_kv: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"".join(fields)


@pytest.mark.parametrize(
    ("claim", "what"),
    [
        (2**40, "the name of metadata key 0"),  # 1 TiB: was MemoryError
        (2**62, "the name of metadata key 0"),  # was [Errno 22], no file name
    ],
)
def test_lengths_are_checked_against_the_file_size(tmp_path, claim, what):
    """Issue 22, item 10: a huge claimed length is one line naming the file."""
    path = tmp_path / "huge.gguf"
    path.write_bytes(header(struct.pack("<Q", claim), b"x" * 64))
    message = refused(path, tmp_path, what)
    assert f"needs {claim} bytes; the file has 64 left" in message


def test_huge_strings_and_arrays_inside_the_header(tmp_path):
    key = struct.pack("<Q", 3) + b"k.x"
    string = key + struct.pack("<IQ", 8, 2**62) + b"abc"
    path = tmp_path / "s.gguf"
    path.write_bytes(header(string))
    refused(path, tmp_path, "k.x at byte")
    strings = key + struct.pack("<IIQ", 9, 8, 2**62) + b"abc"  # array of strings
    path.write_bytes(header(strings))
    refused(path, tmp_path, f"claims {2**62} strings")
    numbers = key + struct.pack("<IIQ", 9, 4, 2**61) + b"abc"  # array of uint32
    path.write_bytes(header(numbers))
    refused(path, tmp_path, f"needs {2**63} bytes")
    path.write_bytes(header(n_kv=2**60))
    refused(path, tmp_path, f"{2**60} keys claimed")
    name = struct.pack("<Q", 1) + b"t" + struct.pack("<I", 9) + bytes(64)  # 9 dims
    path.write_bytes(header(name, n_tensors=1, n_kv=0))
    refused(path, tmp_path, "tensor 't' has 9 dimensions")


def test_not_a_gguf_or_missing(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("hello, not a model")
    refused(path, tmp_path, "not a GGUF file")
    refused(tmp_path / "missing.gguf", tmp_path, "no such GGUF file")


def test_tokenizers_the_file_does_not_fully_describe(tmp_path):
    cases = [
        ({"tokenizer.ggml.model": "bert"}, "tokenizer type 'bert' is not supported"),
        ({"tokenizer.ggml.pre": "brand-new"}, "pre-tokenizer 'brand-new'"),
        ({"tokenizer.ggml.merges": ["ab"]}, "merge 0 ('ab') is not two tokens"),
        ({"tokenizer.ggml.bos_token_id": 7}, "bos_token_id 7 is not a token id"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "token_type has 2 entries for 3"),
        ({"tokenizer.ggml.model": "llama"}, "no tokenizer.ggml.token_type"),
        (
            {"tokenizer.ggml.model": "llama", "tokenizer.ggml.token_type": [2, 3, 3]},
            "no tokenizer.ggml.scores: the sentencepiece vocabulary is not fully",
        ),
    ]
    for i, (meta, match) in enumerate(cases):
        refused(tiny_gguf(tmp_path / f"{i}.gguf", **meta), tmp_path, match)
    path = tiny_gguf(tmp_path / "nomerges.gguf")
    data = path.read_bytes().replace(b"tokenizer.ggml.merges", b"tokenizer.ggml.nomerg")
    path.write_bytes(data)
    refused(path, tmp_path, "no tokenizer.ggml.merges")


def test_bad_dtype_and_existing_output(tmp_path):
    path = tiny_gguf(tmp_path / "g.gguf")
    with pytest.raises(InputError, match="dtype 'int8'"):
        gguf_to_hf(path, tmp_path / "out", dtype="int8")
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="already exists"):
        gguf_to_hf(path, tmp_path / "out")


def test_a_dangling_link_as_output_is_refused_before_reading(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    # the input is missing too: the output is checked first
    with pytest.raises(InputError, match=r"'.*link': already exists"):
        gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "link")
    assert os.path.islink(tmp_path / "link")


def test_the_header_reader_is_quick_on_a_big_vocabulary(tmp_path):
    tokens = [f"tok{i}" for i in range(100_000)]
    path = tiny_gguf(
        tmp_path / "g.gguf",
        **{"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [1] * 100_000},
    )
    start = time.perf_counter()
    meta = read_header(path).meta
    assert meta["tokenizer.ggml.tokens"] == tokens
    assert time.perf_counter() - start < 5  # about 0.1 s; GGUFReader: seconds
