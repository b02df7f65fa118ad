"""Dual Chunk Attention: the log-sum-exp merge of its three parts equals one dense softmax over the remapped
relative-position matrix (built here by hand); a DCA model equals plain attention while every distance is the
true one; prefill + decode on the cache of unrotated keys equals a full DCA forward; a cache of rotated keys
(`ContiguousKVCache`) runs plain attention while that is exact and refuses beyond; the native forward refuses DCA."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from qwen25.config import ModelConfig
from qwen25.engine.engine import LLMEngine
from qwen25.engine.kv_cache import ContiguousKVCache
from qwen25.kernels.native import NativeForward
from qwen25.model.attention import AttentionSpec, UnrotatedKVCache
from qwen25.model.dca import DualChunkAttention, dual_chunk_attention
from qwen25.model.long_context import attention_for_config, plain_attention_limit
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.model.rope import rope_inv_freq
from qwen25.sampling_params import SamplingParams

from tiny_models import unit_scale_

CHUNK, LOCAL = 16, 4  # chunk_len L = 12: positions 0-11, 12-23, 24-35, ... are the chunks


def reference_distances(T: int, chunk_size: int, local_size: int) -> torch.Tensor:
    """(T, T) relative distance query i -> key j (j <= i) as the Qwen2.5-1M report / vLLM define DCA, written
    out case by case."""
    L = chunk_size - local_size
    rel = torch.full((T, T), -1, dtype=torch.long)
    for i in range(T):
        for j in range(i + 1):
            if i // L == j // L:
                rel[i, j] = i - j  # intra-chunk: the true distance
            elif i // L == j // L + 1:
                rel[i, j] = min(i % L + L, chunk_size) - j % L  # successive chunk: true, capped
            else:
                rel[i, j] = min(2 * L - 1, chunk_size) - j % L  # inter-chunk: a constant query position
    return rel


def rotate(x: torch.Tensor, angle_positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
    """Half-split RoPE of x (..., D) by positions (broadcast against x[..., 0])."""
    freqs = angle_positions.double().unsqueeze(-1) * inv_freq.double()
    cos, sin = torch.cat([freqs.cos()] * 2, -1) * scale, torch.cat([freqs.sin()] * 2, -1) * scale
    x1, x2 = x.double().chunk(2, dim=-1)
    return x.double() * cos + torch.cat([-x2, x1], -1) * sin


def dense_reference(q, k, v, rel, inv_freq, scale):
    """softmax_j((R(rel[i, j]) q_i) . k_j / sqrt(D)) v_j in float64: the logit of a rotated pair depends on the
    difference of the positions only, so rotating the query by the remapped distance and leaving keys unrotated
    is the same attention. q (B, H, T, D), k/v (B, H_kv, T, D)."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    q_rel = rotate(q.unsqueeze(3).expand(B, H, T, T, D), rel.clamp(min=0), inv_freq, scale)  # (B, H, i, j, D)
    logits = (q_rel * (k.unsqueeze(2) * scale)).sum(-1) / math.sqrt(D)  # the keys carry the attention factor too
    logits = logits.masked_fill(rel < 0, float("-inf"))
    return torch.softmax(logits, -1) @ v


def test_reference_distances_are_the_remapped_ones():
    rel = reference_distances(40, CHUNK, LOCAL)
    assert rel[11, 0] == 11 and rel[13, 12] == 1  # inside a chunk
    assert rel[12, 0] == 12 and rel[15, 0] == 15  # successive, true while i % L + L <= chunk_size
    assert rel[20, 0] == CHUNK and rel[23, 11] == CHUNK - 11  # successive, capped at chunk_size
    assert rel[24, 0] == CHUNK and rel[39, 5] == CHUNK - 5  # inter-chunk
    assert int(rel.max()) == CHUNK  # no distance beyond chunk_size, however long the sequence


@pytest.mark.parametrize("yarn", [False, True])
def test_lse_merge_equals_dense_attention_with_the_remapped_distances(yarn):
    torch.manual_seed(0)
    B, H, H_kv, T, D = 2, 4, 2, 40, 16  # 40 tokens: 4 chunks, all three parts
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H_kv, T, D), torch.randn(B, H_kv, T, D)
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8} if yarn else None
    inv_freq, scale = rope_inv_freq(D, 10_000.0, scaling)
    pos = torch.arange(T).expand(B, T)
    got = dual_chunk_attention(q, k, v, pos, pos, inv_freq, scale, CHUNK, LOCAL)
    ref = dense_reference(q, k, v, reference_distances(T, CHUNK, LOCAL), inv_freq, scale)
    assert (got.double() - ref).abs().max().item() < 1e-5
    # The remapping matters: true distances give another result.
    true = torch.arange(T).unsqueeze(1) - torch.arange(T).unsqueeze(0)
    assert (dense_reference(q, k, v, true.masked_fill(true < 0, -1), inv_freq, scale) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("past,T", [(0, 40), (5, 30), (13, 1), (30, 10), (0, 9)])
def test_sliced_causal_path_equals_the_masked_one(past, T):
    """The key-slice path the backend takes for plain causal passes (no padding, no documents) equals the general
    masked computation: runs inside one chunk, chunk boundaries, decode rows, every part present or not."""
    from qwen25.model.dca import dual_chunk_attention_causal

    torch.manual_seed(past + T)
    S = past + T
    q, k, v = torch.randn(2, 6, T, 16), torch.randn(2, 2, S, 16), torch.randn(2, 2, S, 16)
    inv_freq, scale = rope_inv_freq(16, 10_000.0, {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 8})
    q_pos, k_pos = torch.arange(past, S).expand(2, T), torch.arange(S).expand(2, S)
    ref = dual_chunk_attention(q, k, v, q_pos, k_pos, inv_freq, scale, CHUNK, LOCAL, past=past)
    got = dual_chunk_attention_causal(q, k, v, past, inv_freq, scale, CHUNK, LOCAL)
    assert (got - ref).abs().max().item() < 1e-5


def test_query_blocks_do_not_change_the_result(monkeypatch):
    import qwen25.model.dca as dca

    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    inv_freq, _ = rope_inv_freq(16, 10_000.0)
    pos = torch.arange(40).unsqueeze(0)
    whole = dual_chunk_attention(q, k, v, pos, pos, inv_freq, 1.0, CHUNK, LOCAL)
    monkeypatch.setattr(dca, "BLOCK_ELEMENTS", 4 * 40 * 7)  # 7 query rows per block
    torch.testing.assert_close(dual_chunk_attention(q, k, v, pos, pos, inv_freq, 1.0, CHUNK, LOCAL), whole,
                               atol=1e-6, rtol=0)


def tiny(dca: dict | None = None, layers: int = 2) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=10_000.0, tie_word_embeddings=False, dual_chunk_attention_config=dca)
    return unit_scale_(Qwen2ForCausalLM(config).eval(), norms=True)


DCA = {"chunk_size": CHUNK, "local_size": LOCAL, "original_max_position_embeddings": 64}


def with_dca(plain: Qwen2ForCausalLM, dca: dict = DCA) -> Qwen2ForCausalLM:
    model = Qwen2ForCausalLM(plain.config.replace(dual_chunk_attention_config=dict(dca))).eval()
    model.load_state_dict(plain.state_dict())
    return model


def test_dca_equals_plain_attention_while_every_distance_is_true():
    plain = tiny()
    model = with_dca(plain)
    assert isinstance(attention_for_config(model.config), DualChunkAttention)
    assert plain_attention_limit(model.config) == CHUNK  # min(chunk_size 16, 2 L = 24, original 64)
    for T in (5, 12, CHUNK):  # one chunk, and into the next one while i % L + L <= chunk_size
        ids = torch.randint(0, 256, (2, T))
        with torch.no_grad():
            torch.testing.assert_close(model(ids), plain(ids), atol=1e-5, rtol=0)
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert (model(ids)[:, CHUNK:] - plain(ids)[:, CHUNK:]).abs().max() > 1e-2  # beyond, DCA is not plain


def test_prefill_and_decode_on_the_unrotated_cache_equal_the_full_forward():
    model = tiny(DCA)
    ids = torch.randint(0, 256, (2, 50))  # 5 chunks; length 50 <= original 64: no length scaling
    with torch.no_grad():
        full = model(ids)
        cache = UnrotatedKVCache(model.config, 2, 50)
        parts = [model(ids[:, :17], cache=cache), model(ids[:, 17:30], cache=cache)]  # chunked prefill
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(30, 50)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_left_padded_batch_equals_each_row_alone():
    model = tiny(DCA)
    a, b = torch.randint(0, 256, (1, 45)), torch.randint(0, 256, (1, 30))
    pad = 15
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[1, :pad] = False
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = UnrotatedKVCache(model.config, 2, 46)
        batched = model(ids, positions=positions, cache=cache, padding_mask=mask)
        step = model(torch.tensor([[5], [7]]), positions=positions[:, -1:] + 1, cache=cache)
        alone_a, alone_b = model(torch.cat([a, torch.tensor([[5]])], 1)), model(torch.cat([b, torch.tensor([[7]])], 1))
    torch.testing.assert_close(batched[0], alone_a[0, :-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1, pad:], alone_b[0, :-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[:, 0], torch.stack([alone_a[0, -1], alone_b[0, -1]]), atol=1e-5, rtol=0)


def test_length_scaling_beyond_original_max_position_embeddings():
    """vLLM's scale s = max(1, 0.1 ln(n / W) + 1) multiplies queries and keys (logits by s^2) once the sequence
    is longer than W."""
    backend = DualChunkAttention(tiny().config.replace(dual_chunk_attention_config={**DCA,
                                                        "original_max_position_embeddings": 20}))
    assert backend.plain_length == CHUNK
    scales = backend.length_scale(torch.tensor([10, 20, 40]))
    torch.testing.assert_close(scales, torch.tensor([1.0, 1.0, 0.1 * math.log(2.0) + 1.0]))
    torch.manual_seed(2)
    B, T = 1, 40
    q, k, v = torch.randn(B, 4, T, 16), torch.randn(B, 2, T, 16), torch.randn(B, 2, T, 16)
    pos = torch.arange(T).unsqueeze(0)
    spec = AttentionSpec(T, positions=pos)
    got = backend(0, q, k, v, None, None, None, spec)  # type: ignore[arg-type]
    s = float(scales[-1])
    ref = dual_chunk_attention(q * s, k * s, v, pos, pos, backend.inv_freq, 1.0, CHUNK, LOCAL)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert (got - dual_chunk_attention(q, k, v, pos, pos, backend.inv_freq, 1.0, CHUNK, LOCAL)).abs().max() > 1e-3


def test_rotated_caches_run_plain_attention_while_exact_and_refuse_beyond():
    plain = tiny()
    model = with_dca(plain)
    ids = torch.randint(0, 256, (1, CHUNK + 1))
    with torch.no_grad():
        cache, ref_cache = ContiguousKVCache(model.config, 1, 32), ContiguousKVCache(plain.config, 1, 32)
        torch.testing.assert_close(model(ids[:, :CHUNK], cache=cache), plain(ids[:, :CHUNK], cache=ref_cache))
        with pytest.raises(NotImplementedError, match="17 tokens is longer than 16"):
            model(ids[:, CHUNK:], cache=cache)


class Bytes:
    special_ids: frozenset[int] = frozenset()

    def token_bytes(self, token_id: int) -> bytes:
        return chr(32 + token_id % 95).encode()

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(32 + t % 95) for t in ids)


def test_paged_engine_equals_plain_attention_while_exact():
    """The engine's PyTorch path (paged cache, keys stored unrotated for DCA): a DCA model's greedy output equals
    the plain model's while prompt + output fit plain_length (beyond: tests/test_long_context_engine.py)."""
    plain = tiny()
    model = with_dca(plain)
    prompt = torch.randint(0, 256, (8,)).tolist()
    params = SamplingParams(temperature=0, max_tokens=CHUNK - 8)
    ours = LLMEngine(model, Bytes(), block_size=4, num_blocks=64).generate([prompt], params)
    ref = LLMEngine(plain, Bytes(), block_size=4, num_blocks=64).generate([prompt], params)
    assert ours[0].token_ids == ref[0].token_ids and len(ours[0].token_ids) == CHUNK - 8


def test_native_forward_refuses_dca():
    config = tiny(DCA, layers=1).config
    plain = config.replace(dual_chunk_attention_config=None)
    assert NativeForward.supports(SimpleNamespace(config=plain), plain, "causal", torch.float32)
    assert not NativeForward.supports(SimpleNamespace(config=config), config, "causal", torch.float32)


def test_set_long_context_switches_a_loaded_model_to_dca():
    from qwen25.model.long_context import set_long_context

    plain = tiny()
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        ref = with_dca(plain)(ids)
        set_long_context(plain, dual_chunk_attention_config=dict(DCA))
        assert isinstance(plain.model.attention, DualChunkAttention)
        torch.testing.assert_close(plain(ids), ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="exceeds the positions this model takes"):
        set_long_context(plain, dual_chunk_attention_config={"chunk_size": 4096, "local_size": 64})
