"""Dual Chunk Attention with sparse prefill (MInference's vertical-slash pattern over DCA's three parts,
`qwen25.model.dca.dual_chunk_sparse_prefill`): budgets covering every key give exactly dense DCA; a fixed small
pattern gives dense DCA restricted to the pattern's keys (the mask built here from the pattern's definition);
a DCA model with sparse prefill on runs the engine's chunked prefill to the same greedy tokens as dense DCA when
the budgets cover every key."""

from __future__ import annotations

import pytest
import torch

import qwen25.model.dca as dca
from qwen25.model.dca import dual_chunk_attention, dual_chunk_attention_causal, dual_chunk_sparse_prefill
from qwen25.model.rope import rope_inv_freq
from qwen25.model.sparse_prefill import SparsePrefillConfig, enable_sparse_prefill

CHUNK, LOCAL = 16, 4  # chunk_len L = 12
H, H_KV, D = 4, 2, 16
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}


def qkv(S: int, past: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(H, S - past, D, generator=g), torch.randn(H_KV, S, D, generator=g),
            torch.randn(H_KV, S, D, generator=g))


@pytest.mark.parametrize("past,T", [(0, 40), (5, 30), (30, 10), (0, 9), (20, 20)])
def test_budgets_covering_every_key_equal_dense_dca(past, T):
    q, k, v = qkv(past + T, past, past + T)
    inv_freq, scale = rope_inv_freq(D, 10_000.0, YARN)
    cfg = SparsePrefillConfig(vertical_size=past + T, slash_size=2, block_size=4, last_q=4, sink_size=1,
                              local_size=1, min_length=0)
    got = dual_chunk_sparse_prefill(q, k, v, past, inv_freq, scale, CHUNK, LOCAL, cfg)
    ref = dual_chunk_attention_causal(q[None], k[None], v[None], past, inv_freq, scale, CHUNK, LOCAL)[0]
    assert (got - ref).abs().max().item() < 1e-5


def pattern_mask(columns: list[int], distances: list[int], S: int, past: int, bs: int) -> torch.Tensor:
    """(1, 1, T, S) bool: the keys each query sees under the pattern (every head the same), causal."""
    offsets = {d // bs for d in distances} | {(d + bs - 1) // bs for d in distances}
    mask = torch.zeros(1, 1, S - past, S, dtype=torch.bool)
    for t in range(S - past):
        p = past + t
        for j in range(p + 1):
            mask[0, 0, t, j] = j in columns or (p // bs - j // bs) in offsets
    return mask


@pytest.mark.parametrize("past,T", [(0, 40), (14, 26)])
def test_a_fixed_pattern_equals_dense_dca_on_its_keys(past, T, monkeypatch):
    """With the estimate pinned to one pattern (columns 0, 3, 13, 27; diagonals 0, 1, 9), every part attends to
    the pattern's keys in its range: equal to the masked dense DCA, and not to unmasked DCA."""
    columns, distances = [0, 3, 13, 27], [0, 1, 9]
    monkeypatch.setattr(dca, "pattern_from_probs", lambda probs, cfg: (
        torch.tensor([columns] * H), torch.tensor([distances] * H)))
    S = past + T
    q, k, v = qkv(S, past, 7)
    inv_freq, scale = rope_inv_freq(D, 10_000.0)
    cfg = SparsePrefillConfig(vertical_size=4, slash_size=3, block_size=4, last_q=4, sink_size=1, local_size=1,
                              min_length=0)
    got = dual_chunk_sparse_prefill(q, k, v, past, inv_freq, scale, CHUNK, LOCAL, cfg)
    mask = pattern_mask(columns, distances, S, past, 4)
    assert int(mask.sum()) < (S * (S + 1) - past * (past + 1)) // 2  # keys really left out
    q_pos, k_pos = torch.arange(past, S)[None], torch.arange(S)[None]
    ref = dual_chunk_attention(q[None], k[None], v[None], q_pos, k_pos, inv_freq, scale, CHUNK, LOCAL, past=past,
                               mask=mask)[0]
    assert (got - ref).abs().max().item() < 1e-5
    dense = dual_chunk_attention_causal(q[None], k[None], v[None], past, inv_freq, scale, CHUNK, LOCAL)[0]
    assert (got - dense).abs().max().item() > 1e-2


def test_engine_prefill_with_covering_budgets_equals_dense_dca(monkeypatch):
    from types import SimpleNamespace

    from qwen25.engine.engine import LLMEngine
    from qwen25.sampling_params import SamplingParams
    from test_dca import DCA, tiny

    model = tiny(DCA)
    prompt = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(3)).tolist()
    tokenizer = SimpleNamespace(special_ids=frozenset(), token_bytes=lambda t: b"x", decode=lambda ids: "x" * len(ids))
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=1)

    def run():  # prefill in 16-token chunks over the paged cache (keys stored unrotated)
        engine = LLMEngine(model, tokenizer, block_size=8, num_blocks=16, max_num_batched_tokens=16)
        return engine.generate([prompt], params)[0]

    dense = run()
    calls = []
    original = dca.dual_chunk_sparse_prefill
    enable_sparse_prefill(model, {"vertical_size": 128, "slash_size": 2, "block_size": 4, "last_q": 4,
                                  "min_length": 32})
    monkeypatch.setattr(dca, "dual_chunk_sparse_prefill", lambda *a: calls.append(1) or original(*a))
    sparse = run()
    assert calls  # chunks past 32 keys ran the sparse DCA
    assert sparse.token_ids == dense.token_ids
    torch.testing.assert_close(torch.tensor([lp[0] for lp in sparse.logprobs]),
                               torch.tensor([lp[0] for lp in dense.logprobs]), atol=1e-4, rtol=0)
