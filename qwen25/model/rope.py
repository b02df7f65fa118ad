"""Rotary position embeddings: the one place that turns a config's `rope_theta` / `rope_scaling` into inverse
frequencies and the cos/sin of positions, for every site that builds a model (the model itself, the weight
loaders, the native forward).

Numerics follow HF transformers' Qwen2 exactly: half-split ("rotate_half", NeoX) layout, cos/sin computed in
fp32 and scaled by the attention factor. Only default RoPE is implemented; YaRN and dynamic scaling (the
long-context issue) plug in at `rope_inv_freq` so that no model code changes.
"""

from __future__ import annotations

from typing import Any

import torch


def rope_type(rope_scaling: dict[str, Any] | None) -> str:
    """The scaling type named by a config's rope_scaling (HF's `rope_type`, or the older `type`)."""
    scaling = rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type")) or "default"


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict[str, Any] | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) in fp32 and the attention scaling factor applied to cos/sin."""
    kind = rope_type(rope_scaling)
    if kind != "default":
        raise NotImplementedError(f"rope_scaling type {kind!r} is not implemented yet (long-context roadmap)")
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


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 where a packed row's document id changes. document_ids (B, T) -> (B, T)."""
    B, T = document_ids.shape
    index = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first
