"""Model folders: fetching from the Hugging Face Hub, and checks with clear errors.

Shared by the converters (:mod:`rsa_mlx.io.convert`, :mod:`rsa_mlx.export.hf`) and
the loader (:func:`rsa_mlx.tuner.model.load`), so that a missing folder, an unknown
architecture or a truncated safetensors file is one line naming the file,
not a traceback from deep inside a loader.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub
import mlx_lm
from mlx_lm.utils import MODEL_REMAPPING

from rsa_mlx.util.errors import InputError, quote

# What mlx-lm fetches for a model (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS).
MODEL_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]

# Architectures whose mlx-lm ``Model.sanitize`` at most drops keys (rotary
# ``inv_freq``, a tied ``lm_head``) and whose MLX parameter names are the HF
# names: for these the MLX weights *are* the HF checkpoint. Checked by reading
# each ``sanitize`` in mlx-lm 0.32. Others (MoE expert stacking, conv
# transposes, fused projections) are rearranged with no inverse, so they are
# refused rather than exported wrongly.
EXPORTABLE = frozenset(
    {
        "cohere",
        "ernie4_5",
        "exaone",
        "gemma",
        "gemma2",
        "gemma3_text",
        "glm",
        "granite",
        "helium",
        "hunyuan_v1_dense",
        "internlm3",
        "llama",
        "mistral",
        "olmo2",
        "phi3",
        "qwen2",
        "qwen3",
        "seed_oss",
        "smollm3",
        "starcoder2",
    }
)


def snapshot(
    source: str | Path,
    revision: str | None = None,
    repo_type: str = "model",
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local folder for ``source``: itself if it exists, else a Hub snapshot.

    Hub ids are fetched with huggingface-hub; without a network the local
    cache is used when it holds the files. A missing path that cannot be a
    Hub id (``./x``, ``/x``, ``~/x``, ``x``, ``a/b/c``, or ``a/b`` where
    ``a`` is a local folder) is reported as a missing folder, never as a
    failed download; for an ``org/name`` that is neither, the one-line error
    names both possibilities.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if not looks_like_hub_id(text):
        raise InputError(f"no such folder {quote(source)}")

    kwargs = {"revision": revision, "repo_type": repo_type}
    kwargs["allow_patterns"] = allow_patterns
    try:
        return Path(huggingface_hub.snapshot_download(text, **kwargs))
    except Exception as first:  # offline: the local cache, if it has the files
        try:
            return Path(
                huggingface_hub.snapshot_download(text, local_files_only=True, **kwargs)
            )
        except Exception:
            raise InputError(
                f"no such folder {quote(source)}, and no Hugging Face {repo_type} "
                f"{text!r} could be fetched or found in the cache "
                f"({type(first).__name__})"
            ) from None


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_hub_id(text: str) -> bool:
    """Whether a missing local ``text`` may be a Hub id ``org/name``."""
    if not _HUB_ID.fullmatch(text) or ".." in text or text.endswith(".git"):
        return False
    return not Path(text.split("/")[0]).exists()  # "runs/x" with runs/ here: local


def read_config(folder: Path) -> dict:
    """``folder/config.json``, with one-line errors."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise InputError(f"no such model folder {quote(folder)}")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{quote(path)}: missing (not a model folder?)") from None
    except UnicodeDecodeError:
        raise InputError(f"{quote(path)}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise InputError(
            f"{quote(path)}:{e.lineno}: malformed JSON ({e.msg})"
        ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise InputError(f"{quote(path)}: no 'model_type' field")
    return config


def mlx_model_type(config: dict) -> str:
    """The mlx-lm module name for ``config`` (after mlx-lm's remapping)."""

    model_type = config["model_type"]
    return MODEL_REMAPPING.get(model_type, model_type)


def check_architecture(folder: Path, config: dict) -> None:
    """Raise unless mlx-lm has a model for ``config['model_type']``."""
    name = mlx_model_type(config)
    if importlib.util.find_spec(f"mlx_lm.models.{name}") is None:
        raise InputError(
            f"{quote(Path(folder) / 'config.json')}: model_type {config['model_type']!r} "
            f"is not an architecture mlx-lm {mlx_lm.__version__} supports"
        )


def config_fixes(config: dict) -> dict:
    """Top-level keys mlx-lm reads that transformers >= 5 nests elsewhere.

    transformers 5 writes ``rope_parameters: {rope_theta, rope_type, ...}``
    instead of ``rope_theta`` and ``rope_scaling``; mlx-lm 0.32 reads only the
    old keys and silently falls back to its default base (1e6 for qwen2), so
    a model saved by a recent transformers would load with the wrong RoPE.
    """
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return {}
    fixes = {}
    if "rope_theta" not in config and "rope_theta" in rope:
        fixes["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if (
        "rope_scaling" not in config
        and scaling.get("rope_type", "default") != "default"
    ):
        fixes["rope_scaling"] = scaling
    return fixes


def check_exportable(folder: Path, config: dict) -> None:
    """Raise unless the MLX weights of this architecture are its HF weights."""
    model_type = config["model_type"]
    if model_type not in EXPORTABLE and mlx_model_type(config) not in EXPORTABLE:
        raise InputError(
            f"{quote(Path(folder) / 'config.json')}: cannot export model_type "
            f"{model_type!r} to Hugging Face: mlx-lm's loader rearranges its "
            "weights (Model.sanitize) and has no inverse; exportable: "
            + ", ".join(sorted(EXPORTABLE))
        )


def check_safetensors(path: Path) -> Path:
    """Check a safetensors file's header and size; return ``path``.

    A file cut short or overwritten raises ``ValueError`` naming it, before
    a loader fails on it with a less helpful message.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"{quote(path)}: missing") from None
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (struct.error, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
        raise InputError(f"{quote(path)}: corrupt safetensors file ({e})") from None
    except ValueError as e:
        raise InputError(f"{quote(path)}: corrupt safetensors file ({e})") from None
    if 8 + n + end > size:
        raise InputError(
            f"{quote(path)}: corrupt safetensors file (truncated: {size} bytes, the "
            f"header needs {8 + n + end})"
        )
    return path


def check_model_folder(folder: Path) -> dict:
    """All checks for a model folder mlx-lm will load; returns its config."""
    folder = Path(folder)
    config = read_config(folder)
    check_architecture(folder, config)
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        other = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pth")
        )
        hint = f" (found {other[0]}: convert it to safetensors)" if other else ""
        raise InputError(f"{quote(folder)}: no model*.safetensors weights{hint}")
    for path in files:
        check_safetensors(path)
    return config


@contextmanager
def staged_folder(path: str | Path, flag: str) -> Iterator[Path]:
    """A path (not yet created) that becomes ``path`` only if the body succeeds.

    Built next to ``path`` and renamed into place, so a failure leaves
    nothing half-written; an existing ``path`` is never touched.
    """
    path = Path(path)
    if os.path.lexists(path):  # a dangling link too
        raise InputError(
            f"{quote(path)}: already exists; remove it or choose another {flag}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield work / "out"
        (work / "out").rename(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
