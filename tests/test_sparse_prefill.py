"""Sparse prefill (MInference's vertical-slash pattern): exact against dense attention when the budgets cover every
key, equal to dense attention under the pattern's own mask otherwise, through the model and the engine's chunked
prefill into the paged cache, and clear errors where it cannot run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import qwen25.model.sparse_prefill as sp
from qwen25.config import ModelConfig
from qwen25.engine.engine import LLMEngine
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.model.sparse_prefill import (SparsePrefillAttention, SparsePrefillConfig, enable_sparse_prefill,
                                         estimate_pattern, sparse_prefill_applies, vertical_slash_attention)
from qwen25.sampling_params import SamplingParams

from tiny_models import unit_scale_

H, H_KV, D = 4, 2, 16
CASES = [(300, 0), (300, 170), (257, 64), (130, 129), (64, 0), (200, 199)]  # (keys S, cached past)


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, mask: torch.Tensor | None = None):
    S = k.shape[1]
    causal = torch.arange(S)[None, :] <= torch.arange(past, S)[:, None]
    allowed = causal if mask is None else causal & mask
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=allowed, enable_gqa=True)[0]


def random_qkv(S: int, past: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(H, S - past, D, generator=g), torch.randn(H_KV, S, D, generator=g),
            torch.randn(H_KV, S, D, generator=g))


@pytest.mark.parametrize("S,past", CASES)
@pytest.mark.parametrize("cover", ["columns", "diagonals"])
def test_budgets_covering_every_key_equal_dense_attention(S, past, cover):
    q, k, v = random_qkv(S, past)
    budgets = {"vertical_size": S, "slash_size": 3} if cover == "columns" else {"vertical_size": 2, "slash_size": S}
    cfg = SparsePrefillConfig(**budgets, block_size=32, local_size=1, sink_size=1, min_length=0, last_q=16)
    torch.testing.assert_close(vertical_slash_attention(q, k, v, past, cfg), dense(q, k, v, past),
                               atol=2e-6, rtol=0)


def pattern_mask(columns: torch.Tensor, distances: torch.Tensor, S: int, past: int, bs: int) -> torch.Tensor:
    """(H, T, S): the keys each query sees, built element by element from the pattern's definition."""
    mask = torch.zeros(H, S - past, S, dtype=torch.bool)
    for h in range(H):
        offsets = {int(d) // bs for d in distances[h]} | {(int(d) + bs - 1) // bs for d in distances[h]}
        for t in range(S - past):
            p = past + t
            mask[h, t, columns[h]] = True
            for j in range(p + 1):
                if p // bs - j // bs in offsets:
                    mask[h, t, j] = True
    return mask


@pytest.mark.parametrize("S,past", CASES[:4])
def test_small_budgets_equal_dense_attention_under_the_pattern(S, past):
    q, k, v = random_qkv(S, past, seed=1)
    cfg = SparsePrefillConfig(vertical_size=12, slash_size=9, block_size=16, local_size=3, sink_size=2,
                              min_length=0, last_q=8)
    columns, distances = estimate_pattern(q[:, -8:], k, cfg)
    mask = pattern_mask(columns, distances, S, past, cfg.block_size)
    causal = torch.arange(S)[None, :] <= torch.arange(past, S)[:, None]
    assert int((mask & causal).sum()) < H * int(causal.sum())  # the pattern really leaves keys out
    expected = torch.stack([dense(q[h:h + 1], k[h // 2:h // 2 + 1], v[h // 2:h // 2 + 1], past, mask[h])[0]
                            for h in range(H)])
    torch.testing.assert_close(vertical_slash_attention(q, k, v, past, cfg), expected, atol=2e-6, rtol=0)


def test_estimate_keeps_the_strongest_column_and_diagonal_and_the_forced_ones():
    S, n = 200, 8
    q, k, _ = random_qkv(S, S - n, seed=2)
    q, k = q * 0.1, k * 0.1
    k[:, 77] = q[0].mean(0) * 40  # every last query of head 0 (kv head 0) attends to key 77
    k[0, S - n - 50:S - 50] = q[0] * 3  # query S-n+i of head 0 matches key S-n+i-50: diagonal 50
    cfg = SparsePrefillConfig(vertical_size=5, slash_size=6, sink_size=2, local_size=3, last_q=n, min_length=0)
    columns, distances = estimate_pattern(q, k, cfg)
    assert {0, 1, 77} <= set(columns[0].tolist())
    assert {0, 1, 2, 50} <= set(distances[0].tolist())
    # the scores behind it: column sums and diagonal sums of the last queries' softmax attention
    probs = torch.softmax((q[0] @ k[0].T / math.sqrt(D)).masked_fill(
        torch.arange(S)[None, :] > torch.arange(S - n, S)[:, None], float("-inf")), -1)
    assert int(probs[:, 2:].sum(0).argmax()) + 2 == 77
    diagonal = torch.stack([sum(probs[i, S - n + i - d] for i in range(n)) for d in range(3, 100)])
    assert int(diagonal.argmax()) + 3 == 50


def tiny(**long_context) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=10_000.0, tie_word_embeddings=False, **long_context)
    return unit_scale_(Qwen2ForCausalLM(config).eval(), norms=True)


COVER_ALL = {"vertical_size": 1024, "slash_size": 4, "block_size": 16, "min_length": 32, "last_q": 8}


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 128}])
def test_model_forward_with_covering_budgets_equals_dense(rope_scaling, monkeypatch):
    model = tiny(rope_scaling=rope_scaling)
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids)
        enable_sparse_prefill(model, COVER_ALL)
        calls = []
        monkeypatch.setattr(sp, "vertical_slash_attention",
                            lambda *a: calls.append(1) or vertical_slash_attention(*a))
        got = model(ids)
    assert len(calls) == 2 * 2  # both layers, both rows
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=0)
    enable_sparse_prefill(model, None)
    assert model.model.attention is not None and not isinstance(model.model.attention, SparsePrefillAttention)


class Bytes:
    special_ids: frozenset[int] = frozenset()

    def token_bytes(self, token_id: int) -> bytes:
        return chr(32 + token_id % 95).encode()

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(32 + t % 95) for t in ids)


def generate(model: Qwen2ForCausalLM, prompt: list[int], n: int):
    engine = LLMEngine(model, Bytes(), block_size=8, num_blocks=128, max_num_batched_tokens=48, use_native=False)
    params = SamplingParams(temperature=0, max_tokens=n, logprobs=0, ignore_eos=True)
    return engine.generate([prompt], params)[0]


def test_engine_chunked_prefill_into_the_paged_cache(monkeypatch):
    prompt = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    model = tiny()
    dense_result = generate(model, prompt, 6)
    enable_sparse_prefill(model, COVER_ALL)
    shapes = []
    monkeypatch.setattr(sp, "vertical_slash_attention",
                        lambda q, k, v, past, cfg: shapes.append((q.shape[1], past)) or
                        vertical_slash_attention(q, k, v, past, cfg))
    sparse_result = generate(model, prompt, 6)
    assert sparse_result.token_ids == dense_result.token_ids
    torch.testing.assert_close(torch.tensor([lp[0] for lp in sparse_result.logprobs]),
                               torch.tensor([lp[0] for lp in dense_result.logprobs]), atol=1e-4, rtol=0)
    pasts = sorted({past for _, past in shapes})
    assert pasts == [0, 48, 96, 144, 192]  # every 48-token prefill chunk ran sparse over the paged cache
    assert all(T > 1 for T, _ in shapes)  # decode steps stay dense

    enable_sparse_prefill(model, {"vertical_size": 8, "slash_size": 8, "block_size": 16, "min_length": 64,
                                  "last_q": 8, "local_size": 4, "sink_size": 2})
    approx = generate(model, prompt, 6)  # small budgets: runs, finite, not necessarily equal
    assert len(approx.token_ids) == 6 and all(math.isfinite(lp[0]) for lp in approx.logprobs)


def test_runner_skips_the_native_forward_only_for_sparse_passes():
    model = tiny()
    assert not sparse_prefill_applies(model, [100], [100])
    enable_sparse_prefill(model, {"min_length": 64})
    assert sparse_prefill_applies(model, [1, 40], [10, 70])
    assert not sparse_prefill_applies(model, [1, 40], [100, 50])  # a decode over 100 keys, a short chunk
    assert not sparse_prefill_applies(model, [1], [1000])


def test_settings_and_errors():
    assert SparsePrefillConfig.from_setting("on") == SparsePrefillConfig()
    assert SparsePrefillConfig.from_setting("off") is None and SparsePrefillConfig.from_setting(None) is None
    assert SparsePrefillConfig.from_setting('{"vertical_size": 500}').vertical_size == 500
    with pytest.raises(ValueError, match="unknown keys"):
        SparsePrefillConfig.from_setting({"verticals": 5})
    with pytest.raises(ValueError, match="JSON"):
        SparsePrefillConfig.from_setting("{bad")
    with pytest.raises(ValueError, match="slash_size"):
        SparsePrefillConfig(slash_size=0)
    dca_model = tiny(dual_chunk_attention_config={"chunk_size": 64, "local_size": 8})
    assert enable_sparse_prefill(dca_model, True) == SparsePrefillConfig()  # DCA + sparse: tests/test_dca_sparse.py
    assert hasattr(dca_model.model.attention.base, "sparse_prefill_call")
    dynamic = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "dynamic": True}
    with pytest.raises(ValueError, match="dynamic YaRN"):
        enable_sparse_prefill(tiny(rope_scaling=dynamic), True)


@pytest.mark.real_model
def test_cli_flag_reaches_the_model_and_generation_matches_dense(tiny_hf_dir):
    from qwen25.cli import GenerateConfig

    ids = list(range(1000, 1080))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    dense_llm = GenerateConfig(model=str(tiny_hf_dir)).load()
    expected = dense_llm.generate([ids], params)[0].outputs[0].token_ids
    flag = '{"vertical_size": 1000, "slash_size": 2, "block_size": 16, "min_length": 32}'
    llm = GenerateConfig(model=str(tiny_hf_dir), sparse_prefill=flag).load()
    assert isinstance(llm.model.model.attention, SparsePrefillAttention)
    assert llm.generate([ids], params)[0].outputs[0].token_ids == expected
    yarn = '{"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 96}'
    llm = GenerateConfig(model=str(tiny_hf_dir), rope_scaling=yarn, sparse_prefill="on").load()
    assert isinstance(llm.model.model.attention, SparsePrefillAttention)  # re-applied after the YaRN switch


@pytest.mark.real_model
@pytest.mark.parametrize("flags,message", [
    (["--sparse-prefill", "{bad"], "--sparse-prefill: expected on, off or a JSON object"),
    (["--sparse-prefill", '{"vertical": 5}'], "unknown keys ['vertical']"),
])
def test_bad_flags_are_one_line_errors(tiny_hf_dir, capsys, flags, message):
    from qwen25.cli import main

    rc = main(["generate", "-m", str(tiny_hf_dir), *flags, "--prompt", "hi", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err, err


@pytest.mark.slow
@pytest.mark.real_model
def test_real_model_finds_the_passkey_with_sparse_prefill(real_gguf, monkeypatch):
    """Qwen2.5-Coder-0.5B-Instruct, 2,048-token passkey prompts at 3 depths, budgets scaled down with the length
    (MInference's are for 100K+ prompts): 128 columns, 256 diagonals from the last 64 queries of each 512-token
    chunk from 1,024 keys on, in the fused native forward. Measured: found at all 3 depths (242 s on the PyTorch
    path, ~10 s natively, on the shared host). benchmarks/bench_long.py --sparse-prefill runs the long lengths and
    times them."""
    from qwen25.eval.passkey import is_found, passkey_keys, passkey_prompt
    from qwen25.kernels.native import NativeForward
    from qwen25.llm import LLM

    llm = LLM(str(real_gguf), sparse_prefill={"vertical_size": 128, "slash_size": 256, "min_length": 1024})
    calls = []
    original = NativeForward.__call__

    def spy(self, tokens, positions, *args, sparse=None):  # noqa: ANN001, ANN202
        if sparse is not None and len(positions) > 1 and int(positions.max()) + 1 >= 1024:
            calls.append(1)  # a chunk the sparse pattern applies to
        return original(self, tokens, positions, *args, sparse=sparse)

    monkeypatch.setattr(NativeForward, "__call__", spy)
    depths = (0.0, 0.5, 1.0)
    found = []
    for depth, key in zip(depths, passkey_keys(len(depths), seed=5)):
        prompt = passkey_prompt(llm.tokenizer, 2048, depth, key)
        out = llm.generate([prompt.ids], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
        found.append(is_found(out, prompt.key))
    assert all(found), list(zip(depths, found))
    assert len(calls) == 3 * 3  # the chunks ending at 1024, 1536 and 2048 tokens
