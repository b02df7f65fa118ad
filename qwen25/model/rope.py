"""Rotary position embeddings: the one place that turns a config's `rope_theta` / `rope_scaling` into inverse
frequencies and the cos/sin of positions, for every site that builds a model (the model itself, the weight
loaders, the native forward).

Numerics follow HF transformers' Qwen2 exactly: half-split ("rotate_half", NeoX) layout, cos/sin computed in
fp32 and scaled by the attention factor. Scaling types:

- default RoPE: inv_freq = theta^(-2i/D).
- YaRN (`{"rope_type": "yarn", "factor": F, "original_max_position_embeddings": W, ...}`), computed as
  transformers' `_compute_yarn_parameters` does: frequencies that turn fewer than beta_slow times over the
  original window W are divided by F (interpolated), those turning more than beta_fast times are kept
  (extrapolated), with a linear ramp between, and cos/sin are multiplied by the attention factor
  0.1 ln(F) + 1 (or the configured attention_factor / mscale ratio). The ramp uses W, never
  max_position_embeddings.
- Static YaRN (what vLLM and the Qwen report use) scales every sequence, short ones too: their positions see
  interpolated low frequencies and sharper attention, which is why Qwen's docs warn it costs short prompts.
- Dynamic YaRN (`"dynamic": true`, a qwen25 switch) scales only sequences longer than W: up to W it is plain
  RoPE, bit for bit; beyond, every key and query of the sequence is rotated with the YaRN frequencies. Keys
  cached rotated with the plain frequencies would then be wrong, so dynamic YaRN runs through a backend that
  caches keys unrotated and rotates them at attention time (`qwen25.model.long_context`): each step rotates the
  whole cached context again (O(context x head_dim) per layer, about 1/num_kv_groups of the attention work).
  The keys/values of earlier tokens are not recomputed: their hidden states (hence deeper layers' k/v) were
  computed under plain RoPE, as in every dynamic scaling with a cache; a one-pass forward of the whole sequence
  beyond W equals static YaRN exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qwen25.config import rope_scaling_type, yarn_window


def rope_type(rope_scaling: dict[str, Any] | None) -> str:
    """The scaling type named by a config's rope_scaling (HF's `rope_type`, or the older `type`)."""
    return rope_scaling_type(rope_scaling)


def is_dynamic(rope_scaling: dict[str, Any] | None) -> bool:
    """Whether the config asks for dynamic YaRN (scaling only beyond the native window)."""
    return rope_type(rope_scaling) == "yarn" and bool((rope_scaling or {}).get("dynamic"))


def _base_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(2i/D) for i < D/2, fp32. Always on the CPU, also inside a `torch.device("meta")` skeleton build:
    meta arithmetic goes through PyTorch's Python reference ops, whose first use imports torch._dynamo (~1 s of
    every model load)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return theta ** exponents


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies (D/2,) fp32 and attention factor, as transformers computes them."""
    factor = float(scaling["factor"])
    window = scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_turning(turns: float) -> float:
        """The (fractional) dimension index whose frequency turns `turns` times over the original window."""
        return head_dim * math.log(window / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(beta_fast), dim_turning(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a one-dimension ramp would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original (extrapolated) frequency, 0: the interpolated one
    base = _base_frequencies(head_dim, theta)
    inv_freq = (1.0 / (factor * base)) * (1 - keep) + (1.0 / base) * keep
    return inv_freq, float(attention_factor)


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict[str, Any] | None = None,
                  seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) in fp32 and the attention scaling factor applied to cos/sin.

    seq_len matters for dynamic YaRN only: plain RoPE up to the native window (and when None, the frequencies
    a model's own cos/sin use), YaRN for longer sequences."""
    kind = rope_type(rope_scaling)
    if kind == "default":
        return 1.0 / _base_frequencies(head_dim, theta), 1.0
    if kind != "yarn":
        raise NotImplementedError(f"rope_scaling type {kind!r} is not implemented (qwen25 implements 'yarn')")
    assert rope_scaling is not None
    if is_dynamic(rope_scaling) and (seq_len is None or seq_len <= yarn_window(rope_scaling)):  # type: ignore[operator]
        return 1.0 / _base_frequencies(head_dim, theta), 1.0
    return yarn_inv_freq(head_dim, theta, rope_scaling)


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
