"""Contiguous (static, preallocated) KV cache for a batch of sequences that advance in lock-step.

The simple reference cache: one (B, H_kv, S_max, D) buffer per layer for keys and values, written by index at
the current length, plus a key mask for left-padded ragged batches. The paged cache of the serving engine
implements the same `KVCache` protocol (see `qwen25.model.qwen2`).
"""

from __future__ import annotations

from typing import Any

import torch

from qwen25.config import ModelConfig


def activation_dtype(model: Any) -> torch.dtype:
    """The dtype of a model's hidden states, hence of its KV cache (quantized modules may hold int8 weights)."""
    with torch.inference_mode():
        return model.model.embed_tokens(torch.zeros(1, dtype=torch.long)).dtype


class ContiguousKVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0
        self._mask = torch.ones(batch_size, max_length, dtype=torch.bool, device=device)
        self._has_padding = False

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        end = self.length + T
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_length}")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def key_mask(self, new_tokens_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
        end = self.length + T
        if new_tokens_mask is not None:
            self._mask[:, self.length:end] = new_tokens_mask
            self._has_padding = self._has_padding or not bool(new_tokens_mask.all())
        return self._mask[:, :end] if self._has_padding else None

    def native_view(self) -> Any:
        """The cache as the native forward's `KVView` (row b of the batch is sequence b), or None when the native
        forward cannot use it: a key mask is in use (it has none), or the cache is not contiguous float32, float16
        or bfloat16."""
        from qwen25.kernels.native import KV_DTYPES, KVView

        usable = (not self._has_padding and self.keys.dtype in KV_DTYPES and self.keys.is_contiguous()
                  and self.values.is_contiguous())
        return KVView(self.keys, self.values) if usable else None

    def commit(self, T: int) -> None:
        self.length += T

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` positions (rejected speculative tokens); later updates
        overwrite them."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (drop finished sequences from a batch)."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]
        self._mask = self._mask[rows]
