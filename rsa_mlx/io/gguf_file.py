"""GGUF at the byte level: a header reader that trusts no length, and each
tensor as a float32 numpy array.

The tensors are de-quantised by the ``gguf`` package (llama.cpp's own
Python package: ``gguf.quants``, ggml's formulas in numpy, k-quants
included), plus Q8_K, which it lacks. The header is read here rather than
with ``gguf.GGUFReader`` for two measured reasons: GGUFReader builds a numpy
view per vocabulary entry (4.0 to 6.3 s for SmolLM2-135M's 49152 tokens and
48900 merges, against 0.3 to 0.45 s here, on a busy 2-core machine), and it
trusts the lengths in the file (a
string claiming more bytes than the file holds is silently cut, an array
claiming 2^62 entries loops for ever). Here every length and count is
checked against the bytes left before anything is read or allocated, so a
damaged or hostile file is one :class:`InputError` naming it.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from rsa_mlx.util.errors import InputError, quote

T = GGMLQuantizationType
# What gguf_to_hf de-quantises: gguf.quants' types, tested block by block
# against ggml's formulas in tests/test_gguf_quants.py, and Q8_K (ours).
SUPPORTED = (
    T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K,
)  # fmt: skip
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF metadata value types of a fixed size -> numpy dtype.
SCALARS = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
    7: "?", 10: "<u8", 11: "<i8", 12: "<f8",
}  # fmt: skip
STRING, ARRAY = 8, 9


def type_name(kind: int) -> str:
    """A ggml tensor type's name (Q4_K), or its number if unknown."""
    try:
        return T(kind).name
    except ValueError:
        return f"type id {kind}"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: its ggml type, numpy shape and bytes."""

    name: str
    kind: int
    shape: tuple[int, ...]  # numpy order: the ggml dimensions reversed
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    path: Path
    meta: dict
    tensors: dict[str, TensorInfo]


class _Cursor:
    """Reads a GGUF header from an mmap, checking each length first."""

    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, why: str):
        raise InputError(f"{quote(self.path)}: not a valid GGUF file ({why})")

    def take(self, n: int, what: str) -> bytes:
        left = self.size - self.pos
        if n > left:
            self.fail(
                f"{what} at byte {self.pos} needs {n} bytes; the file has {left} left"
            )
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def scalar(self, dtype: str, what: str):
        data = self.take(np.dtype(dtype).itemsize, what)
        return np.frombuffer(data, dtype)[0].item()

    def string(self, what: str) -> str:
        n = self.scalar("<u8", f"the length of {what}")
        data = self.take(n, what)
        try:
            return data.decode()
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {self.pos - n} is not UTF-8")

    def value(self, kind: int, what: str):
        if kind in SCALARS:
            value = self.scalar(SCALARS[kind], what)
            if kind == 6:  # float32: its shortest decimal (1e-05, not 9.99e-06)
                value = float(str(np.float32(value)))
            return value
        if kind == STRING:
            return self.string(what)
        if kind == ARRAY:
            return self.array(what)
        self.fail(f"{what} has unknown value type {kind}")

    def array(self, what: str):
        item = self.scalar("<u4", f"the item type of {what}")
        count = self.scalar("<u8", f"the length of {what}")
        if item in SCALARS:
            dtype = np.dtype(SCALARS[item])
            data = self.take(count * dtype.itemsize, what)
            return np.frombuffer(data, dtype).copy()
        if item != STRING:
            self.fail(f"{what} is an array of value type {item} (not supported)")
        if count * 8 > self.size - self.pos:  # each string has an 8-byte length
            self.fail(
                f"{what} at byte {self.pos} claims {count} strings; the file "
                f"has {self.size - self.pos} bytes left"
            )
        return [self.string(f"item {i} of {what}") for i in range(count)]


def read_header(path: str | Path) -> Header:
    """The metadata and tensor table of GGUF file ``path`` (version 2 or 3).

    Metadata values come back as Python scalars, strings, lists of strings
    or numpy arrays. Raises :class:`InputError` (one line naming the file)
    for anything that is not a complete GGUF file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{quote(path)}: no such GGUF file")
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 4 or f.seek(0) != 0 or f.read(4) != b"GGUF":
            raise InputError(f"{quote(path)}: not a GGUF file (no GGUF magic)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(path, buf, size))


def _parse(cur: _Cursor) -> Header:
    cur.pos = 4
    version = cur.scalar("<u4", "the version")
    if version not in (2, 3):
        cur.fail(f"GGUF version {version}; versions 2 and 3 are read")
    n_tensors = cur.scalar("<u8", "the tensor count")
    n_kv = cur.scalar("<u8", "the metadata count")
    for count, least, what in ((n_tensors, 24, "tensors"), (n_kv, 12, "keys")):
        if count * least > cur.size - cur.pos:  # the smallest entry's bytes
            cur.fail(f"{count} {what} claimed in a file of {cur.size} bytes")
    meta = {}
    for i in range(n_kv):
        key = cur.string(f"the name of metadata key {i}")
        kind = cur.scalar("<u4", f"the type of {key}")
        if key in meta:
            cur.fail(f"metadata key {key!r} appears twice")
        meta[key] = cur.value(kind, key)
    infos = [_tensor_info(cur, i) for i in range(n_tensors)]
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        cur.fail(f"general.alignment {align!r} is not a power of two")
    start = -(-cur.pos // align) * align
    tensors = {}
    for name, kind, shape, offset in infos:
        if name in tensors:
            cur.fail(f"tensor {name!r} appears twice")
        block, size = GGML_QUANT_SIZES[T(kind)]
        nbytes = int(np.prod(shape, dtype=object)) // block * size
        end = start + offset + nbytes
        if end > cur.size:
            cur.fail(
                f"tensor {name!r} extends past the end of the file: it ends "
                f"at byte {end}, the file has {cur.size}"
            )
        tensors[name] = TensorInfo(name, kind, shape, start + offset, nbytes)
    return Header(cur.path, meta, tensors)


def _tensor_info(cur: _Cursor, i: int) -> tuple[str, int, tuple[int, ...], int]:
    name = cur.string(f"the name of tensor {i}")
    n_dims = cur.scalar("<u4", f"the dimension count of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
    dims = [cur.scalar("<u8", f"dimension {d} of {name!r}") for d in range(n_dims)]
    kind = cur.scalar("<u4", f"the type of {name!r}")
    offset = cur.scalar("<u8", f"the offset of {name!r}")
    if kind not in GGML_QUANT_SIZES:
        cur.fail(f"tensor {name!r} has unknown tensor type id {kind}")
    block = GGML_QUANT_SIZES[T(kind)][0]
    if dims[0] % block:
        cur.fail(
            f"tensor {name!r}: rows of {dims[0]} values are not whole "
            f"{type_name(kind)} blocks of {block}"
        )
    return name, kind, tuple(reversed(dims)), offset


def read_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """Tensor ``info`` of GGUF file ``path`` as float32, de-quantised."""
    with open(path, "rb") as f:
        f.seek(info.offset)
        raw = np.frombuffer(f.read(info.nbytes), np.uint8)
    if len(raw) != info.nbytes:
        raise InputError(f"{quote(path)}: tensor {info.name!r} was cut short")
    block, size = GGML_QUANT_SIZES[T(info.kind)]
    rows = raw.reshape(-1, info.shape[-1] // block * size)
    if info.kind == T.Q8_K:
        values = dequantize_q8_k(rows.reshape(-1, size))
    else:
        values = quants.dequantize(rows, T(info.kind))
    return np.array(values, np.float32).reshape(info.shape)


def dequantize_q8_k(blocks: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_q8_K: ``d * q`` per block of 256, where a block
    is a float32 ``d``, 256 int8 ``q`` and 16 int16 sums (unused here)."""
    d = blocks[:, :4].copy().view("<f4")
    return d * blocks[:, 4:260].view(np.int8).astype(np.float32)
