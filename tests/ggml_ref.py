"""ggml's block formats, written here from ggml-quants.c and ggml-common.h:
the reference the reader is checked against, independent of the ``gguf``
package the reader uses.

``decode(blocks, kind)``: ggml's ``dequantize_row_*`` loops, one block per
row of ``blocks`` (uint8, ``type_size`` bytes each), float32 arithmetic in
the C order (no fused multiply-add). ``encode(values, kind)``: a plain
quantiser per type (the largest magnitude sets the scales; not llama.cpp's
error search, which only changes which of the valid blocks is written).
"""

from __future__ import annotations

import numpy as np

F32, F16 = 0, 1
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K = 10, 11, 12, 13, 14, 15
BF16 = 30
QK_K = 256
# type -> (values per block, bytes per block)
SIZES = {
    Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24),
    Q8_0: (32, 34), Q2_K: (256, 84), Q3_K: (256, 110), Q4_K: (256, 144),
    Q5_K: (256, 176), Q6_K: (256, 210), Q8_K: (256, 292),
}  # fmt: skip
NAMES = {
    Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0",
    Q2_K: "Q2_K", Q3_K: "Q3_K", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K",
    Q8_K: "Q8_K",
}  # fmt: skip
f32 = np.float32


def half(b: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32 of two bytes per block: shape (nb, 1)."""
    return np.ascontiguousarray(b).view("<f2").astype(f32)


def _i(a) -> np.ndarray:  # small integers, exactly, as float32
    return np.asarray(a).astype(f32)


# --- decode: ggml's dequantize_row_* ----------------------------------------


def _q4_0(x):
    d, qs = half(x[:, :2]), x[:, 2:18].astype(np.int32)
    return np.concatenate([_i((qs & 0xF) - 8) * d, _i((qs >> 4) - 8) * d], 1)


def _q4_1(x):
    d, m, qs = half(x[:, :2]), half(x[:, 2:4]), x[:, 4:20].astype(np.int32)
    return np.concatenate([_i(qs & 0xF) * d + m, _i(qs >> 4) * d + m], 1)


def _q5(x, with_min: bool):
    d = half(x[:, :2])
    m = half(x[:, 2:4]) if with_min else None
    at = 4 if with_min else 2
    qh = np.ascontiguousarray(x[:, at : at + 4]).view("<u4").astype(np.int64)
    qs = x[:, at + 4 : at + 20].astype(np.int64)
    j = np.arange(16)
    xh_0 = ((qh >> j) << 4) & 0x10
    xh_1 = (qh >> (j + 12)) & 0x10
    x0, x1 = (qs & 0x0F) | xh_0, (qs >> 4) | xh_1
    if with_min:
        return np.concatenate([_i(x0) * d + m, _i(x1) * d + m], 1)
    return np.concatenate([_i(x0 - 16) * d, _i(x1 - 16) * d], 1)


def _q8_0(x):
    return _i(x[:, 2:34].view(np.int8)) * half(x[:, :2])


def _q2_k(x):
    scales, qs = x[:, :16].astype(np.int32), x[:, 16:80].astype(np.int32)
    d, dmin = half(x[:, 80:82]), half(x[:, 82:84])
    y, is_ = [], 0
    for n in range(0, QK_K, 128):
        q = qs[:, n // 4 : n // 4 + 32]
        for shift in (0, 2, 4, 6):
            for half_ in (q[:, :16], q[:, 16:]):
                sc = scales[:, is_ : is_ + 1]
                is_ += 1
                dl, ml = d * _i(sc & 0xF), dmin * _i(sc >> 4)
                y.append(dl * _i((half_ >> shift) & 3) - ml)
    return np.concatenate(y, 1)


def _q3_k_scales(raw: np.ndarray) -> np.ndarray:
    """The memcpy/kmask shuffle of dequantize_row_q3_K: 16 signed scales."""
    aux = np.ascontiguousarray(raw).view("<u4").astype(np.int64)  # (nb, 3)
    kmask1, kmask2 = 0x03030303, 0x0F0F0F0F
    tmp = aux[:, 2]
    out = np.stack(
        [
            (aux[:, 0] & kmask2) | (((tmp >> 0) & kmask1) << 4),
            (aux[:, 1] & kmask2) | (((tmp >> 2) & kmask1) << 4),
            ((aux[:, 0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4),
            ((aux[:, 1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4),
        ],
        1,
    ).astype("<u4")
    return out.view(np.int8).astype(np.int32)  # (nb, 16)


def _q3_k(x):
    hm, qs = x[:, :32].astype(np.int32), x[:, 32:96].astype(np.int32)
    scales, d_all = _q3_k_scales(x[:, 96:108]), half(x[:, 108:110])
    y, is_, m = [], 0, 1
    for n in range(0, QK_K, 128):
        q = qs[:, n // 4 : n // 4 + 32]
        for shift in (0, 2, 4, 6):
            for lo in (0, 16):
                dl = d_all * _i(scales[:, is_ : is_ + 1] - 32)
                is_ += 1
                low = (q[:, lo : lo + 16] >> shift) & 3
                high = np.where(hm[:, lo : lo + 16] & m, 0, 4)
                y.append(dl * _i(low - high))
            m <<= 1
    return np.concatenate(y, 1)


def scale_min_k4(j: int, q: np.ndarray):
    """get_scale_min_k4: the 6-bit scale and min of sub-block j."""
    if j < 4:
        return q[:, j : j + 1] & 63, q[:, j + 4 : j + 5] & 63
    sc = (q[:, j + 4 : j + 5] & 0xF) | ((q[:, j - 4 : j - 3] >> 6) << 4)
    m = (q[:, j + 4 : j + 5] >> 4) | ((q[:, j : j + 1] >> 6) << 4)
    return sc, m


def _q45_k(x, five: bool):
    d, dmin = half(x[:, :2]), half(x[:, 2:4])
    scales = x[:, 4:16].astype(np.int32)
    qh = x[:, 16:48].astype(np.int32) if five else None
    ql = x[:, 48:176].astype(np.int32) if five else x[:, 16:144].astype(np.int32)
    y, u1, u2 = [], 1, 2
    for is_, j in enumerate(range(0, QK_K, 64)):
        q = ql[:, j // 2 : j // 2 + 32]
        (sc1, m1), (sc2, m2) = (
            scale_min_k4(2 * is_, scales),
            scale_min_k4(2 * is_ + 1, scales),
        )
        d1, mm1, d2, mm2 = d * _i(sc1), dmin * _i(m1), d * _i(sc2), dmin * _i(m2)
        lo, hi = q & 0xF, q >> 4
        if five:
            lo = lo + np.where(qh & u1, 16, 0)
            hi = hi + np.where(qh & u2, 16, 0)
            u1, u2 = u1 << 2, u2 << 2
        y += [d1 * _i(lo) - mm1, d2 * _i(hi) - mm2]
    return np.concatenate(y, 1)


def _q6_k(x):
    ql, qh = x[:, :128].astype(np.int32), x[:, 128:192].astype(np.int32)
    sc, d = _i(x[:, 192:208].view(np.int8)), half(x[:, 208:210])
    y = np.zeros((len(x), QK_K), f32)
    for n in range(0, QK_K, 128):
        a, b = ql[:, n // 2 : n // 2 + 32], ql[:, n // 2 + 32 : n // 2 + 64]
        h = qh[:, n // 4 : n // 4 + 32]
        s = sc[:, n // 16 : n // 16 + 8]
        for l0 in (0, 16):  # is = l / 16
            sl = slice(l0, l0 + 16)
            is_ = l0 // 16
            q1 = ((a[:, sl] & 0xF) | (((h[:, sl] >> 0) & 3) << 4)) - 32
            q2 = ((b[:, sl] & 0xF) | (((h[:, sl] >> 2) & 3) << 4)) - 32
            q3 = ((a[:, sl] >> 4) | (((h[:, sl] >> 4) & 3) << 4)) - 32
            q4 = ((b[:, sl] >> 4) | (((h[:, sl] >> 6) & 3) << 4)) - 32
            for k, q in enumerate((q1, q2, q3, q4)):
                at = n + 32 * k + l0
                y[:, at : at + 16] = d * s[:, is_ + 2 * k : is_ + 2 * k + 1] * _i(q)
    return y


def _q8_k(x):
    d = np.ascontiguousarray(x[:, :4]).view("<f4")
    return d * _i(x[:, 4:260].view(np.int8))


DECODERS = {
    Q4_0: _q4_0,
    Q4_1: _q4_1,
    Q5_0: lambda x: _q5(x, False),
    Q5_1: lambda x: _q5(x, True),
    Q8_0: _q8_0,
    Q2_K: _q2_k,
    Q3_K: _q3_k,
    Q4_K: lambda x: _q45_k(x, False),
    Q5_K: lambda x: _q45_k(x, True),
    Q6_K: _q6_k,
    Q8_K: _q8_k,
}


def decode(raw: np.ndarray, kind: int, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 values of a quantised tensor's bytes, as ggml computes them."""
    size = SIZES[kind][1]
    return DECODERS[kind](raw.reshape(-1, size)).reshape(shape)


# --- encode: a plain quantiser per type ------------------------------------


def _div(a, b):
    b = np.broadcast_to(b, np.broadcast(a, b).shape)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape, f32), where=b != 0)


def _f16(a) -> np.ndarray:
    """float16 bytes of (nb,) values, and the float32 the decoder will see."""
    h = np.asarray(a, f32).astype(np.float16).reshape(-1, 1)
    return h.view(np.uint8), h.astype(f32)


def _signed_max(sub: np.ndarray) -> np.ndarray:
    """Each sub-block's value of largest magnitude, with its sign."""
    at = np.abs(sub).argmax(2)[..., None]
    return np.take_along_axis(sub, at, 2)[..., 0]


def _pack_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """12 bytes of eight 6-bit scales and mins (get_scale_min_k4's inverse)."""
    out = np.zeros((len(sc), 12), np.uint8)
    for j in range(4):
        out[:, j] = sc[:, j] | ((sc[:, j + 4] >> 4) << 6)
        out[:, j + 4] = m[:, j] | ((m[:, j + 4] >> 4) << 6)
        out[:, j + 8] = (sc[:, j + 4] & 0xF) | ((m[:, j + 4] & 0xF) << 4)
    return out


def _affine_k(x, n_sub: int, qmax: int, smax: int):
    """Per sub-block scale and min (value = d*sc*q - dmin*m), quantised."""
    sub = x.reshape(len(x), n_sub, -1)
    lo = np.minimum(sub.min(2), 0)
    scale, mins = (sub.max(2) - lo) / qmax, -lo
    d_bytes, d = _f16(scale.max(1) / smax)
    m_bytes, dmin = _f16(mins.max(1) / smax)
    sc = np.clip(np.round(_div(scale, d)), 0, smax).astype(np.int64)
    m = np.clip(np.round(_div(mins, dmin)), 0, smax).astype(np.int64)
    q = np.round(_div(sub + (dmin * m)[..., None], (d * sc)[..., None]))
    q = np.clip(q, 0, qmax).astype(np.int64).reshape(len(x), -1)
    return d_bytes, m_bytes, sc, m, q


def _enc_q2_k(x):
    d, dmin, sc, m, q = _affine_k(x, 16, 3, 15)
    qs = np.zeros((len(x), 64), np.int64)
    for e in range(QK_K):
        n, r = divmod(e, 128)
        j, at = divmod(r, 32)
        qs[:, 32 * n + at] |= q[:, e] << (2 * j)
    scales = (sc | (m << 4)).astype(np.uint8)
    return np.concatenate([scales, qs.astype(np.uint8), d, dmin], 1)


def _enc_q3_k(x):
    sub = x.reshape(len(x), 16, 16)
    scale = _signed_max(sub) / -4  # the largest magnitude is q = -4
    d_bytes, d = _f16(np.abs(scale).max(1) / 31)
    sc = np.clip(np.round(_div(scale, d)), -32, 31).astype(np.int64)
    q = np.clip(np.round(_div(sub, (d * sc)[..., None])), -4, 3).astype(np.int64)
    u = (q + 4).reshape(len(x), -1)
    qs, hm = np.zeros((len(x), 64), np.int64), np.zeros((len(x), 32), np.int64)
    for e in range(QK_K):
        n, r = divmod(e, 128)
        j, at = divmod(r, 32)
        qs[:, 32 * n + at] |= (u[:, e] & 3) << (2 * j)
        hm[:, at] |= (u[:, e] >> 2) << (4 * n + j)
    scales = np.zeros((len(x), 12), np.int64)
    for s in range(16):
        g, k = divmod(s, 4)
        v = sc[:, s] + 32
        scales[:, k + 4 * (g % 2)] |= (v & 0xF) << (4 * (g // 2))
        scales[:, 8 + k] |= (v >> 4) << (2 * g)
    parts = [hm, qs, scales]
    return np.concatenate([p.astype(np.uint8) for p in parts] + [d_bytes], 1)


def _enc_q45_k(x, five: bool):
    d, dmin, sc, m, q = _affine_k(x, 8, 31 if five else 15, 63)
    ql, qh = np.zeros((len(x), 128), np.int64), np.zeros((len(x), 32), np.int64)
    for s in range(8):
        vals = q[:, 32 * s : 32 * s + 32]
        ql[:, 32 * (s // 2) : 32 * (s // 2) + 32] |= (vals & 0xF) << (4 * (s % 2))
        qh |= (vals >> 4) << s
    parts = [d, dmin, _pack_k4(sc, m)] + ([qh.astype(np.uint8)] if five else [])
    return np.concatenate([*parts, ql.astype(np.uint8)], 1)


def _enc_q6_k(x):
    sub = x.reshape(len(x), 16, 16)
    scale = _signed_max(sub) / -32  # the largest magnitude is q = -32
    d_bytes, d = _f16(np.abs(scale).max(1) / 127)
    sc = np.clip(np.round(_div(scale, d)), -127, 127).astype(np.int64)
    q = np.clip(np.round(_div(sub, (d * sc)[..., None])), -32, 31).astype(np.int64)
    u = (q + 32).reshape(len(x), -1)
    ql, qh = np.zeros((len(x), 128), np.int64), np.zeros((len(x), 64), np.int64)
    for e in range(QK_K):
        n, r = divmod(e, 128)
        k, at = divmod(r, 32)
        ql[:, 64 * n + 32 * (k % 2) + at] |= (u[:, e] & 0xF) << (4 * (k // 2))
        qh[:, 32 * n + at] |= (u[:, e] >> 4) << (2 * k)
    scales = sc.astype(np.int8).view(np.uint8)
    return np.concatenate(
        [ql.astype(np.uint8), qh.astype(np.uint8), scales, d_bytes], 1
    )


def _enc_q8_k(x):
    d = (np.abs(x).max(1, keepdims=True) / 127).astype(f32)
    q = np.clip(np.round(_div(x, d)), -127, 127).astype(np.int8)
    sums = q.reshape(len(x), 16, 16).sum(2, dtype=np.int16)
    return np.concatenate([d.view(np.uint8), q.view(np.uint8), sums.view(np.uint8)], 1)


ENCODERS = {
    Q2_K: _enc_q2_k,
    Q3_K: _enc_q3_k,
    Q4_K: lambda x: _enc_q45_k(x, False),
    Q5_K: lambda x: _enc_q45_k(x, True),
    Q6_K: _enc_q6_k,
    Q8_K: _enc_q8_k,
}


def encode(values: np.ndarray, kind: int) -> np.ndarray:
    """``values`` (rows of whole blocks) as ggml blocks: uint8 (rows, bytes).

    The 32-value types use the gguf package's quantisers (bit-exact with
    ggml's reference ones); the k-quants (which it cannot write) ours.
    """
    block = SIZES[kind][0]
    rows = values.astype(f32).reshape(-1, values.shape[-1])
    if kind in ENCODERS:
        blocks = ENCODERS[kind](rows.reshape(-1, block))
        return blocks.reshape(len(rows), -1)
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(rows, GGMLQuantizationType(kind))


def random_blocks(kind: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` blocks of random bytes whose float16/float32 scales are finite."""
    rng = np.random.default_rng(seed)
    size = SIZES[kind][1]
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    scale = rng.normal(size=(n, 2)).astype(np.float16).view(np.uint8)
    at = {Q2_K: [80, 82], Q3_K: [108], Q6_K: [208], Q4_1: [0, 2], Q5_1: [0, 2]}
    at.update({Q4_K: [0, 2], Q5_K: [0, 2]})
    for i, offset in enumerate(at.get(kind, [0])):
        if kind == Q8_K:
            raw[:, :4] = rng.normal(size=(n, 1)).astype("<f4").view(np.uint8)
        else:
            raw[:, offset : offset + 2] = scale[:, 2 * i : 2 * i + 2]
    return raw
