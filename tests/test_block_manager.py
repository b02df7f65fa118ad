"""BlockManager without a model: allocation, reference counts, prefix reuse by chained block hashes, LRU eviction."""

from __future__ import annotations

import pytest

from qwen25.engine import block_manager as bm_module
from qwen25.engine.block_manager import BlockManager
from qwen25.engine.sequence import Sequence
from qwen25.sampling_params import SamplingParams


def make_seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams(temperature=0))


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What a step does for the block manager: all tokens now have KV; full blocks become reusable."""
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_blocks(seq)


def ref_counts(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm.blocks]


def test_allocate_append_free_ref_counts_return_to_zero():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(list(range(10)), "a"), make_seq(list(range(100, 104)), "b")
    assert bm.can_allocate(a)
    bm.allocate(a)
    bm.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_used_blocks == 4 and bm.num_free_blocks == 4
    compute_all(bm, b)
    b.append_token(7)  # 5th token: crosses into a second block
    assert bm.can_append(b)
    bm.may_append(b)
    assert len(b.block_table) == 2 and bm.num_used_blocks == 5
    bm.free(a)
    bm.free(b)
    assert ref_counts(bm) == [0] * 8 and bm.num_used_blocks == 0 and bm.num_free_blocks == 8
    assert a.block_table == [] and a.num_computed_tokens == 0


def test_can_allocate_and_can_append_respect_capacity():
    bm = BlockManager(num_blocks=3, block_size=4)
    assert not bm.can_allocate(make_seq(list(range(13))))  # needs 4 blocks
    s = make_seq(list(range(12)))
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert bm.num_free_blocks == 0
    compute_all(bm, s)
    assert bm.can_append(s)  # no new block needed yet
    s.append_token(1)
    assert not bm.can_append(s)
    with pytest.raises(RuntimeError, match="out of KV-cache blocks"):
        bm.may_append(s)


def test_shared_prefix_blocks_are_reused_with_ref_counts():
    bm = BlockManager(num_blocks=16, block_size=4)
    prefix = list(range(50, 62))  # 3 full blocks
    a = make_seq(prefix + [1, 2], "a")
    bm.allocate(a)
    assert a.num_computed_tokens == 0 and bm.hit_tokens == 0
    compute_all(bm, a)
    b = make_seq(prefix + [3, 4, 5], "b")
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:3] == a.block_table[:3]
    assert b.block_table[3] != a.block_table[3]
    assert b.num_computed_tokens == 12 and b.num_cached_tokens == 12 and bm.hit_tokens == 12
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 2, 1]
    assert bm.num_used_blocks == 5
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1, 1]
    bm.free(b)
    assert ref_counts(bm) == [0] * 16 and bm.num_used_blocks == 0


def test_no_hit_before_blocks_are_computed_and_last_token_always_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(12))
    a = make_seq(prompt, "a")
    bm.allocate(a)
    b = make_seq(prompt, "b")
    bm.allocate(b)  # a's KV is not computed yet: nothing to reuse
    assert b.num_computed_tokens == 0 and not set(a.block_table) & set(b.block_table)
    compute_all(bm, a)
    c = make_seq(prompt, "c")
    bm.allocate(c)
    # The whole prompt is cached, but its last token's logits are needed: the last block is recomputed.
    assert c.block_table[:2] == a.block_table[:2] and c.block_table[2] != a.block_table[2]
    assert c.num_computed_tokens == 8


def test_freed_cached_blocks_stay_reusable_then_are_evicted_lru():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = make_seq(list(range(8)) + [99], "a")  # 2 full blocks + 1 partial
    bm.allocate(a)
    compute_all(bm, a)
    full = a.block_table[:2]
    bm.free(a)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 6
    assert all(bm.blocks[i].hash is not None for i in full)
    # Reused after release: the next sequence with the same prefix hits without recomputing.
    b = make_seq(list(range(8)) + [42, 43], "b")
    bm.allocate(b)
    assert b.block_table[:2] == full and b.num_computed_tokens == 8
    bm.free(b)
    # Fill the cache with unrelated sequences: fresh blocks come from never-used ones first, then the least
    # recently used cached block is evicted: the prefix's tail block, since free() releases tails first.
    c = make_seq(list(range(200, 212)), "c")  # 3 blocks, all never-used ones
    bm.allocate(c)
    assert not set(c.block_table) & set(full)
    d = make_seq(list(range(300, 308)), "d")  # 2 blocks: the last never-used one, then an eviction
    bm.allocate(d)
    assert set(d.block_table) & set(full) == {full[1]}
    assert bm.blocks[full[1]].hash is None and bm.blocks[full[0]].hash is not None
    bm.free(c)
    e = make_seq(list(range(8)) + [7], "e")
    bm.allocate(e)
    assert e.block_table[0] == full[0] and e.num_computed_tokens == 4  # only the first prefix block survived


def test_hash_collision_is_not_a_hit(monkeypatch):
    monkeypatch.setattr(bm_module, "block_hash", lambda parent, tokens: 1234)
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq([1, 2, 3, 4, 5], "a")
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq([9, 9, 9, 9, 5], "b")  # same (fake) hash, different tokens
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and b.block_table[0] != a.block_table[0]


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_seq(list(range(9)), "a")
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq(list(range(9)), "b")
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and bm.hit_tokens == 0
    bm.free(a)
    bm.free(b)
    assert bm.num_used_blocks == 0 and not bm.evictable
