"""Float weights to ggml blocks, in memory: Q8_0, Q5_0 and Q4_K, the formats `qwen25 quantize`, `quantization="q8"`
/ `"q4"`, LoRA merges and GRPO's rollout copy produce, and that the block kernels (`qwen25.kernels.ggml_matmul`)
and llama.cpp run as they run a GGUF file's own tensors.

Written from the block layouts (ggml-common.h; `weights.quants` decodes them); vectorized in torch, a chunk of
rows at a time so the temporaries stay small. Q8_0 and Q5_0 round as ggml's reference quantizers do, byte for
byte (the tests check against gguf-py). Q4_K has no single reference rounding: here each 32-value sub-block gets
the least-squares (scale, offset) of the best of a range of candidate code spans (offset <= 0, as the format
stores -dmin * m), then the eight scales and offsets are rounded to 6 bits against the super-block's fp16 d and
dmin, and the codes rounded again against the scales actually stored.
"""

from __future__ import annotations

import numpy as np
import torch

from qwen25.weights.quants import BLOCK_SIZES, GGMLType

ROWS_PER_CHUNK_VALUES = 1 << 22  # values quantized per step: bounds the fp32 temporaries to tens of MB
QUANTIZERS = (GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_K)

__all__ = ["QUANTIZERS", "block_bytes", "quantize_blocks", "quantize_blocks_", "quantize_q8_0"]


def block_bytes(ggml_type: GGMLType | int, rows: int, cols: int) -> int:
    """Bytes of a (rows, cols) tensor of `ggml_type` blocks."""
    qk, size = BLOCK_SIZES[GGMLType(ggml_type)]
    return rows * (cols // qk) * size


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _q8_0(x: torch.Tensor, out: torch.Tensor) -> None:
    """x (n, 32) fp32 blocks -> out (n, 34) uint8: fp16 d = absmax / 127, then 32 int8 roundf(x / d)."""
    d = x.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    out[:, :2] = d.half().view(torch.uint8)
    out[:, 2:] = _round_away(x * inv).to(torch.int8).view(torch.uint8)


def _q5_0(x: torch.Tensor, out: torch.Tensor) -> None:
    """x (n, 32) -> out (n, 22): fp16 d = (the value of largest magnitude) / -16, codes floor(x / d + 16.5) in
    [0, 31] (16 is zero); the low nibbles two per byte (element j and j + 16), the fifth bits as a uint32."""
    pick = x.abs().argmax(-1, keepdim=True)
    d = x.gather(-1, pick) / -16.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.floor(x * inv + 16.5).clamp_(0, 31).to(torch.uint8)
    out[:, :2] = d.half().view(torch.uint8)
    high = (q >> 4).reshape(-1, 4, 8).to(torch.int32)  # bit k of the uint32: element k's fifth bit
    out[:, 2:6] = (high << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)
    low = q & 0x0F
    out[:, 6:] = low[:, :16] | (low[:, 16:] << 4)


_SPANS = [15 + k / 10 for k in range(-10, 11)]  # candidate code spans for a sub-block's (scale, offset) search


def _fit_sub_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x (m, 32): scale s >= 0 and offset m <= 0 with x ~ s * q + m, q in [0, 15], of least squared
    error among the least-squares fits of the codes that each candidate span gives."""
    n = x.shape[-1]
    lo = x.amin(-1).clamp(max=0.0)
    span = (x.amax(-1) - lo).clamp(min=1e-30)
    sx, sxx = x.sum(-1), (x * x).sum(-1)
    best_err = torch.full_like(sx, float("inf"))
    best_s, best_m = span / 15, lo.clone()
    shifted = x - lo.unsqueeze(-1)
    for steps in _SPANS:
        q = (shifted * (steps / span).unsqueeze(-1)).round_().clamp_(0, 15)
        sq, sqq, sqx = q.sum(-1), (q * q).sum(-1), (q * x).sum(-1)
        det = n * sqq - sq * sq
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        s = (n * sqx - sq * sx) / safe
        m = (sx - s * sq) / n
        positive = m > 0  # the format has no positive offset: refit the scale alone with m = 0
        s = torch.where(positive, sqx / sqq.clamp(min=1e-30), s)
        m = torch.where(positive, torch.zeros_like(m), m)
        err = sxx - 2 * s * sqx - 2 * m * sx + s * s * sqq + 2 * s * m * sq + n * m * m
        better = ok & (s >= 0) & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_m = torch.where(better, m, best_m)
    return best_s, best_m


def _q4_k(x: torch.Tensor, out: torch.Tensor) -> None:
    """x (n, 256) -> out (n, 144): fp16 d, fp16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of
    codes; value = d * scale_j * q - dmin * min_j for sub-block j of 32."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    s, m = _fit_sub_blocks(sub.reshape(-1, 32))
    s, neg_m = s.reshape(n, 8).float(), (-m).reshape(n, 8).float()
    d = (s.amax(-1, keepdim=True) / 63).half()
    dmin = (neg_m.amax(-1, keepdim=True) / 63).half()
    df, dminf = d.float(), dmin.float()
    sc = torch.where(df > 0, s / df.clamp(min=1e-30), torch.zeros_like(s)).round_().clamp_(0, 63)
    mn = torch.where(dminf > 0, neg_m / dminf.clamp(min=1e-30), torch.zeros_like(s)).round_().clamp_(0, 63)
    scale, offset = (df * sc).unsqueeze(-1), (dminf * mn).unsqueeze(-1)  # what the blocks will decode to
    q = torch.where(scale > 0, (x.reshape(n, 8, 32) + offset) / scale.clamp(min=1e-30), torch.zeros_like(scale))
    q = q.round_().clamp_(0, 15).to(torch.uint8).reshape(n, 4, 2, 32)
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    out[:, 0:2] = d.view(torch.uint8)
    out[:, 2:4] = dmin.view(torch.uint8)
    # bytes 0-3: scales 0-3 (6 bits) + the top 2 bits of scales 4-7; bytes 4-7: the same for the mins;
    # bytes 8-11: the low 4 bits of scales 4-7, then of mins 4-7 in the high nibble
    out[:, 4:8] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)  # per 64 values: 32 low nibbles, 32 high


_ENCODERS = {GGMLType.Q8_0: _q8_0, GGMLType.Q5_0: _q5_0, GGMLType.Q4_K: _q4_k}


def quantize_blocks_(x: torch.Tensor, ggml_type: GGMLType | int, out: torch.Tensor) -> None:
    """Write the (N, K) float tensor x as rows of `ggml_type` blocks into `out` (a uint8 tensor of
    `block_bytes(type, N, K)` bytes, e.g. a GGMLLinear's weight through torch.from_numpy), in place."""
    ggml_type = GGMLType(ggml_type)
    if ggml_type not in _ENCODERS:
        raise ValueError(f"no quantizer for {ggml_type.name}; qwen25 writes {', '.join(t.name for t in QUANTIZERS)}")
    qk, size = BLOCK_SIZES[ggml_type]
    N, K = x.shape
    if K % qk:
        raise ValueError(f"{ggml_type.name} needs rows of a multiple of {qk} values, got {K}")
    if out.dtype != torch.uint8 or out.numel() != block_bytes(ggml_type, N, K):
        raise ValueError(f"{out.numel()} {out.dtype} bytes cannot hold a ({N}, {K}) {ggml_type.name} tensor")
    blocks_out = out.view(-1, size)
    step = max(1, ROWS_PER_CHUNK_VALUES // K)
    with torch.no_grad():
        for r in range(0, N, step):
            rows = x[r:r + step].detach().float().reshape(-1, qk)
            _ENCODERS[ggml_type](rows, blocks_out[r * (K // qk):(r + step) * (K // qk)])


def quantize_blocks(x: torch.Tensor | np.ndarray, ggml_type: GGMLType | int) -> np.ndarray:
    """x (..., K) float as rows of `ggml_type` blocks: a flat uint8 array (the bytes a GGUF tensor holds)."""
    x = torch.as_tensor(x)
    rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    out = np.empty(block_bytes(ggml_type, rows.shape[0], rows.shape[1]), dtype=np.uint8)
    quantize_blocks_(rows, ggml_type, torch.from_numpy(out))
    return out


def quantize_q8_0(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """ggml's reference Q8_0 (quantize_row_q8_0_ref) of a (..., K) float array, K % 32 == 0, as raw bytes."""
    return quantize_blocks(x, GGMLType.Q8_0)
