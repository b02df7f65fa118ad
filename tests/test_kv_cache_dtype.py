"""`kv_cache_dtype`: what a 16-bit or int8 paged KV cache saves (bytes per block in closed form, tokens the same
memory holds) and what it costs (logits of a chunked prefill over the paged cache against the fp32 cache: max
|delta logit|, mean KL, argmax agreement; on the real 0.5B, perplexity on a fixed text), and that the engine runs
with each (forked samples copy the int8 scales too)."""

from __future__ import annotations

import math

import pytest
import torch

from qwen25.config import ModelConfig
from qwen25.engine.engine import LLMEngine
from qwen25.engine.kv_quant import key_smoothing, quantize_int8, resolve_kv_cache_dtype
from qwen25.engine.paged_cache import PagedKVCache, PagedStep
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.sampling_params import SamplingParams

from tiny_models import unit_scale_

DTYPES = (torch.float16, torch.bfloat16, torch.int8)


class Bytes:
    """The least tokenizer the engine's text side needs (tokens are ids here)."""

    special_ids: frozenset[int] = frozenset()

    def token_bytes(self, token_id: int) -> bytes:
        return b"x"

    def decode(self, ids: list[int]) -> str:
        return "x" * len(ids)


def tiny() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=10_000.0, tie_word_embeddings=False)
    return unit_scale_(Qwen2ForCausalLM(config).eval(), norms=True)


@torch.no_grad()
def chunked_logits(model: Qwen2ForCausalLM, ids: torch.Tensor, dtype: torch.dtype, chunk: int,
                   smooth: bool = True) -> torch.Tensor:
    """Logits (1, T, V) of ids (1, T) prefilled `chunk` tokens at a time over a paged cache stored as `dtype`
    (every chunk after the first reads the earlier keys/values back from the cache); int8 with the engine's key
    smoothing unless `smooth` is False."""
    T, block = ids.shape[1], 16
    smoothing = key_smoothing(model) if dtype == torch.int8 and smooth else None
    cache = PagedKVCache(model.config, -(-T // block), block, dtype, key_smoothing=smoothing)
    out = []
    for past in range(0, T, chunk):
        n = min(chunk, T - past)
        step = PagedStep(cache, past, None, torch.arange(past, past + n), torch.arange(past + n).unsqueeze(0), None)
        out.append(model(ids[:, past:past + n], positions=torch.arange(past, past + n).unsqueeze(0), cache=step))
    return torch.cat(out, 1)


def costs(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float, float]:
    """(max |delta logit|, mean KL(ref || got) in nats, argmax agreement) over positions."""
    lp, lq = torch.log_softmax(ref.float(), -1), torch.log_softmax(got.float(), -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    return float((got - ref).abs().max()), kl, float((got.argmax(-1) == ref.argmax(-1)).float().mean())


def test_bytes_per_block_and_the_tokens_a_budget_holds():
    config = tiny().config  # 2 layers, 2 KV heads, head_dim 16
    fp32 = PagedKVCache.bytes_per_block(config, 16, torch.float32)
    assert fp32 == 2 * 2 * 16 * 2 * 16 * 4
    assert PagedKVCache.bytes_per_block(config, 16, torch.float16) == fp32 // 2
    assert PagedKVCache.bytes_per_block(config, 16, torch.bfloat16) == fp32 // 2
    assert PagedKVCache.bytes_per_block(config, 16, torch.int8) == 2 * 2 * 16 * 2 * (16 + 4)  # + one fp32 scale
    model = tiny()
    capacity = {name: LLMEngine(model, None, kv_cache_memory=fp32 * 64, kv_cache_dtype=name).cache_capacity
                for name in ("auto", "float32", "float16", "int8")}
    assert capacity["auto"] == capacity["float32"] == 64 * 16
    assert capacity["float16"] == 2 * 64 * 16
    assert capacity["int8"] == 16 * (fp32 * 64 // (2 * 2 * 16 * 2 * 20))
    # Qwen2.5-0.5B (head_dim 64): int8 takes (64 + 4) / 256 = 26.6% of fp32's bytes.
    q05 = ModelConfig(num_hidden_layers=24, num_key_value_heads=2, num_attention_heads=14, hidden_size=896,
                      intermediate_size=4864, vocab_size=151936)
    ratio = PagedKVCache.bytes_per_block(q05, 16, torch.int8) / PagedKVCache.bytes_per_block(q05, 16, torch.float32)
    assert ratio == pytest.approx(68 / 256)
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8' is not one of .* int8 takes about the same"):
        resolve_kv_cache_dtype("fp8", torch.float32)
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert [resolve_kv_cache_dtype(n, torch.float32) for n in ("fp32", "fp16", "half", "bf16")] == \
        [torch.float32, torch.float16, torch.float16, torch.bfloat16]


def test_auto_is_float16_for_quantized_weights_and_the_activations_dtype_otherwise():
    """"auto": a q8 / q4 model (fp32 activations, the native forward's weights) gets a float16 cache, so the same
    kv_cache_memory holds twice the tokens of fp32; an unquantized fp32 model keeps fp32 (the bit-faithful
    reference path), a bf16 one bf16. An explicit dtype wins."""
    from qwen25.weights.quantized import quantize_loaded_model

    fp32_model = tiny()
    fp32_bytes = PagedKVCache.bytes_per_block(fp32_model.config, 16, torch.float32)
    budget = dict(kv_cache_memory=fp32_bytes * 64)
    assert LLMEngine(fp32_model, None, **budget).runner.cache.keys.dtype == torch.float32
    for bits in (8, 4):
        quantized = quantize_loaded_model(tiny(), bits)
        auto = LLMEngine(quantized, None, **budget)
        assert auto.runner.cache.keys.dtype == torch.float16, bits
        assert auto.cache_capacity == 2 * 64 * 16
        assert LLMEngine(quantized, None, kv_cache_dtype="fp32", **budget).runner.cache.keys.dtype == torch.float32
    bf16 = tiny().to(torch.bfloat16)
    assert LLMEngine(bf16, None, **budget).runner.cache.keys.dtype == torch.bfloat16
    assert resolve_kv_cache_dtype("auto", torch.float32, quantized=True) == torch.float16
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, quantized=True) == torch.bfloat16


def test_key_smoothing_is_a_per_pair_factor_that_commutes_with_rope():
    """The smoothing factors equal sqrt of each channel's RMS of k_proj(N(0,1) * norm weight) (the larger of the
    RoPE pair), computed here with transformers' rotate_half, so dividing before RoPE equals dividing after."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    model = tiny()
    with torch.no_grad():  # plant a Qwen-like outlier: a big k bias on one slow RoPE pair of layer 0, head 1
        model.model.layers[0].self_attn.k_proj.bias[16 + 7] = 40.0
    factors = key_smoothing(model)
    L, H_kv, D = 2, 2, 16
    assert factors.shape == (L, H_kv, D)
    torch.testing.assert_close(factors[..., :D // 2], factors[..., D // 2:])
    g = torch.Generator().manual_seed(0)
    layer = model.model.layers[0]
    x = torch.randn(512, 64, generator=g) * layer.input_layernorm.weight
    rms = layer.self_attn.k_proj(x).pow(2).mean(0).sqrt().view(H_kv, D).detach()
    expected = torch.maximum(rms[:, :D // 2], rms[:, D // 2:]).repeat(1, 2).sqrt()
    torch.testing.assert_close(factors[0], expected / expected.mean(-1, keepdim=True))
    assert float(factors[0, 1, 7]) > 3 * float(factors[0, 1].median())  # the outlier pair is divided down
    k = torch.randn(1, H_kv, 5, D)
    angle = torch.randn(1, 5, D // 2)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    rotated, _ = apply_rotary_pos_emb(k, k, cos, sin)
    rotated_smoothed, _ = apply_rotary_pos_emb(k / factors[0].unsqueeze(1), k, cos, sin)
    torch.testing.assert_close(rotated_smoothed, rotated / factors[0].unsqueeze(1))


def test_int8_rounding_is_within_half_a_step():
    x = torch.randn(3, 5, 64) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 5)
    assert bool(((q.float() * scale.unsqueeze(-1) - x).abs() <= scale.unsqueeze(-1) / 2 + 1e-7).all())
    assert int(q.abs().amax()) == 127


@pytest.mark.parametrize("dtype,max_delta,max_kl", [(torch.float16, 5e-3, 1e-6), (torch.bfloat16, 3e-2, 1e-5),
                                                   (torch.int8, 6e-2, 3e-5)])
def test_accuracy_cost_on_a_tiny_model(dtype, max_delta, max_kl):
    """Measured here (200 tokens, 16-token chunks): fp16 max |delta| 1.0e-3 / KL 1.1e-8, bf16 1.2e-2 / 6.1e-7,
    int8 2.5e-2 / 4.5e-6; argmax agreement 100% for all three. The fp32 cache equals a cache-less forward."""
    model = tiny()
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    ref = chunked_logits(model, ids, torch.float32, 16)
    with torch.no_grad():
        torch.testing.assert_close(ref, model(ids), atol=1e-5, rtol=0)
    delta, kl, agree = costs(ref, chunked_logits(model, ids, dtype, 16))
    assert 0 < delta < max_delta and kl < max_kl and agree == 1.0


@pytest.mark.parametrize("name", ["float16", "bfloat16", "int8"])
def test_engine_generates_with_each_cache_dtype(name):
    model = tiny()
    prompt = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(2)).tolist()
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = LLMEngine(model, Bytes(), block_size=4, num_blocks=64, max_num_batched_tokens=16).generate([prompt], greedy)
    engine = LLMEngine(model, Bytes(), block_size=4, num_blocks=64, max_num_batched_tokens=16, kv_cache_dtype=name)
    assert engine.runner.cache.keys.dtype == getattr(torch, name)
    assert engine.generate([prompt], greedy)[0].token_ids == ref[0].token_ids
    # n=2 forks the prompt's last, partial block (copy_block): both samples continue from the same cache.
    forked = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=6, n=2, ignore_eos=True))
    assert [r.token_ids for r in forked] == [ref[0].token_ids[:6]] * 2


def test_int8_key_smoothing_cuts_the_cost_of_an_outlier_channel():
    """A Qwen-like outlier (a big k bias on one slow RoPE pair) takes the whole int8 range of every key vector
    unsmoothed; the smoothing divides it down. Measured: KL 2.4e-4 unsmoothed vs 3.2e-5 smoothed."""
    model = tiny()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias[7] = layer.self_attn.k_proj.bias[16 + 15] = 30.0
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    ref = chunked_logits(model, ids, torch.float32, 16)
    _, kl_plain, _ = costs(ref, chunked_logits(model, ids, torch.int8, 16, smooth=False))
    _, kl_smooth, _ = costs(ref, chunked_logits(model, ids, torch.int8, 16))
    assert kl_smooth < kl_plain / 4, (kl_smooth, kl_plain)


def test_the_native_forward_takes_16_bit_caches_and_refuses_int8():
    """A q8 model's fused native forward runs passes over an fp32, fp16 or bf16 cache (its agreement with the
    PyTorch path on each is in test_native_kv16.py); with an int8 cache the runner takes the PyTorch path. Greedy
    tokens equal the fp32 cache's with every dtype on this model."""
    from qwen25.weights.quantized import quantize_loaded_model

    model = quantize_loaded_model(tiny(), 8)
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    fp32 = LLMEngine(model, Bytes(), block_size=4, num_blocks=64, max_num_batched_tokens=16, kv_cache_dtype="fp32")
    if fp32.runner.native is None:
        pytest.skip("no native forward kernel here (no compiler)")
    assert fp32.runner.native_for_pass() is fp32.runner.native
    ref = fp32.generate([prompt], greedy)[0].token_ids
    for name, native in (("fp16", True), ("bf16", True), ("int8", False)):
        engine = LLMEngine(model, Bytes(), block_size=4, num_blocks=64, max_num_batched_tokens=16,
                           kv_cache_dtype=name)
        assert (engine.runner.native_for_pass() is engine.runner.native) == native, name
        assert engine.generate([prompt], greedy)[0].token_ids == ref, name


@pytest.mark.real_model
def test_the_flag_and_the_llm_keyword_reach_the_engine(tiny_hf_dir):
    from qwen25.cli import GenerateConfig
    from qwen25.llm import LLM

    llm = GenerateConfig(model=str(tiny_hf_dir), kv_cache_dtype="bf16").load()
    assert llm.engine.runner.cache.keys.dtype == torch.bfloat16
    assert GenerateConfig(model=str(tiny_hf_dir)).engine_settings() == {}  # auto: the engine's default
    llm = LLM(str(tiny_hf_dir), kv_cache_dtype="int8")
    assert llm.engine.runner.cache.keys.dtype == torch.int8 and llm.engine.runner.cache.key_smoothing is not None
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8_e4m3' is not one of"):
        LLM(str(tiny_hf_dir), kv_cache_dtype="fp8_e4m3")


@pytest.mark.real_model
def test_server_with_an_int8_cache_refuses_what_the_cache_cannot_hold_and_keeps_serving(tiny_hf_dir):
    """serve --kv-cache-dtype int8 with a small pool: a prompt beyond what the cache holds is a 400 naming both
    counts (OpenAI's context_length_exceeded); a prompt that fits is then served."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from qwen25.checkpoint import load
    from qwen25.server.app import create_app_from_checkpoint

    app = create_app_from_checkpoint(load(tiny_hf_dir), served_model_name="tiny", kv_cache_dtype="int8",
                                     num_blocks=4, block_size=16)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": list(range(1000, 1070)), "max_tokens": 2})
        assert r.status_code == 400 and "70 tokens" in r.text and "is 64 tokens" in r.text, r.text
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": list(range(1000, 1040)), "max_tokens": 2,
                                                 "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 40, r.text


@pytest.mark.slow
@pytest.mark.real_model
def test_perplexity_cost_on_the_real_model(real_gguf):
    """Qwen2.5-Coder-0.5B-Instruct (fp32 weights, dequantized: the PyTorch path with fp32 activations, so the
    cache's own rounding is measured, not the 8-bit activation flips it sets off on the block paths), 1,024 tokens of the eval text prefilled 256 at a time: perplexity,
    max |delta logit|, KL and argmax agreement of each cache dtype against the fp32 cache. Measured: fp32 ppl
    59.656; fp16 +0.022% / KL 3.7e-6 / 100% argmax agreement; bf16 -0.124% / 1.5e-3 / 98.7%; int8 +1.03% /
    2.4e-3 / 96.3% with the key smoothing, +2.93% / 2.7e-2 / 90.2% without it. (Every chunk, the first too, reads
    its own keys/values back as stored; with the first 256 tokens unrounded the figures looked smaller: int8
    -0.03%, fp16 -0.001%.) These figures were measured with the older private int8 weights, whose PyTorch path
    kept fp32 activations too."""
    from qwen25.checkpoint import load
    from qwen25.eval.data import load_text

    checkpoint = load(real_gguf, quantization="none")
    text, _ = load_text(None, 6000)
    ids = torch.tensor([checkpoint.tokenizer.encode(text)[:1024]])

    def ppl(logits: torch.Tensor) -> float:
        return math.exp(float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])))

    ref_logits = chunked_logits(checkpoint.model, ids, torch.float32, 256)
    ref = ppl(ref_logits)
    report, kls = [f"fp32 cache: ppl {ref:.4f}"], {}
    for name, dtype, smooth, max_rel, max_kl in (("fp16", torch.float16, True, 1e-3, 1e-4),
                                                 ("bf16", torch.bfloat16, True, 5e-3, 3e-3),
                                                 ("int8", torch.int8, True, 1.5e-2, 4e-3),
                                                 ("int8 unsmoothed", torch.int8, False, 5e-2, 5e-2)):
        got = chunked_logits(checkpoint.model, ids, dtype, 256, smooth=smooth)
        delta, kl, agree = costs(ref_logits, got)
        rel, kls[name] = ppl(got) / ref - 1, kl
        report.append(f"{name}: ppl {ppl(got):.4f} ({rel:+.3%}), max |dlogit| {delta:.3g}, KL {kl:.2e}, "
                      f"argmax agreement {agree:.2%}")
        assert abs(rel) < max_rel and kl < max_kl, report
    assert kls["int8"] < kls["int8 unsmoothed"] / 4, report
    print("\n".join(report))
