"""Logits parity with HF transformers on tiny random Qwen2 models saved by transformers itself, loaded through
qwen25's own safetensors reader and config parser (no shared code with the reference)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qwen25.config import ModelConfig  # noqa: E402
from qwen25.engine.kv_cache import ContiguousKVCache  # noqa: E402
from qwen25.model.layers import RMSNorm  # noqa: E402
from qwen25.model.rope import apply_rope, rope_cos_sin, rope_inv_freq  # noqa: E402
from qwen25.weights.loader import model_from_state_dict  # noqa: E402
from qwen25.weights.safetensors import load_safetensors  # noqa: E402


def _tiny_hf_model(tmp_path, tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        tie_word_embeddings=tie, use_sliding_window=False)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    # Random init leaves biases at zero; give them values so the bias path is exercised.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5)
    out = tmp_path / ("tied" if tie else "untied")
    hf.save_pretrained(out, safe_serialization=True)
    return hf, out


def _load_ours(path):
    config = ModelConfig.from_json_file(path / "config.json")
    return model_from_state_dict(config, load_safetensors(path, dtype=torch.float32), str(path))


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_transformers_fp32(tmp_path, tie):
    hf, path = _tiny_hf_model(tmp_path, tie)
    ours = _load_ours(path)
    assert ours.config.tie_word_embeddings == tie
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    ids = torch.randint(0, 384, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_bf16_close_to_transformers_bf16(tmp_path):
    hf, path = _tiny_hf_model(tmp_path, tie=False)
    ours = _load_ours(path).to(torch.bfloat16)
    hf = hf.to(torch.bfloat16)
    ids = torch.randint(0, 384, (1, 20))
    with torch.no_grad():
        ref = hf(ids).logits.float()
        got = ours(ids)
    # Same op order in bf16: the results agree to bf16 rounding of the logits.
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)


def test_rope_and_rmsnorm_match_hf_functions():
    from transformers.models.qwen2 import modeling_qwen2 as hfq

    x = torch.randn(2, 4, 9, 64)  # (B, H, T, D)
    positions = torch.arange(100, 109).expand(2, 9)
    inv_freq, scale = rope_inv_freq(64, 1_000_000.0)
    cos, sin = rope_cos_sin(positions, inv_freq, scale)
    ref_q, _ = hfq.apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(apply_rope(x, cos, sin), ref_q, atol=0, rtol=0)
    norm, ref_norm = RMSNorm(64, 1e-6), hfq.Qwen2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        ref_norm.weight.copy_(norm.weight)
    h = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(norm.to(torch.bfloat16)(h), ref_norm.to(torch.bfloat16)(h), atol=0, rtol=0)


def test_prefill_plus_decode_equals_full_forward(tmp_path):
    _, path = _tiny_hf_model(tmp_path, tie=True)
    model = _load_ours(path)
    ids = torch.randint(0, 384, (2, 24))
    with torch.no_grad():
        full = model(ids)
        cache = ContiguousKVCache(model.config, batch_size=2, max_length=32)
        parts = [model(ids[:, :15], cache=cache)]
        for t in range(15, 24):
            parts.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_left_padded_batch_equals_each_row_alone(tmp_path):
    _, path = _tiny_hf_model(tmp_path, tie=False)
    model = _load_ours(path)
    a, b = torch.randint(0, 384, (1, 11)), torch.randint(0, 384, (1, 6))
    pad = 11 - 6
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], dim=1)])
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :pad] = False
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = ContiguousKVCache(model.config, batch_size=2, max_length=16)
        batched = model(ids, positions=positions, cache=cache, padding_mask=mask)
        step = model(torch.tensor([[5], [7]]), positions=positions[:, -1:] + 1, cache=cache)
        alone_a, alone_b = model(a), model(b)
        alone_a2 = model(torch.cat([a, torch.tensor([[5]])], dim=1))[:, -1:]
        alone_b2 = model(torch.cat([b, torch.tensor([[7]])], dim=1))[:, -1:]
    torch.testing.assert_close(batched[0], alone_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1, pad:], alone_b[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[0], alone_a2[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[1], alone_b2[0], atol=1e-5, rtol=0)
