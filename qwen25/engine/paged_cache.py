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
"""

from __future__ import annotations

import torch

from qwen25.config import ModelConfig


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
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

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * elem


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
        return (self._store_and_read(self.cache.key_slots[layer], k),
                self._store_and_read(self.cache.value_slots[layer], v))

    def _store_and_read(self, slots: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        B, H_kv, T, D = new.shape
        flat = new.transpose(0, 1).reshape(H_kv, B * T, D)
        if self.write_rows is not None:
            flat = flat.index_select(1, self.write_rows)
        slots.index_copy_(1, self.write_slots, flat)
        if self.read_index is None:  # nothing cached before this step: the new k/v are all there is
            return new
        return slots.view(-1, D).index_select(0, self.read_index).view(self.read_shape)  # (B, H_kv, P+T, D)

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
