"""Which attention backend a config needs, and dynamic YaRN's backend.

`attention_for_config(config)` is what `Qwen2Model` runs when the caller passes no backend:

- default RoPE or static YaRN: `sdpa_attention` (the model's own cos/sin carry the YaRN frequencies);
- dynamic YaRN (`rope_scaling.dynamic`): `DynamicYarnAttention`;
- `dual_chunk_attention_config`: `DualChunkAttention` (`qwen25.model.dca`).

The last two rotate with positions of their own, so they need the keys unrotated (`needs_unrotated_keys`):
cache-less passes, an `UnrotatedKVCache`, or the engine's paged cache, which then stores keys before rotation.
Over a cache of rotated keys (`ContiguousKVCache`) they run plain attention while it is exactly what they compute
(`plain_attention_limit`) and raise NotImplementedError beyond, never silently running something else.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from qwen25.config import ModelConfig, parse_dual_chunk_attention, parse_rope_scaling, yarn_window
from qwen25.model.attention import AttentionBackend, AttentionSpec, KVCache, sdpa_attention, stores_unrotated_keys
from qwen25.model.dca import DualChunkAttention, spec_positions
from qwen25.model.rope import apply_rope, is_dynamic, rope_cos_sin, rope_inv_freq, yarn_inv_freq


class DynamicYarnAttention:
    """Plain RoPE for rows whose sequence fits the native window (original_max_position_embeddings), YaRN for
    longer ones; every key of a row is rotated with the row's current frequencies at attention time (see
    `qwen25.model.rope` for what this costs and what it does not recompute)."""

    def __init__(self, config: ModelConfig) -> None:
        scaling = config.rope_scaling
        if not is_dynamic(scaling):
            raise ValueError("DynamicYarnAttention needs rope_scaling with rope_type 'yarn' and \"dynamic\": true")
        self.window = yarn_window(scaling)
        assert self.window is not None and scaling is not None
        self.short = rope_inv_freq(config.head_dim, config.rope_theta)
        self.long = yarn_inv_freq(config.head_dim, config.rope_theta, scaling)

    def _cos_sin(self, positions: torch.Tensor, long_rows: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, n, D) of positions (B, n), each row with its regime's frequencies."""
        if not bool(long_rows.any()) or bool(long_rows.all()):  # one regime: exactly the model's own cos/sin
            inv_freq, scale = self.long if bool(long_rows.any()) else self.short
            return rope_cos_sin(positions, inv_freq, scale, dtype=dtype)
        rows = long_rows.view(-1, 1, 1).to(positions.device)
        inv_freq = torch.where(rows, self.long[0].to(positions.device), self.short[0].to(positions.device))
        scale = torch.where(rows, self.long[1], self.short[1]).float()
        return rope_cos_sin(positions, inv_freq, scale, dtype=dtype)  # type: ignore[arg-type]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, cache: KVCache | None, spec: AttentionSpec) -> torch.Tensor:
        B, _, T, _ = q.shape
        positions = spec_positions(spec, B, T)
        long_rows = positions.max(dim=1).values + 1 > self.window
        if not stores_unrotated_keys(cache):
            if not bool(long_rows.any()):  # plain RoPE: exactly the reference backend
                return sdpa_attention(layer, q, k, v, *self._cos_sin(positions, long_rows, q.dtype), cache, spec)
            if cache is not None:
                raise NotImplementedError(
                    f"dynamic YaRN over a cache of rotated keys ({type(cache).__name__}) is not implemented past "
                    f"the native window of {self.window} tokens (the cached keys would need re-rotating). Use "
                    "qwen25.model.attention.UnrotatedKVCache, the engine, a cache-less pass, or static YaRN.")
        if cache is None:
            k_pos = positions
        else:
            k, v = cache.update(layer, k, v)
            k_pos = cache.positions_for(positions)  # type: ignore[attr-defined]
        q = apply_rope(q, *self._cos_sin(positions, long_rows, q.dtype))
        k = apply_rope(k, *self._cos_sin(k_pos, long_rows, k.dtype))
        mask, is_causal = spec.mask(q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                              scale=1.0 / math.sqrt(q.shape[-1]), enable_gqa=k.shape[1] != q.shape[1])


def attention_for_config(config: ModelConfig) -> AttentionBackend:
    """The backend a model with this config runs by default (see the module docstring)."""
    if config.dual_chunk_attention_config:
        return DualChunkAttention(config)
    if is_dynamic(config.rope_scaling):
        return DynamicYarnAttention(config)
    return sdpa_attention


def needs_unrotated_keys(config: ModelConfig) -> bool:
    """Whether the config's attention rotates keys at attention time (DCA, dynamic YaRN), so a KV cache must
    store them before rotation, with their positions."""
    return bool(config.dual_chunk_attention_config) or is_dynamic(config.rope_scaling)


def plain_attention_limit(config: ModelConfig) -> int | None:
    """The longest sequence the config's attention can run over a cache of rotated keys (`ContiguousKVCache`):
    None when unlimited (default RoPE, static YaRN), else the length up to which DCA or dynamic YaRN equals plain
    attention. (The engine's paged cache stores unrotated keys for these configs and has no such limit.)"""
    if config.dual_chunk_attention_config:
        return DualChunkAttention(config).plain_length
    if is_dynamic(config.rope_scaling):
        return yarn_window(config.rope_scaling)
    return None


LongContextSetting = dict[str, Any] | str | None


def resolve_long_context(config: ModelConfig, rope_scaling: LongContextSetting = None,
                         dual_chunk_attention_config: LongContextSetting = None) -> ModelConfig:
    """`config` with long-context settings applied, each one of: None (keep the checkpoint's), a dict (set it),
    {} (remove it), or a flag's text: `--rope-scaling` JSON or "none", `--dual-chunk-attention` JSON, "on" or
    "off" (`qwen25.config.parse_rope_scaling` / `parse_dual_chunk_attention`). Validated; removing YaRN brings
    max_position_embeddings back to its native window. The DCA setting is checked against the config with the
    new rope_scaling (a YaRN factor lengthens the distances DCA may present)."""
    if isinstance(rope_scaling, str):
        rope_scaling = parse_rope_scaling(rope_scaling) or {}
    if rope_scaling == {}:
        window = yarn_window(config.rope_scaling)
        longest = config.max_position_embeddings if window is None else min(config.max_position_embeddings, window)
        config = config.replace(rope_scaling=None, max_position_embeddings=longest)
    elif rope_scaling is not None:
        config = config.with_long_context(rope_scaling=rope_scaling)
    if isinstance(dual_chunk_attention_config, str):
        dual_chunk_attention_config = parse_dual_chunk_attention(dual_chunk_attention_config, config) or {}
    if dual_chunk_attention_config == {}:
        return config.replace(dual_chunk_attention_config=None)
    if dual_chunk_attention_config is not None:
        return config.with_long_context(dual_chunk_attention_config=dual_chunk_attention_config)
    return config


def set_long_context(model: torch.nn.Module, rope_scaling: LongContextSetting = None,
                     dual_chunk_attention_config: LongContextSetting = None) -> ModelConfig:
    """Apply `--rope-scaling` / DCA settings (as `resolve_long_context` takes them) to a loaded Qwen2ForCausalLM
    in place (frequencies and the default backend recomputed) and return its new config. A native forward built
    for the old config no longer `supports()` it, so the PyTorch path runs."""
    config = resolve_long_context(model.config, rope_scaling, dual_chunk_attention_config)
    model.config = model.model.config = config
    model.model.reset_rope()
    return config
