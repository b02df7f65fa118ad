"""Building blocks of the Qwen2 decoder: RMSNorm, SwiGLU MLP, and pure functions for RoPE and attention.

Numerics follow HF transformers' Qwen2 exactly (fp32 RMSNorm with a cast back before the weight, half-split
"rotate_half" RoPE with cos/sin computed in fp32), because logits parity with it is the correctness bar.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back to the input dtype *before* the weight multiply, as HF does (bf16
        # parity depends on it). F.rms_norm is one fused op, bit-identical to the unfused fp32 formula.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases.

    Inference engines may fuse gate and up into one `gate_up_proj` (rows: gate then up) at load time."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# --- RoPE ------------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict[str, Any] | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) in fp32 and the attention scaling factor applied to cos/sin.

    Only default RoPE is implemented here; YaRN/dynamic scaling (roadmap: long context) plug in at this
    function so the model code does not change."""
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type not in ("default", None):
        raise NotImplementedError(f"rope_scaling type {rope_type!r} is not implemented yet (long-context roadmap)")
    # Always on the CPU, also inside a `torch.device("meta")` skeleton build: meta arithmetic goes through
    # PyTorch's Python reference ops, whose first use imports torch._dynamo (~1 s of every model load).
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (theta ** exponents), 1.0


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, D) for integer positions, computed in fp32."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (B, T, D): the NeoX / half-split layout Qwen2 uses."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


# --- attention -------------------------------------------------------------------------------------
def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   is_causal: bool) -> torch.Tensor:
    """Scaled dot-product attention with GQA. q (B, H, T, D), k/v (B, H_kv, S, D), mask (B, 1, T, S) bool.

    Returns (B, H, T, D). The default attention function; the model takes any function of this shape."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])
