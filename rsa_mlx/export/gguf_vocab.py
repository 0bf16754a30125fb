"""A Hugging Face tokenizer folder as GGUF tokenizer keys, as llama.cpp's
``convert_hf_to_gguf.py`` writes them.

Two kinds, the ones :mod:`rsa_mlx.io.gguf_vocab` reads back:

* byte-level BPE (``gpt2``): tokens, types and merges; the pre-tokenizer is
  named by matching tokenizer.json's with the ones llama.cpp knows
  (:data:`~rsa_mlx.io.gguf_vocab.PRE_TOKENIZERS`), never guessed.
* sentencepiece BPE with byte fallback (``llama``): tokens, types and
  scores. The scores come from ``tokenizer.model`` when the folder has one;
  otherwise from the merge ranks of tokenizer.json (the token a merge makes
  scores minus its rank), which orders llama.cpp's merges as the BPE does.
  The ``gguf`` package's ``LlamaHfVocab`` gives every token -1000 instead,
  which makes llama.cpp merge left to right: with the test's vocabulary
  "for" becomes fo|r instead of sentencepiece's f|or
  (tests/test_gguf_export.py).

The special token ids, the add-BOS/EOS flags and the chat template are read
by the ``gguf`` package's ``SpecialVocab``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import sentencepiece
from tokenizers import Tokenizer, models

from rsa_mlx.io.gguf_vocab import (
    BYTE,
    CONTROL,
    NORMAL,
    PRE_TOKENIZERS,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    pre_tokenizer,
)
from rsa_mlx.util.errors import InputError, quote

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _normalized(spec):
    """A pre-tokenizer's JSON without its offset options (ids do not use them)."""
    if isinstance(spec, dict):
        return {k: _normalized(v) for k, v in spec.items() if k != "trim_offsets"}
    if isinstance(spec, list):
        return [_normalized(v) for v in spec]
    return spec


def pre_name(spec: dict | None) -> str | None:
    """The GGUF pre-tokenizer name of a tokenizer.json pre_tokenizer, or None."""
    probe = Tokenizer(models.BPE())
    for name, steps in PRE_TOKENIZERS.items():
        probe.pre_tokenizer = pre_tokenizer(steps)
        if _normalized(json.loads(probe.to_str())["pre_tokenizer"]) == _normalized(
            spec
        ):
            return name
    return None


def _is_sentencepiece(spec: dict) -> bool:
    model = spec.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts a ``▁`` in front of the text."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return (
        '"Prepend"' in text
        or re.search(r'"prepend_scheme": "(first|always)"', text) is not None
    )


def _token_table(spec: dict, n_vocab: int, sentencepiece: bool):
    """Tokens and types for ids 0..n_vocab-1 (missing ids: [PADn], unused)."""
    tokens = {i: t for t, i in spec["model"]["vocab"].items()}
    types = {}
    for added in spec.get("added_tokens", []):
        text = added["content"]
        if added.get("special"):
            types[added["id"]] = CONTROL
        else:  # llama.cpp stores user-defined spaces as spaces
            types[added["id"]] = USER_DEFINED
            text = text.replace("▁", " ") if sentencepiece else text
        tokens[added["id"]] = text
    unk = spec["model"].get("unk_token")
    out_tokens, out_types = [], []
    for i in range(n_vocab):
        token = tokens.get(i)
        if token is None:
            out_tokens.append(f"[PAD{i}]")
            out_types.append(UNUSED)
            continue
        kind = types.get(i, NORMAL)
        if sentencepiece and kind == NORMAL and _BYTE_TOKEN.fullmatch(token):
            kind = BYTE
        if token == unk:
            kind = UNKNOWN
        out_tokens.append(token)
        out_types.append(kind)
    return out_tokens, out_types


def _merges(spec: dict) -> list[tuple[str, str]]:
    return [
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
        for m in spec["model"].get("merges", [])
    ]


def _scores(folder: Path, spec: dict, tokens: list[str], types: list[int]) -> list:
    """Sentencepiece scores: tokenizer.model's, or minus each merge's rank."""
    model = folder / "tokenizer.model"
    if model.exists():
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
        n = sp.get_piece_size()
        return [
            sp.get_score(i) if i < n and sp.id_to_piece(i) == t else 0.0
            for i, t in enumerate(tokens)
        ]
    made = {}
    for rank, (a, b) in enumerate(_merges(spec)):
        made.setdefault(a + b, rank)
    last = -float(len(made) + 1)
    return [
        -float(made[t])
        if t in made
        else (last if kind == NORMAL and len(t) > 1 else 0.0)
        for t, kind in zip(tokens, types)
    ]


def add_vocab(w: gguf.GGUFWriter, folder: Path, n_vocab: int) -> None:
    """Write the tokenizer of HF folder ``folder`` into GGUF writer ``w``."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise InputError(
            f"{quote(folder)}: no tokenizer.json (GGUF export writes the "
            "vocabulary of a fast tokenizer)"
        )
    spec = json.loads(path.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise InputError(
            f"{quote(path)}: a {model.get('type')!r} tokenizer has no GGUF form "
            "here (byte-level BPE and sentencepiece BPE are written)"
        )
    n_tokens = len(
        model["vocab"].keys() | {t["content"] for t in spec.get("added_tokens", [])}
    )
    if n_tokens > n_vocab:
        raise InputError(
            f"{quote(path)}: {n_tokens} tokens for {n_vocab} embedding rows"
        )
    sentencepiece_bpe = _is_sentencepiece(spec)
    tokens, types = _token_table(spec, n_vocab, sentencepiece_bpe)
    if sentencepiece_bpe:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(_scores(Path(folder), spec, tokens, types))
        w.add_token_types(types)
        w.add_add_space_prefix(_space_prefix(spec))
    else:
        _add_bpe(w, path, spec, tokens, types)
    special = gguf.SpecialVocab(
        folder, load_merges=not sentencepiece_bpe, n_vocab=n_vocab
    )
    for name in ("bos", "eos"):  # llama.cpp's defaults differ by kind: say it
        special.add_special_token.setdefault(name, False)
    special.add_to_gguf(w, quiet=True)


def _add_bpe(w, path: Path, spec: dict, tokens: list[str], types: list[int]) -> None:
    pre = pre_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise InputError(
            f"{quote(path)}: its pre-tokenizer is none that llama.cpp names "
            f"(known: {', '.join(PRE_TOKENIZERS)})"
        )
    if not _merges(spec):
        raise InputError(
            f"{quote(path)}: a BPE without merges (llama.cpp cannot load one)"
        )
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
