"""The fast q8 path: the native kernel against the dequantized reference, and the real model's quality
(perplexity) against the dequantized fp32 reference on a fixed text."""

from __future__ import annotations

import math

import pytest
import torch

from qwen25.engine.kv_cache import ContiguousKVCache
from qwen25.kernels import load_q8_kernels
from qwen25.kernels.quant import Q8Linear, dequantize_q8, quantize_q8, quantize_q8_


@pytest.mark.parametrize("group", [32, 128, 0])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 23, 64])
def test_q8_linear_matches_dequantized_reference(group, rows):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(896, 1152, bias=True)
    q8 = Q8Linear.from_linear(linear, group)
    x = torch.randn(rows, 896)
    ref = torch.nn.functional.linear(x, dequantize_q8(q8.weight_q, q8.scales), q8.bias)
    torch.testing.assert_close(q8(x), ref, atol=2e-5, rtol=1e-5)


def test_native_kernel_is_built_here():
    assert load_q8_kernels() is not None, "gcc with AVX2 is expected on this machine kind"


@pytest.mark.parametrize("group", [32, 128, 256])
def test_in_place_quantizer_equals_quantize_q8(group):
    """quantize_q8_ (the RL weight sync's quantizer, into existing buffers) gives quantize_q8's bits, zero groups,
    ties at .5 and the largest magnitudes included."""
    torch.manual_seed(group)
    w = torch.randn(48, 512) * torch.logspace(-3, 2, 48).unsqueeze(1)
    w[3] = 0.0
    w[5, :group] = torch.arange(group) * 0.5 - 7.25  # many exact .5 steps of the scale
    w[7, 0] = -1e4
    q_ref, s_ref = quantize_q8(w, group)
    q, s = torch.empty_like(q_ref), torch.empty_like(s_ref)
    quantize_q8_(w.clone(), q, s)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_quantizer_error_is_bounded_by_half_a_step():
    w = torch.randn(64, 256)
    q, s = quantize_q8(w, 32)
    err = (dequantize_q8(q, s) - w).abs().reshape(64, 8, 32)
    assert bool((err <= s.unsqueeze(-1) / 2 + 1e-7).all())


@pytest.mark.real_model
def test_q8_perplexity_within_one_percent_of_fp32_reference(real_gguf):
    from qwen25 import LLM

    text = (torch.nn.modules.conv.__doc__ or "") + open(torch.nn.modules.conv.__file__).read()[:9000]
    reference = LLM(str(real_gguf), quantization="none")
    ids = torch.tensor([reference.tokenizer.encode(text)[:1024]])

    def ppl(model) -> float:  # noqa: ANN001
        with torch.no_grad():
            logits = model(ids)
        return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())

    def ppl_cached(model, chunk: int) -> float:  # noqa: ANN001 - through a KV cache: the native forward
        from qwen25.kernels.native import NativeForward

        native = NativeForward.for_model(model)
        cache = ContiguousKVCache(model.config, 1, ids.shape[1])
        with torch.no_grad():
            logits = torch.cat([native.forward_cache(part, cache, cache.native_view(), part.shape[1])
                                for part in ids.split(chunk, dim=1)], dim=1)
        return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())

    base = ppl(reference.model)
    del reference
    fast = LLM(str(real_gguf), quantization="q8")
    assert fast.quantization == "q8"
    assert abs(ppl(fast.model) / base - 1) < 0.01  # PyTorch path (no cache): fp32 activations
    assert fast.engine.runner.native_for_pass() is not None
    native = ppl_cached(fast.model, 256)  # native fused forward: activations in 129 levels per group, in chunks
    assert abs(native / base - 1) < 0.01
    assert ppl_cached(fast.model, 100) == pytest.approx(native, rel=1e-6)  # chunking does not change results
