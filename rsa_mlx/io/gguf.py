"""GGUF -> Hugging Face: a llama.cpp model file as a normal HF model folder.

:func:`gguf_to_hf` reads a GGUF file with ``mx.load`` (which returns
Q4_0/Q4_1/Q8_0 tensors as MLX affine-quantised triples), de-quantises or
casts every tensor to one dtype, renames it to its HF name, undoes the row
permutation llama.cpp applies to the q/k projections of the llama
architecture, and rebuilds the byte-level BPE tokenizer with ``tokenizers``.
The result (``model.safetensors``, ``config.json``, ``tokenizer.json``,
``tokenizer_config.json``) loads in mlx-lm and in transformers, so the usual
HF -> MLX conversion applies to it unchanged.

Supported: architectures ``llama`` (which also holds Mistral) and ``qwen2``;
tensor types F32, F16, BF16, Q4_0, Q4_1, Q8_0; tokenizers of type ``gpt2``
(byte-level BPE) with the pre-tokenizers in :data:`PRE_TOKENIZERS`. Anything
else is refused with an :class:`~rsa_mlx.util.errors.InputError` naming the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)
from transformers import PreTrainedTokenizerFast

from rsa_mlx.io import hf
from rsa_mlx.util.errors import InputError, quote

DTYPES = ("float32", "float16", "bfloat16")

# GGUF architecture -> (HF model_type, HF architecture class, q/k permuted?).
# llama.cpp permutes the q/k rows only for the llama architecture
# (convert_hf_to_gguf.py: LlamaModel.permute); qwen2 keeps HF's layout.
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}

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
PRE_TOKENIZERS = {
    "gpt-2": (_GPT2,),
    "gpt2": (_GPT2,),
    "phi-2": (_GPT2,),
    "smollm": ("digits", _GPT2),
    "starcoder": ("digits", _GPT2),
    "refact": ("digits", _GPT2),
    "codeshell": ("digits", _GPT2),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "falcon3": (_LLAMA3,),
    "pixtral": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
    "default": _DEFAULT,
}

# ggml tensor types mx.load returns exactly (Q*: as affine-quantised triples).
TENSOR_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 30: "BF16"}
GGML_TYPE_NAMES = {
    **TENSOR_TYPES,
    6: "Q5_0",
    7: "Q5_1",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4


def gguf_to_hf(
    gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32"
) -> Path:
    """Write the GGUF model ``gguf_path`` as a Hugging Face folder ``out_dir``.

    Every tensor is de-quantised or cast to ``dtype`` ("float32", "float16"
    or "bfloat16"). ``out_dir`` must not exist; it appears only when complete.
    Returns ``out_dir``. Raises :class:`InputError` (one line naming the file)
    for a missing, truncated or unsupported file.
    """
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    path = Path(gguf_path)
    if not path.is_file():
        raise InputError(f"{quote(path)}: no such GGUF file")
    if Path(out_dir).exists():  # before the slow part (staged_folder says so too)
        raise FileExistsError(
            f"{out_dir}: already exists; remove it or choose another output folder"
        )
    tensors, meta = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise InputError(
            f"{quote(path)}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    config = hf_config(path, meta, tensors, dtype)
    tokenizer = build_tokenizer(path, meta)  # before writing: fail early
    weights = hf_weights(path, meta, tensors, dtype)
    with hf.staged_folder(out_dir, "output folder") as out:
        out.mkdir()

        mx.save_safetensors(
            str(out / "model.safetensors"), weights, metadata={"format": "pt"}
        )
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_tokenizer(tokenizer, meta, out)
    return Path(out_dir)


def read_gguf(path: Path) -> tuple[dict, dict]:
    """``mx.load`` of a GGUF file: (tensors, metadata), with one-line errors.

    The tensor types are checked first: ``mx.load`` would silently decode
    some other types (k-quants) to float16, with an extra rounding and a
    decoder this module does not check; those are refused instead.
    """

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"{quote(path)}: not a GGUF file (no GGUF magic)")
    try:
        types = tensor_types(path)
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{quote(path)}: cannot read this GGUF file ({e})") from None
    bad = {n: t for n, t in types.items() if t not in TENSOR_TYPES}
    if bad:
        name, kind = next(iter(bad.items()))
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise InputError(
            f"{quote(path)}: tensor type {GGML_TYPE_NAMES.get(kind, kind)} "
            f"(of {name!r}{more}) is not supported "
            f"(supported: {', '.join(TENSOR_TYPES.values())})"
        )
    try:
        return mx.load(str(path), format="gguf", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        reason = " ".join(str(e).replace("[load_gguf]", "").split())
        raise InputError(
            f"{quote(path)}: cannot read this GGUF file ({reason})"
        ) from None


# GGUF metadata value types with a fixed size: type id -> struct format.
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?"}
_FIXED.update({10: "Q", 11: "q", 12: "d"})
_STRING, _ARRAY = 8, 9


def tensor_types(path: Path) -> dict[str, int]:
    """Each tensor's ggml type id, read from the GGUF header (version 2 or 3)."""
    with open(path, "rb") as f:

        def unpack(fmt):
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) < size:
                raise ValueError("header cut short")
            return struct.unpack("<" + fmt, data)[0]

        def skip(kind):
            if kind in _FIXED:
                f.seek(struct.calcsize(_FIXED[kind]), 1)
            elif kind == _STRING:
                f.seek(unpack("Q"), 1)
            elif kind == _ARRAY:
                item, count = unpack("I"), unpack("Q")
                if item in _FIXED:
                    f.seek(count * struct.calcsize(_FIXED[item]), 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                raise ValueError(f"unknown metadata type {kind}")

        def string():
            n = unpack("Q")
            data = f.read(n)
            if len(data) < n:
                raise ValueError("header cut short")
            return data.decode()

        f.seek(4)
        if unpack("I") not in (2, 3):
            raise ValueError("unsupported GGUF version")
        n_tensors, n_kv = unpack("Q"), unpack("Q")
        for _ in range(n_kv):
            string()
            skip(unpack("I"))
        types = {}
        for _ in range(n_tensors):
            name = string()
            f.seek(8 * unpack("I"), 1)  # the dimensions
            types[name] = unpack("I")
            unpack("Q")  # offset
        return types


def _value(meta: dict, key: str, default=None):
    """A metadata value as a Python scalar (MLX returns 0-d arrays)."""
    value = meta.get(key, default)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
        if isinstance(value, float):  # a float32: its shortest decimal (1e-05)
            value = float(str(np.float32(value)))
    return value


def hf_config(path: Path, meta: dict, tensors: dict, dtype: str) -> dict:
    """config.json for the model in ``meta`` (GGUF metadata)."""
    arch = meta["general.architecture"]
    model_type, cls, _ = ARCHITECTURES[arch]

    def need(key):
        value = _value(meta, f"{arch}.{key}")
        if value is None:
            raise InputError(f"{quote(path)}: metadata key {arch}.{key} is missing")
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise InputError(f"{quote(path)}: no token_embd.weight tensor")
    config = {
        "architectures": [cls],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _value(meta, f"{arch}.attention.head_count_kv", heads),
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon"),
        "rope_theta": _value(meta, f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": need("context_length"),
        "vocab_size": embed.shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }
    head_dim = _value(meta, f"{arch}.attention.key_length")
    if head_dim is not None and head_dim != hidden // heads:
        config["head_dim"] = head_dim
    scaling = _value(meta, f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        factor = _value(meta, f"{arch}.rope.scaling.factor")
        config["rope_scaling"] = {"type": "linear", "factor": factor}
    elif scaling != "none" or "rope_freqs.weight" in tensors:
        kind = scaling if scaling != "none" else "llama3 (rope_freqs)"
        raise InputError(f"{quote(path)}: RoPE scaling {kind!r} is not supported")
    if arch == "qwen2":
        config["use_sliding_window"] = False
    for name in ("bos", "eos", "padding"):
        token_id = _value(meta, f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            key = "pad" if name == "padding" else name
            config[f"{key}_token_id"] = token_id
    return config


def _hf_name(name: str) -> str | None:
    """The HF name of GGUF tensor ``name`` (``blk.3.attn_q.weight``), or None."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
    return None


def _dequantize(weight, scales, biases, dtype: str):
    """An MLX affine-quantised triple (group 32) as a ``dtype`` array.

    The scales and biases are widened to float32 first, so a Q4_0/Q8_0
    value ``d * q`` comes out exactly as llama.cpp computes it.
    """

    bits = weight.shape[-1] // scales.shape[-1]  # 32 values per group
    out = mx.dequantize(
        weight,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=32,
        bits=bits,
    )
    return out.astype(getattr(mx, dtype))


def unpermute(w, n_head: int):
    """Undo llama.cpp's q/k row permutation (rows grouped by head, halves)."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_weights(path: Path, meta: dict, tensors: dict, dtype: str) -> dict:
    """The HF-named ``dtype`` tensors of a GGUF file's tensors."""

    arch = meta["general.architecture"]
    permuted = ARCHITECTURES[arch][2]
    heads = _value(meta, f"{arch}.attention.head_count")
    kv_heads = _value(meta, f"{arch}.attention.head_count_kv", heads)
    out = {}
    for name, array in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        hf_name = _hf_name(name)
        if hf_name is None:
            raise InputError(f"{quote(path)}: unexpected tensor {name!r} for {arch}")
        stem = name[: -len(".weight")] if name.endswith(".weight") else None
        if stem is not None and f"{stem}.scales" in tensors:
            w = _dequantize(
                array, tensors[f"{stem}.scales"], tensors[f"{stem}.biases"], dtype
            )
        elif mx.issubdtype(array.dtype, mx.floating):
            w = array.astype(getattr(mx, dtype))
        else:
            raise InputError(f"{quote(path)}: tensor {name!r} has type {array.dtype}")
        if permuted and ".attn_q." in name:
            w = unpermute(w, heads)
        elif permuted and ".attn_k." in name:
            w = unpermute(w, kv_heads)
        out[hf_name] = w
    mx.eval(out)
    return out


def _pre_tokenizer(steps):
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


def build_tokenizer(path: Path, meta: dict):
    """The GGUF byte-level BPE vocabulary as a ``tokenizers.Tokenizer``."""

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise InputError(
            f"{quote(path)}: tokenizer type {kind!r} is not supported "
            "(only 'gpt2', byte-level BPE; not sentencepiece 'llama')"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise InputError(
            f"{quote(path)}: pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(PRE_TOKENIZERS)})"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise InputError(f"{quote(path)}: no tokenizer.ggml.tokens list")
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for merge in meta.get("tokenizer.ggml.merges", []):
        cut = merge.find(" ", 1)
        merges.append((merge[:cut], merge[cut + 1 :]))
    core = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            ignore_merges=PRE_TOKENIZERS[pre] == (_LLAMA3,),
        )
    )
    core.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZERS[pre])
    core.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [1] * len(tokens)
    added = [
        AddedToken(token, special=kind == CONTROL, normalized=False)
        for token, kind in zip(tokens, types)
        if kind in (CONTROL, USER_DEFINED)
    ]
    core.add_tokens(added)
    bos = _value(meta, "tokenizer.ggml.bos_token_id")
    if bos is not None and _value(meta, "tokenizer.ggml.add_bos_token", False):
        core.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A:0",
            pair=f"{tokens[bos]} $A:0 {tokens[bos]} $B:1",
            special_tokens=[(tokens[bos], bos)],
        )
    else:
        core.post_processor = processors.ByteLevel(trim_offsets=False)
    return core


def save_tokenizer(core, meta: dict, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template)."""

    tokens = meta["tokenizer.ggml.tokens"]
    special = {}
    for name, key in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unknown"),
        ("pad_token", "padding"),
    ):
        token_id = _value(meta, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            special[name] = tokens[token_id]
    fast = PreTrainedTokenizerFast(tokenizer_object=core, **special)
    template = meta.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(out))
    # The chat template in tokenizer_config.json too (transformers 5 writes
    # chat_template.jinja), and a class older transformers know.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if template:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
