"""The paged KV store and the per-forward view that presents it to the model as its `KVCache`.

`PagedKVCache` holds keys and values for every layer as (num_layers, H_kv, num_blocks, block_size, D); a token's
slot is block_id * block_size + offset. With heads outside the slots, one `index_select` over the flattened
(H_kv * slots, D) layer gathers a step's keys straight into a contiguous (B, H_kv, P+T, D) tensor, which CPU SDPA
reads fastest (measured: ~25% less gather + attention time than a token-major (.., block_size, H_kv, D) pool). There is no paged-attention kernel in torch, so `PagedStep` presents a
step's sequences as a left-padded batch: row r has its cached context right-aligned in the first P columns
(P = the longest context in the step) followed by its T new tokens, left-padded. `update` scatters the real new
k/v into their slots, then gathers each row's [context | new tokens] with one `index_select` per layer and
tensor; the key mask hides the gaps, so the model's attention spec (`qwen25.model.attention`) masks them.

What a slot holds is the backend's choice: rotated keys (plain RoPE, static YaRN), or, when the step is built with
`key_positions`, keys before rotation plus each column's position (`positions_for`), which dynamic YaRN and Dual
Chunk Attention rotate at attention time with positions of their own (`qwen25.model.long_context`).

Storage dtype (`kv_cache_dtype`, `qwen25.engine.kv_quant`): by default float16 for quantized weights, else the
activations' dtype; float16/bfloat16 halve an fp32 cache; int8 stores each (token, head) vector as int8 with one
fp32 absmax scale (keys divided by a fixed per-channel smoothing first), 1/4 + 1/D of fp32's bytes. Keys/values
are converted when written and back when read, so attention always runs in the activations' dtype. Every
key/value is read as stored, a pass's own new ones included (a first prefill chunk too), so a row's result does
not depend on how its prompt was chunked, and the native forward, which reads everything from the cache,
computes the same thing.
"""

from __future__ import annotations

import torch

from qwen25.config import ModelConfig
from qwen25.engine.kv_quant import quantize_int8


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 key_smoothing: torch.Tensor | None = None) -> None:
        """dtype: the storage dtype (float32, float16, bfloat16 or int8); key_smoothing (L, H_kv, D): int8's
        per-channel key divisors (`kv_quant.key_smoothing`; default none)."""
        L, H_kv, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        shape = (L, H_kv, num_blocks, block_size, D)
        # empty, not zeros: pages are committed as blocks get used, so a large pool costs nothing until needed.
        # Never-written slots are never read: masked columns read a written slot (see ModelRunner.forward),
        # since even a masked key/value must be finite (0 * NaN is NaN in the attention matmul).
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.key_slots = self.keys.view(L, H_kv, num_blocks * block_size, D)  # (L, H_kv, slots, D)
        self.value_slots = self.values.view(L, H_kv, num_blocks * block_size, D)
        self.key_scales = self.value_scales = None  # int8: (L, H_kv, slots) fp32
        self.key_smoothing = None  # int8: (L, H_kv, 1, D) fp32
        if dtype == torch.int8:
            if key_smoothing is not None:
                if key_smoothing.shape != (L, H_kv, D):
                    raise ValueError(f"key_smoothing must be (L, H_kv, D) = {(L, H_kv, D)}, "
                                     f"got {tuple(key_smoothing.shape)}")
                self.key_smoothing = key_smoothing.float().to(device).unsqueeze(2)
            self.key_scales = torch.empty(L, H_kv, num_blocks * block_size, device=device)
            self.value_scales = torch.empty(L, H_kv, num_blocks * block_size, device=device)
        elif not dtype.is_floating_point:
            raise ValueError(f"a KV cache stores float32, float16, bfloat16 or int8, not {dtype}")

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        vector = config.head_dim * elem + (4 if dtype == torch.int8 else 0)  # int8: + its fp32 scale
        return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * vector

    def copy_block(self, source: int, destination: int) -> None:
        """Copy one block's keys and values (a forked sample's partial prompt block)."""
        self.keys[:, :, destination] = self.keys[:, :, source]
        self.values[:, :, destination] = self.values[:, :, source]
        if self.key_scales is not None and self.value_scales is not None:
            bs = self.block_size
            for scales in (self.key_scales, self.value_scales):
                scales[:, :, destination * bs:(destination + 1) * bs] = scales[:, :, source * bs:(source + 1) * bs]


class PagedStep:
    """`KVCache` for one forward pass over a left-padded batch (see the module docstring).

    past: P; write_rows (N,) indices into the flattened (B*T) new tokens that are real, write_slots (N,) their
    slots; read_slots (B, P+T) the slot of every key column; key_mask (B, P+T) or None when all are real;
    key_positions (B, P+T): every key column's position, given when the model's attention caches keys
    unrotated (the step then says `stores_unrotated_keys`)."""

    def __init__(self, cache: PagedKVCache, past: int, write_rows: torch.Tensor | None, write_slots: torch.Tensor,
                 read_slots: torch.Tensor, key_mask: torch.Tensor | None,
                 key_positions: torch.Tensor | None = None) -> None:
        self.cache = cache
        self.key_positions = key_positions
        self.stores_unrotated_keys = key_positions is not None
        self.length = past
        self.write_rows = write_rows  # None: every new token is real
        self.write_slots = write_slots
        B, width = read_slots.shape
        _, H_kv, num_slots, D = cache.key_slots.shape
        # Row-major (row, head, column) indices into a layer's flattened (H_kv * slots, D) pool.
        heads = torch.arange(H_kv).view(1, H_kv, 1) * num_slots
        self.read_index = (heads + read_slots.view(B, 1, width)).reshape(-1) if past else None
        self.read_shape = (B, H_kv, width, D)
        self._key_mask = key_mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        if c.key_scales is None or c.value_scales is None:
            return self._store_and_read(c.key_slots[layer], None, None, k), \
                self._store_and_read(c.value_slots[layer], None, None, v)
        smoothing = None if c.key_smoothing is None else c.key_smoothing[layer]
        return (self._store_and_read(c.key_slots[layer], c.key_scales[layer], smoothing, k),
                self._store_and_read(c.value_slots[layer], c.value_scales[layer], None, v))

    def _store_and_read(self, slots: torch.Tensor, scales: torch.Tensor | None, smoothing: torch.Tensor | None,
                        new: torch.Tensor) -> torch.Tensor:
        """Write the new vectors' slots (int8: `scales` set, keys divided by `smoothing` (H_kv, 1, D) first) and
        read every key column back in `new`'s dtype."""
        B, H_kv, T, D = new.shape
        flat = new.transpose(0, 1).reshape(H_kv, B * T, D)
        if self.write_rows is not None:
            flat = flat.index_select(1, self.write_rows)
        if scales is None:
            slots.index_copy_(1, self.write_slots, flat.to(slots.dtype))
        else:
            q, scale = quantize_int8(flat if smoothing is None else flat / smoothing)
            slots.index_copy_(1, self.write_slots, q)
            scales.index_copy_(1, self.write_slots, scale)
        if self.read_index is None:  # nothing cached before this step: the new k/v, as the cache stores them
            if scales is not None:
                q, scale = quantize_int8(new if smoothing is None else new / smoothing.unsqueeze(0))
                read = q.float() * scale.unsqueeze(-1)
                return (read if smoothing is None else read * smoothing.unsqueeze(0)).to(new.dtype)
            return new if slots.dtype == new.dtype else new.to(slots.dtype).to(new.dtype)
        read = slots.view(-1, D).index_select(0, self.read_index).view(self.read_shape)  # (B, H_kv, P+T, D)
        if scales is None:
            return read.to(new.dtype)
        scale = scales.view(-1).index_select(0, self.read_index).view(*self.read_shape[:3], 1)
        read = read.to(torch.float32) * scale
        return (read if smoothing is None else read * smoothing).to(new.dtype)

    def key_mask(self, new_tokens_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
        return self._key_mask

    def positions_for(self, positions: torch.Tensor) -> torch.Tensor:
        """Every key column's position (B, P+T) (the new tokens' `positions` are already among them)."""
        if self.key_positions is None:
            raise ValueError("this PagedStep caches rotated keys: build it with key_positions for a backend that "
                             "rotates at attention time")
        return self.key_positions

    def commit(self, T: int) -> None:
        self.length += T
