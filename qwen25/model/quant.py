"""Weight-only int8 quantization for fast CPU inference: `Q8Linear`, `Q8Embedding`, and the group-wise quantizer.

Format: int8 weights, one fp32 scale per group of consecutive weights of a row (symmetric, absmax/127).
GGUF Q8_0/Q5_0/Q4_K/Q6_K weights requantize to it with an error far below their own quantization error, and
activations stay fp32, so the fast path tracks the dequantized fp32 reference closely. Matmuls run in the
native kernel (`qwen25.kernels`) for small batches and as dequantize + BLAS sgemm for long prefills.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen25.kernels import load_q8_kernels

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
