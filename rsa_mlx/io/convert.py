"""Hugging Face -> MLX: mlx-lm's converter, with checks and an atomic result.

``mlx_lm.convert`` does the work (casting, quantisation, the tokenizer). Around
it: the source is checked first (folder, config, architecture, safetensors)
so bad input fails in one line before anything is written; the output is
built in a temporary folder next to ``mlx_path`` and renamed into place
only when complete; RoPE keys that transformers >= 5 nests under
``rope_parameters`` are restored to the top level, where mlx-lm reads them
(:func:`rsa_mlx.io.hf.config_fixes`); a sentencepiece ``tokenizer.model`` is carried over so
the folder also loads where only the slow tokenizer is understood.

A ``.gguf`` file (llama.cpp / Ollama) is first turned into a float32 Hugging
Face folder by :func:`rsa_mlx.io.gguf.gguf_to_hf` (de-quantised exactly), then
converted the same way; ``-q`` re-quantises it, with groups of 32 (GGUF's own
block size) unless ``--q-group-size`` says otherwise: groups of 64 measurably
broke SmolLM2-135M's answers where 32 kept them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

from mlx_lm.convert import convert as mlx_convert

from rsa_mlx.io import hf
from rsa_mlx.io.formats import DTYPES, Q_MODES
from rsa_mlx.io.gguf import gguf_to_hf
from rsa_mlx.util.errors import InputError


def convert(
    hf_path: str | Path,
    mlx_path: str | Path = "mlx_model",
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    dtype: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Convert a HF model (local folder or Hub id) to an mlx-lm folder.

    Arguments are ``mlx_lm.convert``'s: ``dtype`` defaults to the config's
    ``torch_dtype``; ``quantize`` with ``q_bits``/``q_group_size``/``q_mode``
    (mlx-lm's defaults when None). Returns ``mlx_path``.
    """

    if q_mode not in Q_MODES:
        raise InputError(f"--q-mode {q_mode!r}: choose one of {', '.join(Q_MODES)}")
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    with ExitStack() as stack:
        out = stack.enter_context(hf.staged_folder(mlx_path, "--mlx-path"))
        if str(hf_path).endswith(".gguf"):
            tmp = stack.enter_context(
                tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-")
            )
            source = gguf_to_hf(hf_path, Path(tmp) / "hf", dtype="float32")
            if quantize and q_group_size is None:
                q_group_size = 32
        else:
            source = hf.snapshot(hf_path, revision, allow_patterns=hf.MODEL_PATTERNS)
        hf.check_model_folder(source, trust_remote_code)
        mlx_convert(
            str(source),
            mlx_path=str(out),
            quantize=quantize,
            q_bits=q_bits,
            q_group_size=q_group_size,
            q_mode=q_mode,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        config = json.loads((out / "config.json").read_text())
        if fixes := hf.config_fixes(config):
            (out / "config.json").write_text(json.dumps({**config, **fixes}, indent=4))
        spm = source / "tokenizer.model"
        if spm.exists() and not (out / spm.name).exists():
            shutil.copy2(spm, out / spm.name)
    return Path(mlx_path)
