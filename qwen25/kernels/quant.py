"""Weight-only quantization for fast CPU inference: `Q8Linear` / `Q8Embedding` (int8), `Q4Linear` (int4),
`ConcatLinear` (a fused projection with row blocks in different formats) and the group-wise quantizers.

q8: int8 weights, one fp32 scale per group of consecutive weights of a row (symmetric, absmax/127). GGUF
Q8_0/Q5_0/Q4_K/Q6_K weights requantize to it with an error far below their own quantization error.
q4: 4-bit codes packed two per byte, one fp16 scale and one fp16 offset per group (asymmetric, least-squares
fit), about 60% of q8's bytes per weight at a measurable quality cost (see `qwen25.weights.quantized`).
Activations stay fp32 in both, so the fast path tracks the dequantized weights to rounding. Matmuls run in the
native kernels (`qwen25.kernels`) for small batches and as dequantize + BLAS sgemm for long prefills.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qwen25.kernels import load_q4_kernels, load_q8_kernels

GROUP = 32  # default group size; any multiple of 32 that divides the row works (group == K: per-row scales)
SGEMM_MIN_ROWS = 24  # from this many activation rows on, dequantize + MKL sgemm beats the streaming kernel


def quantize_q8(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 (N, K) and fp32 scales (N, K/group)."""
    N, K = weight.shape
    group = K if group <= 0 else group
    if K % group or group % 32:
        raise ValueError(f"q8 group size {group} must be a multiple of 32 dividing the input dimension {K}")
    groups = weight.float().reshape(N, K // group, group)
    scales = groups.abs().amax(-1) / 127.0
    q = torch.round(groups / scales.clamp(min=1e-30).unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q.reshape(N, K), scales.contiguous()


def quantize_q8_(weight: torch.Tensor, out_q: torch.Tensor, out_scales: torch.Tensor) -> None:
    """`quantize_q8` written into out_q (N, K) int8 and out_scales (N, K/group) fp32, with the group their shapes
    give: the same values, without full-size temporaries. `weight` (fp32, contiguous) is overwritten."""
    N, K = weight.shape
    groups = weight.view(N, out_scales.shape[-1], -1)
    low, high = torch.aminmax(groups, dim=-1)
    torch.maximum(high, low.neg_(), out=out_scales).div_(127.0)  # max |w| of each group / 127
    groups.div_(out_scales.clamp(min=1e-30).unsqueeze(-1)).round_().clamp_(-127, 127)
    out_q.copy_(weight)


def dequantize_q8(weight_q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    N, K = weight_q.shape
    G = scales.shape[-1]
    return (weight_q.reshape(N, G, K // G).float() * scales.unsqueeze(-1)).reshape(N, K)


class Q8Linear(nn.Module):
    """Drop-in for nn.Linear(in, out, bias) holding q8g32 weights. Inference only."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: int = GROUP) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, in_features // (group if group > 0 else in_features)))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = GROUP) -> Q8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group)
        module.weight_q, module.scales = quantize_q8(linear.weight.detach(), group)
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        lib = load_q8_kernels()
        if lib is None or x2.shape[0] >= SGEMM_MIN_ROWS or x.requires_grad:
            w = self._dequantized(lib)
            return F.linear(x2.float(), w, self.bias).reshape(*shape[:-1], self.out_features).to(x.dtype)
        x2 = x2.float().contiguous()
        y = torch.empty(x2.shape[0], self.out_features)
        bias_ptr = self.bias.data_ptr() if self.bias is not None else None
        lib.q8_matmul(x2.data_ptr(), self.weight_q.data_ptr(), self.scales.data_ptr(), self.group, bias_ptr, y.data_ptr(),
                      x2.shape[0], self.out_features, self.in_features)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    @property
    def group(self) -> int:
        return self.in_features // self.scales.shape[-1]

    def _dequantized(self, lib) -> torch.Tensor:  # noqa: ANN001
        if lib is None:
            return dequantize_q8(self.weight_q, self.scales)
        out = torch.empty(self.out_features, self.in_features)
        lib.q8_dequantize(self.weight_q.data_ptr(), self.scales.data_ptr(), self.group, out.data_ptr(),
                          self.out_features, self.in_features)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, q8g32"


class Q8Embedding(nn.Module):
    """Embedding table in q8g32: only the looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group: int = GROUP) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight_q", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(num_embeddings, embedding_dim // (group if group > 0 else embedding_dim)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize_q8(self.weight_q.index_select(0, flat), self.scales.index_select(0, flat))
        return rows.reshape(*ids.shape, self.embedding_dim)


# --- int4 -------------------------------------------------------------------------------------------------------
Q4_GROUP = 32  # default int4 group size (measured against 64 and 128 in `qwen25.weights.quantized`)


def _check_group(kind: str, group: int, K: int) -> None:
    if group <= 0 or K % group or group % 32:
        raise ValueError(f"{kind} group size {group} must be a positive multiple of 32 dividing the input "
                         f"dimension {K}")


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K/2) uint8: byte j holds code 2j (low nibble) and code 2j + 1 (high nibble),
    so each little-endian 32-bit word holds 8 consecutive codes, 4 bits apart (what the kernel unpacks)."""
    N, K = codes.shape
    pairs = codes.to(torch.uint8).reshape(N, K // 2, 2)
    return pairs[:, :, 0] | (pairs[:, :, 1] << 4)


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 codes; the inverse of `pack_q4`."""
    N, half = packed.shape
    return torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(N, half * 2)


def quantize_q4(weight: torch.Tensor, group: int = Q4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> packed codes (N, K/2) uint8, fp16 scales and fp16 offsets (N, K/group): w ~ s * u + m.

    Per group, codes from a range of candidate steps around (max - min) / 15 are each given the least-squares
    scale and offset, and the candidate with the smallest squared error wins (llama.cpp's make_qkx2_quants
    search, unweighted): on Qwen2.5-Coder-0.5B it removes ~40% of plain min/max rounding's perplexity loss.
    Codes are then re-rounded against the fp16-rounded scale and offset, so dequantizing gives exactly the
    nearest representable values."""
    N, K = weight.shape
    _check_group("q4", group, K)
    groups = weight.float().reshape(N, K // group, group)
    fits = [_fit_q4(groups[r:r + _Q4_CHUNK]) for r in range(0, N, _Q4_CHUNK)]  # chunks bound the temporaries
    scales, mins = torch.cat([f[0] for f in fits]).half(), torch.cat([f[1] for f in fits]).half()
    s, m = scales.float().unsqueeze(-1), mins.float().unsqueeze(-1)
    codes = torch.round((groups - m) / torch.where(s > 0, s, 1.0)).clamp_(0, 15)
    return pack_q4(codes.reshape(N, K)), scales, mins


_Q4_CHUNK = 1024  # rows per search chunk
_Q4_STEPS = [d / 10 for d in range(-10, 11)]  # candidate code ranges 15 + d (llama.cpp: rmin -1, rdelta 0.1)


def _fit_q4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (scale, offset) per group of x (..., group) by the candidate search of `quantize_q4`."""
    n = x.shape[-1]
    lo, hi = x.amin(-1), x.amax(-1)
    span = (hi - lo).clamp(min=1e-30)
    sx, sxx = x.sum(-1).double(), (x * x).sum(-1).double()
    best_err = torch.full_like(sx, math.inf)
    best_s, best_m = (hi - lo) / 15, lo.clone()
    shifted = x - lo.unsqueeze(-1)
    for d in _Q4_STEPS:
        q = (shifted * ((15 + d) / span).unsqueeze(-1)).round_().clamp_(0, 15)
        sq, sqq, sqx = q.sum(-1).double(), (q * q).sum(-1).double(), (q * x).sum(-1).double()
        det = n * sqq - sq * sq
        ok = det > 0
        det = torch.where(ok, det, 1.0)
        s = (n * sqx - sq * sx) / det  # least squares of x ~ s * q + m over the group
        m = (sx - s * sq) / n
        err = sxx - 2 * s * sqx - 2 * m * sx + s * s * sqq + 2 * s * m * sq + n * m * m
        better = ok & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s.float(), best_s)
        best_m = torch.where(better, m.float(), best_m)
    return best_s, best_m


def dequantize_q4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    N, G = scales.shape
    codes = unpack_q4(packed).reshape(N, G, -1).float()
    return (codes * scales.float().unsqueeze(-1) + mins.float().unsqueeze(-1)).reshape(N, -1)


class Q4Linear(nn.Module):
    """Drop-in for nn.Linear(in, out, bias) holding group-wise int4 weights. Inference only."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: int = Q4_GROUP) -> None:
        super().__init__()
        _check_group("q4", group, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_p", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, in_features // group, dtype=torch.float16))
        self.register_buffer("mins", torch.zeros(out_features, in_features // group, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = Q4_GROUP) -> Q4Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group)
        module.weight_p, module.scales, module.mins = quantize_q4(linear.weight.detach(), group)
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        return module

    @property
    def group(self) -> int:
        return self.in_features // self.scales.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        lib = load_q4_kernels()
        if lib is None or x2.shape[0] >= SGEMM_MIN_ROWS or x.requires_grad:
            y = F.linear(x2.float(), self.dequantized(), self.bias)
            return y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        x2 = x2.float().contiguous()
        y = torch.empty(x2.shape[0], self.out_features)
        bias_ptr = self.bias.data_ptr() if self.bias is not None else None
        if lib.q4_matmul(x2.data_ptr(), self.weight_p.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr(),
                         self.group, bias_ptr, y.data_ptr(), x2.shape[0], self.out_features, self.in_features):
            raise MemoryError("q4_matmul: out of memory")
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The fp32 (out, in) weight this module multiplies by."""
        lib = load_q4_kernels()
        if lib is None:
            return dequantize_q4(self.weight_p, self.scales, self.mins)
        out = torch.empty(self.out_features, self.in_features)
        lib.q4_dequantize(self.weight_p.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr(), self.group,
                          out.data_ptr(), self.out_features, self.in_features)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"q4g{self.group}")


class ConcatLinear(nn.Module):
    """One fused projection whose row blocks are stored in different formats (e.g. q/k rows in q4, v rows in q8):
    the parts' outputs, concatenated."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(part.out_features for part in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)
