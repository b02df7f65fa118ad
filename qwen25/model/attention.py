"""The attention seam: what a backend receives and the reference backend (SDPA).

A backend gets each layer's q/k/v *before* rotation, the cos/sin of the new tokens' positions, the cache and
an `AttentionSpec` (causal, cached length, key padding, per-document attention), and returns the attention
output. It owns rotation and caching, so a backend may cache unrotated keys and rotate them with remapped
positions (Dual Chunk Attention) or attend sparsely without the model changing. `sdpa_attention` is the
reference: rotate, cache, mask, `F.scaled_dot_product_attention` with GQA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from qwen25.config import ModelConfig
from qwen25.model.rope import apply_rope


class KVCache(Protocol):
    """What the model needs from a cache (see `qwen25.engine.kv_cache` for implementations)."""

    length: int  # tokens already cached (the same for every row of the batch)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, H_kv, T, D) at [length, length+T) and return all keys/values [0, length+T)."""
        ...

    def key_mask(self, new_tokens_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
        """Record which of the T new tokens are real (B, T) and return the (B, length+T) key mask, or None
        when every cached key is real."""
        ...

    def commit(self, T: int) -> None:
        """Advance `length` by T once every layer has written."""
        ...


@dataclass
class AttentionSpec:
    """Who attends to whom in one forward pass of T new tokens after `past` cached ones.

    key_mask (B, past+T) bool: False for padding keys. document_ids (B, T): tokens attend only within their own
    document (packed training rows; cache-less passes only). positions (B, T): the new tokens' RoPE positions,
    for backends that rotate with positions of their own (dynamic YaRN, Dual Chunk Attention)."""

    num_new: int
    past: int = 0
    causal: bool = True
    key_mask: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    _dense: tuple[torch.Tensor | None, bool] | None = field(default=None, repr=False)

    def mask(self, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(mask (B|1, 1, T, S) bool or None, is_causal) for SDPA; computed once per pass."""
        if self._dense is None:
            self._dense = build_attention_mask(self.num_new, self.past, self.key_mask, self.document_ids, device)
        return self._dense


class AttentionBackend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, cache: KVCache | None, spec: AttentionSpec) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, H_kv, T, D) unrotated; cos/sin (B, T, D) of the new positions. -> (B, H, T, D)."""
        ...


def build_attention_mask(query_positions: int, past: int, key_mask: torch.Tensor | None,
                         document_ids: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """(mask (B, 1, T, S) bool or None, is_causal) for T new queries after `past` cached keys.

    A padded query row would have no visible key (softmax of all -inf gives NaN that leaks into the cache
    through the next layer's k/v), so every query may always see its own position."""
    T, S = query_positions, past + query_positions
    if key_mask is None and document_ids is None:
        if past == 0:
            return None, T > 1
        if T == 1:
            return None, False
    q_idx = torch.arange(past, S, device=device).unsqueeze(1)
    k_idx = torch.arange(S, device=device).unsqueeze(0)
    mask = (k_idx <= q_idx).unsqueeze(0)  # (1, T, S)
    if document_ids is not None:
        if past:
            raise ValueError("document_ids are for cache-less passes (packed rows); got cached positions")
        mask = mask & (document_ids[:, :, None] == document_ids[:, None, :])  # (B, T, T)
    if key_mask is not None:
        mask = mask & key_mask[:, None, :].bool()
        mask = mask | (k_idx == q_idx).unsqueeze(0)
    return mask.unsqueeze(1), False


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp, for shapes that broadcast: q (..., t, D), k/v (..., S, D), visible
    (..., t, S) bool. -> out (..., t, D), lse (..., t); a query with no visible key gets out 0, lse -inf."""
    logits = (q @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    return probs @ v, lse


def merge_by_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One softmax over the union of disjoint key sets, from each set's (out (..., t, D), lse (..., t)); a query
    that sees no key in any set gets 0."""
    if len(parts) == 1:
        return parts[0][0]
    lses = torch.stack([lse for _, lse in parts])
    weights = torch.exp(lses - torch.logsumexp(lses, dim=0)).nan_to_num(0.0)
    return sum(w.unsqueeze(-1) * o for w, (o, _) in zip(weights, parts))


def sdpa_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, cache: KVCache | None, spec: AttentionSpec) -> torch.Tensor:
    """The reference backend: rotate q/k, cache the rotated keys, SDPA over the spec's mask (GQA native)."""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
        k, v = cache.update(layer, k, v)
    mask, is_causal = spec.mask(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                          scale=1.0 / math.sqrt(q.shape[-1]), enable_gqa=k.shape[1] != q.shape[1])


class UnrotatedKVCache:
    """A contiguous KV cache for a lock-step batch that stores keys *before* rotation, with each token's
    position, for backends that rotate at attention time (dynamic YaRN re-rotates the whole context when a
    sequence crosses the native window; Dual Chunk Attention rotates one key with several remapped positions).
    Same contract as `qwen25.engine.kv_cache.ContiguousKVCache` plus `positions_for`; `sdpa_attention` must not
    use it (it would cache rotated keys into it), which the backends check through `stores_unrotated_keys`."""

    stores_unrotated_keys = True

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.zeros(batch_size, max_length, dtype=torch.long, device=device)
        self.max_length = max_length
        self.length = 0
        self._mask = torch.ones(batch_size, max_length, dtype=torch.bool, device=device)
        self._has_padding = False

    def _check(self, T: int) -> int:
        end = self.length + T
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_length}")
        return end

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._check(k.shape[2])
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def positions_for(self, positions: torch.Tensor) -> torch.Tensor:
        """Record the T new tokens' positions (B, T) and return every key's position (B, length+T)."""
        end = self._check(positions.shape[1])
        self.positions[:, self.length:end] = positions
        return self.positions[:, :end]

    def key_mask(self, new_tokens_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
        end = self._check(T)
        if new_tokens_mask is not None:
            self._mask[:, self.length:end] = new_tokens_mask
            self._has_padding = self._has_padding or not bool(new_tokens_mask.all())
        return self._mask[:, :end] if self._has_padding else None

    def commit(self, T: int) -> None:
        self.length += T

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` positions."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length


def stores_unrotated_keys(cache: KVCache | None) -> bool:
    return bool(getattr(cache, "stores_unrotated_keys", False))
