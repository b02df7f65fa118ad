"""The in-memory quantizers (`qwen25.weights.block_quant`): Q8_0 and Q5_0 byte for byte against gguf-py's reference
quantizers, Q4_K within its format's rounding bound and decoded identically by gguf-py, in-place writes into a
slice of an existing tensor (what GRPO's rollout copy does), bad input; and (real model) the perplexity of
`quantization="q8"` against the dequantized fp32 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qwen25.weights.block_quant import block_bytes, quantize_blocks, quantize_blocks_, quantize_q8_0
from qwen25.weights.quants import GGMLType, dequantize

gguf = pytest.importorskip("gguf")


def weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Rows of different magnitudes with outliers, a zero row, exact ties and huge values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 2, rows).unsqueeze(1)
    w[::7, ::29] *= 6
    w[3] = 0.0
    w[5, :32] = torch.arange(32) * 0.5 - 7.25  # many exact .5 steps of the scale
    w[7, 0] = -1e4
    return w.numpy()


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0"])
def test_q8_0_and_q5_0_equal_the_reference_quantizer(kind):
    x = weights(48, 512)
    ours = quantize_blocks(x, GGMLType[kind])
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind]).view(np.uint8).reshape(-1)
    assert np.array_equal(ours, ref)
    assert np.array_equal(quantize_q8_0(x), quantize_blocks(x, GGMLType.Q8_0))


def test_q4_k_rounds_each_value_to_its_sub_block_grid():
    """Every value decodes to the nearest of its sub-block's 16 levels (d * scale * q - dmin * min) unless it lies
    outside them, gguf-py decodes the bytes as qwen25 does, and the fitted grids beat plain min/max rounding."""
    x = weights(32, 1024, seed=1)
    raw = quantize_blocks(x, GGMLType.Q4_K)
    assert raw.size == block_bytes(GGMLType.Q4_K, 32, 1024) == 32 * 4 * 144
    y = dequantize(raw, GGMLType.Q4_K, x.shape)
    assert np.array_equal(y, gguf.quants.dequantize(raw.reshape(32, -1), gguf.GGMLQuantizationType.Q4_K))
    from qwen25.weights.quants import _k_scale_min

    blocks = raw.reshape(-1, 144)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    step = (blocks[:, 0:2].view(np.float16).astype(np.float32) * sc).reshape(-1, 1)  # per sub-block of 32
    low = -(blocks[:, 2:4].view(np.float16).astype(np.float32) * mn).reshape(-1, 1)
    sub, got = x.reshape(-1, 32), y.reshape(-1, 32)
    inside = (sub >= low) & (sub <= low + 15 * step)
    assert bool((np.abs(got - sub) <= step / 2 * 1.001 + 1e-6)[inside].all())
    span = sub.max(-1, keepdims=True) - np.minimum(sub.min(-1, keepdims=True), 0)
    plain = np.round((sub - np.minimum(sub.min(-1, keepdims=True), 0)) / np.maximum(span / 15, 1e-30))
    rtn = np.clip(plain, 0, 15) * span / 15 + np.minimum(sub.min(-1, keepdims=True), 0)
    assert ((got - sub) ** 2).sum() < ((rtn - sub) ** 2).sum()
    assert np.sqrt(np.mean((y - x) ** 2)) < 0.1 * np.sqrt(np.mean(x ** 2))


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0", "Q4_K"])
def test_in_place_writes_equal_a_fresh_quantization(kind):
    """Rows written into a slice of an existing byte tensor (GRPO's sync) equal those rows quantized alone."""
    kind = GGMLType[kind]
    x = torch.from_numpy(weights(40, 512, seed=2))
    out = torch.zeros(block_bytes(kind, 40, 512), dtype=torch.uint8)
    per_row = block_bytes(kind, 1, 512)
    quantize_blocks_(x[:17], kind, out[:17 * per_row])
    quantize_blocks_(x[17:], kind, out[17 * per_row:])
    assert np.array_equal(out.numpy(), quantize_blocks(x, kind))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_blocks(np.zeros((2, 96), np.float32), GGMLType.Q4_K)
    with pytest.raises(ValueError, match="no quantizer for Q6_K"):
        quantize_blocks(np.zeros((2, 256), np.float32), GGMLType.Q6_K)
    with pytest.raises(ValueError, match="cannot hold"):
        quantize_blocks_(torch.zeros(2, 64), GGMLType.Q8_0, torch.zeros(10, dtype=torch.uint8))


@pytest.mark.real_model
def test_q8_perplexity_within_half_a_percent_of_fp32_reference(real_gguf):
    """`quantization="q8"` (the GGUF's weights requantized to Q8_0 at load) on 1,024 tokens of code, on the PyTorch
    path and through the native forward in chunks (the same bits however the chunks fall)."""
    from qwen25 import LLM
    from qwen25.engine.kv_cache import ContiguousKVCache
    from qwen25.kernels.native import NativeForward

    text = (torch.nn.modules.conv.__doc__ or "") + open(torch.nn.modules.conv.__file__).read()[:9000]
    reference = LLM(str(real_gguf), quantization="none")
    ids = torch.tensor([reference.tokenizer.encode(text)[:1024]])

    def ppl(logits: torch.Tensor) -> float:
        return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())

    def ppl_cached(model, chunk: int) -> float:  # noqa: ANN001 - through a KV cache: the native forward
        native = NativeForward.for_model(model)
        cache = ContiguousKVCache(model.config, 1, ids.shape[1])
        with torch.no_grad():
            return ppl(torch.cat([native.forward_cache(part, cache, cache.native_view(), part.shape[1])
                                  for part in ids.split(chunk, dim=1)], dim=1))

    with torch.no_grad():
        base = ppl(reference.model(ids))
    del reference
    fast = LLM(str(real_gguf), quantization="q8")
    assert fast.quantization == "q8"
    with torch.no_grad():
        assert abs(ppl(fast.model(ids)) / base - 1) < 0.005  # PyTorch path: the same block kernels per layer
    assert fast.engine.runner.native_for_pass() is not None
    native = ppl_cached(fast.model, 256)
    assert abs(native / base - 1) < 0.005
    assert ppl_cached(fast.model, 100) == pytest.approx(native, rel=1e-6)  # chunking does not change results
