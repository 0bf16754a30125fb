"""Files written whole or not at all: a temporary file, then a rename.

A reader (or a run interrupted mid-write) never sees half a file. The result
has the mode a plain ``open(path, "w")`` would give (0666 less the umask),
not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import mlx.core as mx


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then
    rename it onto ``path``; on any error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix
    )
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def plain(data):
    """``data`` with every NaN or infinite float made ``None``, so that it
    is JSON (``json.dumps`` would write bare ``NaN``/``Infinity``)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [plain(v) for v in data]
    return data


def dumps(data, **kwargs) -> str:
    """JSON text of ``data``, non-finite floats as ``null`` (:func:`plain`)."""
    return json.dumps(plain(data), allow_nan=False, default=str, **kwargs)


def save_json(path: str | Path, data) -> Path:
    """``data`` as JSON, whole or not at all; non-finite floats are
    written as ``null`` (:func:`plain`)."""

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(dumps(data, indent=2))
            f.write("\n")

    return write_atomic(path, write)


def save_text(path: str | Path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    return write_atomic(path, write)


def save_safetensors(path: str | Path, arrays: dict, metadata=None) -> Path:

    return write_atomic(
        path, lambda tmp: mx.save_safetensors(tmp, arrays, metadata or {})
    )
