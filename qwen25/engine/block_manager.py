"""`BlockManager`: which KV-cache blocks each sequence owns, with reference counts and prefix caching.

Pure Python bookkeeping over block ids; the tensors live in `qwen25.engine.paged_cache`. A full block whose KV
has been computed is registered under a chained hash of its contents (hash of the parent block's hash and its
token ids), so a later sequence with the same prefix (a system prompt, the chat history so far) maps those
blocks into its table instead of recomputing them. Released blocks with a registered hash stay reusable
("evictable", kept in LRU order) until a fresh block is needed and none is free.
"""

from __future__ import annotations

from collections import OrderedDict

from qwen25.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set while registered in the prefix cache
        self.token_ids: tuple[int, ...] = ()  # contents of a registered block (guards against hash collisions)


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    """Content hash of a full block given the hash of the block before it (None for the first block)."""
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # never used or unregistered; pop() = lowest id
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but registered; first = least recently used
        self.hash_to_block: dict[int, int] = {}
        self.hit_tokens = 0  # prompt tokens served from the prefix cache
        self.queried_tokens = 0  # tokens looked up in the prefix cache

    # --- capacity ----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- allocation --------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        """Whether `seq`'s current tokens fit, counting the prefix-cache hits it would reuse."""
        hits = self._prefix_hits(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # hits taken out of the evictable pool
        return self.blocks_for(seq.num_tokens) - len(hits) + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its tokens, reusing cached prefix blocks; sets `num_computed_tokens`."""
        assert not seq.block_table, f"{seq} already has blocks"
        hits = self._prefix_hits(seq)
        for b in hits:
            self._take(b)
        seq.block_table = list(hits)
        seq.num_registered_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        if self.enable_prefix_caching:
            self.queried_tokens += seq.num_tokens
            self.hit_tokens += seq.num_computed_tokens
        self.may_append(seq)

    def can_append(self, seq: Sequence, extra: int = 0) -> bool:
        """Whether the blocks `seq` needs for all its tokens and `extra` more (speculative drafts) are free."""
        return self.blocks_for(seq.num_tokens + extra) - len(seq.block_table) <= self.num_free_blocks

    def may_append(self, seq: Sequence, extra: int = 0) -> None:
        """Grow `seq`'s block table to cover all its tokens and `extra` more."""
        while len(seq.block_table) < self.blocks_for(seq.num_tokens + extra):
            seq.block_table.append(self._take(self._fresh_block()))

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give `child` (the same prompt as `parent`, nothing computed) the parent's computed prompt: the full
        blocks are shared (reference counted, never written again), the partial last block gets a fresh block
        for the child. Returns (source, destination) of that block, whose contents the caller copies, or None
        when there was no partial block. The caller checks `can_fork` first."""
        assert not child.block_table  # the parent's prompt is computed by the end of the current step
        num_full, partial = divmod(parent.num_prompt_tokens, self.block_size)
        child.block_table = [self._take(b) for b in parent.block_table[:num_full]]
        child.num_computed_tokens = parent.num_prompt_tokens
        child.num_registered_blocks = min(parent.num_registered_blocks, num_full)
        child.block_hashes = parent.block_hashes[:num_full]
        if not partial:
            return None
        child.block_table.append(self._take(self._fresh_block()))
        return parent.block_table[num_full], child.block_table[-1]

    def can_fork(self, parent: Sequence) -> bool:
        return parent.num_prompt_tokens % self.block_size == 0 or self.num_free_blocks >= 1

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks. Tail blocks go first, so they are also evicted before the shared prefix."""
        for b in reversed(seq.block_table):
            block = self.blocks[b]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {b} freed twice"
            if block.ref_count == 0:
                if block.hash is not None:
                    self.evictable[b] = None
                else:
                    self.free_ids.append(b)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_registered_blocks = 0

    # --- prefix caching ----------------------------------------------------------------------------
    def reset_prefix_cache(self) -> None:
        """Forget every cached block (their keys/values are stale after a weight update); blocks in use stay
        with their sequences, unregistered, and idle cached blocks become free."""
        for b in list(self.evictable):
            self.free_ids.append(b)
        self.evictable.clear()
        self.hash_to_block.clear()
        for block in self.blocks:
            block.hash, block.token_ids = None, ()

    def cache_blocks(self, seq: Sequence) -> None:
        """Register the full blocks of `seq` whose KV is now computed, so later sequences can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for i in range(seq.num_registered_blocks, num_full):
            h = self._hash_of(seq, i)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash = h
                block.token_ids = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
                self.hash_to_block[h] = block.block_id
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def _hash_of(self, seq: Sequence, i: int) -> int:
        """Chained hash of block i of `seq` (memoised on the sequence; blocks' contents never change)."""
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            tokens = tuple(seq.token_ids[j * self.block_size:(j + 1) * self.block_size])
            seq.block_hashes.append(block_hash(seq.block_hashes[-1] if j else None, tokens))
        return seq.block_hashes[i]

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Registered blocks matching `seq`'s leading full blocks. The last token is never served from the
        cache: its logits are needed, so at least one token is always computed."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            b = self.hash_to_block.get(self._hash_of(seq, i))
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            if b is None or self.blocks[b].token_ids != tokens:
                break
            hits.append(b)
        return hits

    def _fresh_block(self) -> int:
        """A block with no reusable contents: a never-used/unregistered one, else evict the LRU cached one."""
        if self.free_ids:
            return self.free_ids.pop()
        if not self.evictable:
            raise RuntimeError("out of KV-cache blocks (the scheduler should have checked can_allocate/can_append)")
        b, _ = self.evictable.popitem(last=False)
        block = self.blocks[b]
        if block.hash is not None and self.hash_to_block.get(block.hash) == b:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids = None, ()
        return b

    def _take(self, b: int) -> int:
        block = self.blocks[b]
        if block.ref_count == 0:
            self.evictable.pop(b, None)
        block.ref_count += 1
        return b
