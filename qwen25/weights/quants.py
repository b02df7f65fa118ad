"""ggml tensor types: the type ids, their block sizes, and numpy dequantizers for the types qwen25 reads.

Owns the bit layouts of ggml's `block_*` structs (ggml-common.h), written from the format, not from gguf-py
(which the tests use as the reference). Everything is vectorized over blocks; the only Python loop walks
fixed-size chunks of blocks so the temporaries stay in cache. Quantizing and quantized matmuls are not here.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from math import prod

import numpy as np

QK_K = 256  # super-block size of the k-quants


class GGMLType(IntEnum):
    """ggml tensor type ids as stored in a GGUF tensor info (ggml.h `enum ggml_type`)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


# (elements per block, bytes per block) for every type, so a reader can size any tensor it cannot decode.
BLOCK_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 40), GGMLType.IQ4_NL: (32, 18), GGMLType.MXFP4: (32, 17),
    GGMLType.Q2_K: (QK_K, 84), GGMLType.Q3_K: (QK_K, 110), GGMLType.Q4_K: (QK_K, 144),
    GGMLType.Q5_K: (QK_K, 176), GGMLType.Q6_K: (QK_K, 210), GGMLType.Q8_K: (QK_K, 292),
    GGMLType.IQ2_XXS: (QK_K, 66), GGMLType.IQ2_XS: (QK_K, 74), GGMLType.IQ3_XXS: (QK_K, 98),
    GGMLType.IQ1_S: (QK_K, 50), GGMLType.IQ3_S: (QK_K, 110), GGMLType.IQ2_S: (QK_K, 82),
    GGMLType.IQ4_XS: (QK_K, 136), GGMLType.IQ1_M: (QK_K, 56), GGMLType.TQ1_0: (QK_K, 54),
    GGMLType.TQ2_0: (QK_K, 66),
}


class UnsupportedQuantError(ValueError):
    """A ggml type this module cannot dequantize."""


def tensor_nbytes(ggml_type: GGMLType, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `shape` (any order; only the element count and row length matter) occupies."""
    block, type_size = BLOCK_SIZES[ggml_type]
    n = prod(shape)
    if shape and shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of the {ggml_type.name} block size {block}")
    return n // block * type_size


# --- per-type block decoders: (n_blocks, type_size) uint8 -> (n_blocks, block) float32 --------------------
# numpy is slow on short strided rows (a (n, 16) slice of (n, 22) blocks runs ~50x slower than a contiguous
# array), so fields are first copied out whole as void items, bit ops run on contiguous arrays, and the
# pieces are put back in element order with void-item copies as well (`_interleave`). Left shifts are
# written as multiplies: numpy's uint8 `<<` is not vectorized (~10x slower than `* 16`).
def _field(b: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Bytes start:stop of every block as a contiguous (n, stop - start) uint8 array."""
    w = stop - start
    return np.ascontiguousarray(b[:, start:stop].view(f"V{w}")).view(np.uint8).reshape(-1, w)


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block, as a (n, 1) float32 column."""
    return b[:, at:at + 2].view(np.float16).astype(np.float32)


def _interleave(parts: list[np.ndarray], outer: int = 1) -> np.ndarray:
    """Rows made of `outer` equal slices, each holding that slice of parts[0], then of parts[1], ...

    parts: same-shape (n, k) uint8 arrays. Returns (n, len(parts) * k) uint8."""
    n, k = parts[0].shape
    item = np.dtype(f"V{k // outer}")
    out = np.empty((n, outer, len(parts)), dtype=item)
    for i, p in enumerate(parts):
        out[:, :, i] = p.view(item)
    return out.view(np.uint8).reshape(n, -1)


def _nibbles(qs: np.ndarray, outer: int = 1) -> np.ndarray:
    # 32-blocks: element j is the low nibble of byte j, element j+16 its high nibble. k-quants (outer=4):
    # the same per 32 bytes, so 64 elements = 32 low nibbles then 32 high nibbles.
    return _interleave([qs & 0x0F, qs >> 4], outer)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """2-bit fields of the k-quants: (n, 64) -> (n, 256), element 128h + 32j + l = bits 2j.. of byte 32h + l."""
    return _interleave([(qs >> s) & 3 for s in (0, 2, 4, 6)], outer=2)


def _bit_planes(m: np.ndarray) -> np.ndarray:
    """(n, 32) -> (n, 256): element 32k + l is bit k of byte l (Q3_K hmask, Q5_K qh)."""
    return _interleave([(m >> k) & 1 for k in range(8)])


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) of its bits, bit k at column k."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _q4_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * (_nibbles(_field(b, 2, 18)).view(np.int8) - 8)


def _q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * _nibbles(_field(b, 4, 20)) + _f16(b, 2)


def _q5_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(_field(b, 6, 22)) | _high_bits(_field(b, 2, 6)) * 16
    return _f16(b, 0) * (q.view(np.int8) - 16)


def _q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(_field(b, 8, 24)) | _high_bits(_field(b, 4, 8)) * 16
    return _f16(b, 0) * q + _f16(b, 2)


def _q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * _field(b, 2, 34).view(np.int8)


def _scaled(scale: np.ndarray, q: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """Apply one (n, S) scale (and subtracted offset) per group of 256/S consecutive elements."""
    n, s = scale.shape
    y = scale[:, :, None] * q.reshape(n, s, -1)
    if offset is not None:
        y -= offset[:, :, None]
    return y.reshape(n, -1)


def _q2_k(b: np.ndarray) -> np.ndarray:
    # scales[16] (low nibble scale, high nibble min per 16 elements), qs[64], d, dmin
    sc = _field(b, 0, 16)
    return _scaled(_f16(b, 80) * (sc & 0x0F), _crumbs(_field(b, 16, 80)), _f16(b, 82) * (sc >> 4))


_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)


def _q3_k(b: np.ndarray) -> np.ndarray:
    # hmask[32], qs[64], scales[12] (16 six-bit scales, biased by 32), d
    high = _bit_planes(_field(b, 0, 32))  # bit 4h+j of hmask[l] -> element 128h + 32j + l
    q = (_crumbs(_field(b, 32, 96)) | high * 4).view(np.int8) - 4  # a clear high bit means "minus 4"
    s = _field(b, 96, 108)
    low = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)
    top = ((s[:, None, 8:12] >> _SHIFT2) & 3).reshape(-1, 16)  # scale k: bits 2(k//4).. of s[8 + k%4]
    scale = (low | (top << 4)).view(np.int8) - 32
    return _scaled(_f16(b, 108) * scale, q)


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs packed in 12 bytes by Q4_K/Q5_K (ggml's get_scale_min_k4)."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _q4_k(b: np.ndarray) -> np.ndarray:
    # d, dmin, scales[12], qs[128]; 8 sub-blocks of 32
    sc, mn = _k_scale_min(_field(b, 4, 16))
    return _scaled(_f16(b, 0) * sc, _nibbles(_field(b, 16, 144), outer=4), _f16(b, 2) * mn)


def _q5_k(b: np.ndarray) -> np.ndarray:
    # d, dmin, scales[12], qh[32], qs[128]; bit s of qh[l] is the 5th bit of element 32s + l
    sc, mn = _k_scale_min(_field(b, 4, 16))
    q = _nibbles(_field(b, 48, 176), outer=4) | _bit_planes(_field(b, 16, 48)) * 16
    return _scaled(_f16(b, 0) * sc, q, _f16(b, 2) * mn)


def _q6_k(b: np.ndarray) -> np.ndarray:
    # ql[128], qh[64], scales[16] int8, d. Per 128-half h: element 128h + 32t + l takes
    # nibble t // 2 of ql[64h + 32(t % 2) + l] and bits 2t.. of qh[32h + l].
    low = _nibbles(_field(b, 0, 128), outer=2)
    q = (low | _crumbs(_field(b, 128, 192)) * 16).view(np.int8) - 32
    return _scaled(_f16(b, 208) * _field(b, 192, 208).view(np.int8), q)


def _f32(b: np.ndarray) -> np.ndarray:
    return b.view(np.float32)  # dequantize() copies it into its output


def _f16_values(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)


def _bf16(b: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an fp32
    return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


_DECODERS: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: _f32, GGMLType.F16: _f16_values, GGMLType.BF16: _bf16,
    GGMLType.Q4_0: _q4_0, GGMLType.Q4_1: _q4_1, GGMLType.Q5_0: _q5_0, GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0, GGMLType.Q2_K: _q2_k, GGMLType.Q3_K: _q3_k, GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k, GGMLType.Q6_K: _q6_k,
}
SUPPORTED_TYPES: frozenset[GGMLType] = frozenset(_DECODERS)

_CHUNK_ELEMENTS = 1 << 18  # ~1 MiB of float32 output per step keeps every temporary in L2/L3


def dequantize(raw: np.ndarray, ggml_type: GGMLType | int, shape: tuple[int, ...]) -> np.ndarray:
    """Decode the bytes of one tensor into a new float32 array of `shape` (torch order: rows last-axis contiguous)."""
    try:
        ggml_type = GGMLType(ggml_type)
    except ValueError:
        raise UnsupportedQuantError(f"unknown ggml type id {int(ggml_type)}") from None
    decode = _DECODERS.get(ggml_type)
    if decode is None:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise UnsupportedQuantError(f"cannot dequantize ggml type {ggml_type.name}; supported: {supported}")
    shape = tuple(int(d) for d in shape)
    nbytes = tensor_nbytes(ggml_type, shape)
    raw = np.asarray(raw).reshape(-1).view(np.uint8)
    if raw.size != nbytes:
        raise ValueError(f"{ggml_type.name} tensor of shape {shape} needs {nbytes} bytes, got {raw.size}")
    block, type_size = BLOCK_SIZES[ggml_type]
    blocks = raw.reshape(-1, type_size)
    out = np.empty((blocks.shape[0], block), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // block)
    for start in range(0, blocks.shape[0], step):
        out[start:start + step] = decode(blocks[start:start + step])
    return out.reshape(shape)
