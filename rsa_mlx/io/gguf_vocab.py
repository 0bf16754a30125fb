"""GGUF vocabularies in: a ``tokenizers.Tokenizer`` that tokenises as
llama.cpp does.

Two kinds (``tokenizer.ggml.model``):

* ``gpt2``, byte-level BPE: the vocabulary and merges as they are, the
  pre-tokenizer named by ``tokenizer.ggml.pre`` (:data:`PRE_TOKENIZERS`).
* ``llama``, sentencepiece (Llama 2, Mistral, TinyLlama, Gemma): llama.cpp
  merges the adjacent pair whose joined text is the highest-scoring token
  (``llm_tokenizer_spm``), spaces are ``▁`` with one in front of the text
  and after each special token (``add_space_prefix``), and text no token
  covers falls back to ``<0xNN>`` byte tokens. That is a BPE whose merges
  are every split of a normal token into two tokens, ranked by the joined
  token's score: what Hugging Face's Llama tokenizers are too.

Anything the file does not describe in full (no scores, lists of different
lengths, a special token id outside the vocabulary, an unknown
pre-tokenizer or tokenizer kind) is refused in one line naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import PreTrainedTokenizerFast

from rsa_mlx.util.errors import InputError, quote

# Split regexes, as in the HF tokenizer.json files of these model families.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp's own sequence for files that name no known pre-tokenizer.
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> the regexes applied one after the other (each splits
# the pieces of the one before, keeping matches and gaps), then byte-level.
# "digits" is the individual-digit split of the starcoder/smollm family.
# The first name of each sequence is the one an export writes.
PRE_TOKENIZERS = {
    "gpt-2": (_GPT2,),
    "gpt2": (_GPT2,),
    "phi-2": (_GPT2,),
    "smollm": ("digits", _GPT2),
    "starcoder": ("digits", _GPT2),
    "refact": ("digits", _GPT2),
    "codeshell": ("digits", _GPT2),
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "falcon3": (_LLAMA3,),
    "pixtral": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
    "default": _DEFAULT,
}
KINDS = {"gpt2": "byte-level BPE", "llama": "sentencepiece"}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPECIAL_KEYS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
# llama.cpp's defaults where a sentencepiece file names no special token.
SPM_DEFAULT_IDS = {"bos": 1, "eos": 2, "unk": 0}


def pre_tokenizer(steps):
    """A ``tokenizers`` pre-tokenizer: each regex splits, then byte-level."""

    if steps == (_GPT2,):  # what GPT-2's own tokenizer.json says
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    parts = []
    for i, step in enumerate(steps):
        if step == "digits":
            parts.append(pre_tokenizers.Digits(individual_digits=True))
        elif step == _GPT2 and i == len(steps) - 1:  # ByteLevel's own regex
            parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False))
        else:
            parts.append(pre_tokenizers.Split(Regex(step), behavior="isolated"))
    if not isinstance(parts[-1], pre_tokenizers.ByteLevel):
        parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(parts)


class Vocab:
    """The tokenizer keys of a GGUF file, checked: tokens, types, ids."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        self.kind = meta.get("tokenizer.ggml.model")
        if self.kind not in KINDS:
            supported = ", ".join(f"{k!r} ({v})" for k, v in KINDS.items())
            self.fail(
                f"tokenizer type {self.kind!r} is not supported (supported: {supported})"
            )
        self.tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(self.tokens, list) or not self.tokens:
            self.fail("no tokenizer.ggml.tokens list: the vocabulary is not described")
        self.types = self.numbers("token_type", required=self.kind == "llama")
        if self.types is None:
            self.types = [NORMAL] * len(self.tokens)
        self.ids = self.special_ids()

    def fail(self, why: str):
        raise InputError(f"{quote(self.path)}: {why}")

    def numbers(self, key: str, required: bool) -> list | None:
        """A per-token list (token_type, scores), as long as the tokens."""
        value = self.meta.get(f"tokenizer.ggml.{key}")
        if value is None:
            if required:
                self.fail(
                    f"no tokenizer.ggml.{key}: the {KINDS[self.kind]} vocabulary "
                    "is not fully described"
                )
            return None
        if not hasattr(value, "tolist") or len(value) != len(self.tokens):
            self.fail(
                f"tokenizer.ggml.{key} has {len(value)} entries for "
                f"{len(self.tokens)} tokens"
            )
        return value.tolist()

    def special_ids(self) -> dict[str, int]:
        defaults = SPM_DEFAULT_IDS if self.kind == "llama" else {}
        ids = {}
        for name, key in SPECIAL_KEYS.items():
            token_id = self.meta.get(
                f"tokenizer.ggml.{key}_token_id", defaults.get(name)
            )
            if token_id is None:
                continue
            if not isinstance(token_id, int) or not 0 <= token_id < len(self.tokens):
                self.fail(
                    f"tokenizer.ggml.{key}_token_id {token_id!r} is not a token "
                    f"id (the vocabulary has {len(self.tokens)})"
                )
            ids[name] = token_id
        return ids

    def flag(self, name: str) -> bool:
        """add_bos_token / add_eos_token, with llama.cpp's defaults."""
        value = self.meta.get(f"tokenizer.ggml.add_{name}_token")
        if value is not None:
            return bool(value)
        pre = PRE_TOKENIZERS.get(self.meta.get("tokenizer.ggml.pre", "default"))
        return name == "bos" and (self.kind == "llama" or pre == (_LLAMA3,))

    def added(self) -> list[AddedToken]:
        """Control, unknown and user-defined tokens, matched before the model."""
        return [
            AddedToken(token, special=kind != USER_DEFINED, normalized=False)
            for token, kind in zip(self.tokens, self.types)
            if kind in (CONTROL, UNKNOWN, USER_DEFINED)
        ]


def build_tokenizer(path: Path, meta: dict) -> tuple[Tokenizer, Vocab]:
    """The GGUF vocabulary in ``meta`` as a ``tokenizers.Tokenizer``."""
    vocab = Vocab(path, meta)
    core = _bpe(vocab) if vocab.kind == "gpt2" else _sentencepiece(vocab)
    core.add_tokens(vocab.added())
    ends = {
        name: (vocab.tokens[vocab.ids[name]], vocab.ids[name])
        for name in ("bos", "eos")
        if name in vocab.ids and vocab.flag(name)
    }
    if ends:
        bos, eos = ([ends[n][0]] if n in ends else [] for n in ("bos", "eos"))
        single = " ".join([*bos, "$A:0", *eos])
        pair = single + " " + " ".join([*bos, "$B:1", *eos])
        core.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=sorted(set(ends.values()))
        )
    elif vocab.kind == "gpt2":
        core.post_processor = processors.ByteLevel(trim_offsets=False)
    return core, vocab


def _bpe(vocab: Vocab) -> Tokenizer:
    pre = vocab.meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        vocab.fail(
            f"pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(PRE_TOKENIZERS)})"
        )
    raw = vocab.meta.get("tokenizer.ggml.merges")
    if not isinstance(raw, list) or not raw:
        vocab.fail(
            "no tokenizer.ggml.merges: the BPE vocabulary is not fully described"
        )
    merges = []
    for i, merge in enumerate(raw):
        cut = merge.find(" ", 1)
        if cut < 0:
            vocab.fail(f"merge {i} ({merge!r}) is not two tokens")
        merges.append((merge[:cut], merge[cut + 1 :]))
    core = Tokenizer(
        models.BPE(
            vocab={token: i for i, token in enumerate(vocab.tokens)},
            merges=merges,
            ignore_merges=PRE_TOKENIZERS[pre] == (_LLAMA3,),
        )
    )
    core.pre_tokenizer = pre_tokenizer(PRE_TOKENIZERS[pre])
    core.decoder = decoders.ByteLevel()
    return core


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list:
    """llama.cpp's sentencepiece merging as BPE merges.

    Every split of a normal token into two tokens is a merge, ranked by the
    joined token's score (highest first; llama.cpp breaks ties by position,
    which only matters between equal scores), then by the token's id.
    """
    ids = {token: i for i, token in enumerate(tokens)}
    ranked = [
        (-scores[i], i, cut)
        for i, (token, kind) in enumerate(zip(tokens, types))
        if kind == NORMAL
        for cut in range(1, len(token))
        if token[:cut] in ids and token[cut:] in ids
    ]
    ranked.sort()
    return [(tokens[i][:cut], tokens[i][cut:]) for _, i, cut in ranked]


def _sentencepiece(vocab: Vocab) -> Tokenizer:
    scores = vocab.numbers("scores", required=True)
    unk = vocab.ids.get("unk")
    core = Tokenizer(
        models.BPE(
            vocab={token: i for i, token in enumerate(vocab.tokens)},
            merges=spm_merges(vocab.tokens, scores, vocab.types),
            unk_token=None if unk is None else vocab.tokens[unk],
            fuse_unk=True,
            byte_fallback=BYTE in vocab.types,
        )
    )
    # llama.cpp: a space in front of every piece of text (at the start and
    # after each special token), then spaces as "▁". Prepend, not Metaspace,
    # whose "always" skips text that already starts with a space.
    prefix = bool(vocab.meta.get("tokenizer.ggml.add_space_prefix", True))
    spaces = normalizers.Replace(" ", "▁")
    core.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if prefix else spaces
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    core.decoder = decoders.Sequence(steps)
    return core


def save_tokenizer(core: Tokenizer, vocab: Vocab, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template)."""

    special = {f"{name}_token": vocab.tokens[i] for name, i in vocab.ids.items()}
    fast = PreTrainedTokenizerFast(tokenizer_object=core, **special)
    template = vocab.meta.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(out))
    # The chat template in tokenizer_config.json too (transformers 5 writes
    # chat_template.jinja), and a class older transformers know.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["add_bos_token"] = vocab.flag("bos")
    config["add_eos_token"] = vocab.flag("eos")
    if template:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
