"""Content hashes of input files, so that a sweep or a resumed run notices
that its data, prompts or model changed under the same name.

:func:`digest` streams a file (or every file of a folder, with its name
relative to the folder) through SHA-256. Model weights are the exception:
a ``.safetensors`` file counts by its header (every tensor's name, dtype,
shape and byte range) and its size, not its gigabytes, and other weight
files (``.bin``, ``.gguf``, ...), which mlx-lm does not read from a model
folder, are left out. Hidden files and folders (``.cache``, a lock) are
left out too.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

__all__ = ["digest", "file_sha256", "local_path"]

CHUNK = 1 << 20
SKIPPED = (".bin", ".pth", ".pt", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")


def local_path(value) -> Path | None:
    """``value`` as a resolved local path, or None when nothing is there
    (a Hugging Face id, a missing file)."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        return None
    path = Path(value).expanduser()
    return path.resolve() if path.exists() else None


def _file(h, path: Path) -> None:
    if path.suffix == ".safetensors":
        _safetensors_header(h, path)
        return
    _stream(h, path)


def _stream(h, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of every byte of one file (weights included), streamed."""
    h = hashlib.sha256()
    _stream(h, Path(path))
    return h.hexdigest()


def _safetensors_header(h, path: Path) -> None:
    """The header (names, dtypes, shapes, offsets) and the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        h.update(head + (f.read(n) if n <= size - 8 else b""))
    h.update(f"size={size}".encode())


def _files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            Path(root) / n
            for n in names
            if not n.startswith(".") and not n.endswith(SKIPPED)
        ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes, or of a folder's files in name
    order (see the module doc for weights and hidden files)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for file in _files(path):
            name = file.relative_to(path).as_posix().encode()
            h.update(len(name).to_bytes(4, "little") + name)
            sub = hashlib.sha256()
            _file(sub, file)
            h.update(sub.digest())
    else:
        _file(h, path)
    return f"sha256:{h.hexdigest()}"
