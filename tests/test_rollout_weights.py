"""The rollout engine's weights follow the policy: `QuantizedCopy.sync` rewrites the Q8_0-block copy in place so that
the engine's native forward computes exactly what a q8 model freshly quantized from the merged policy computes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from tiny_models import save_tiny_policy  # noqa: E402


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, real_tokenizer):
    return save_tiny_policy(tmp_path_factory.mktemp("rollout-policy"), real_tokenizer)


def _load(policy_dir, lora: bool):
    from qwen25.checkpoint import load
    from qwen25.train.lora import LoraConfig, apply_lora

    ckpt = load(policy_dir, torch.float32, quantization="none", trainable=not lora)
    if lora:
        apply_lora(ckpt.model, LoraConfig(r=4, alpha=8))
    return ckpt


def _engine(model, tokenizer):
    from qwen25.engine.engine import LLMEngine

    return LLMEngine(model, tokenizer, max_num_seqs=8, max_model_len=128, kv_cache_memory=8 << 20, use_native=True)


def _update(model: torch.nn.Module, seed: int) -> None:
    """An optimizer-like in-place change of every trainable parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _fresh_q8(policy: torch.nn.Module) -> torch.nn.Module:
    """The reference: the policy with its adapters merged into a copy, quantized from scratch."""
    from qwen25.train.lora import merge_lora
    from qwen25.weights.quantized import quantize_loaded_model

    merged = copy.deepcopy(policy)
    if any(n.endswith("lora_A.weight") for n, _ in merged.named_parameters()):
        with torch.no_grad():
            merge_lora(merged)
    return quantize_loaded_model(merged.eval(), bits=8)


def _blocks(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The ggml block bytes of every block layer (plain attributes, not in the state dict)."""
    return {name: m.raw for name, m in model.named_modules() if hasattr(m, "raw")}


def _greedy(engine, prompts):
    from qwen25.sampling_params import SamplingParams

    engine.reset_prefix_cache()
    out = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0))
    return [(r.token_ids, [lp[0] for lp in r.logprobs]) for r in out]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sync_equals_a_fresh_quantization_of_the_updated_policy(policy_dir, lora):
    from qwen25.train.rollout_weights import QuantizedCopy

    ckpt = _load(policy_dir, lora)
    policy, tok = ckpt.model, ckpt.tokenizer
    source = QuantizedCopy(policy)
    source.engine = engine = _engine(source.model, tok)
    assert engine.runner.native is not None, "the q8 copy must run on the native forward"
    pointers = {k: v.data_ptr() for k, v in source.model.state_dict().items()}
    pointers.update({k: v.ctypes.data for k, v in _blocks(source.model).items()})
    prompts = [tok.encode("Hello there"), tok.encode("def add(a, b):")]
    before = _greedy(engine, prompts)
    for step in range(2):
        _update(policy, seed=step)
        assert source.sync() >= 0.0
        reference = _fresh_q8(policy)
        ours = source.model.state_dict()
        for name, value in reference.state_dict().items():
            assert torch.equal(ours[name], value), name
        blocks = _blocks(source.model)
        for name, raw in _blocks(reference).items():
            assert np.array_equal(blocks[name], raw), name
        expected = _greedy(_engine(reference, tok), prompts)
        assert _greedy(engine, prompts) == expected  # tokens and logprobs, bit for bit
    assert _greedy(engine, prompts) != before  # the updates changed what the engine samples
    after = {k: v.data_ptr() for k, v in source.model.state_dict().items()}
    after.update({k: v.ctypes.data for k, v in _blocks(source.model).items()})
    assert after == pointers  # written in place: nothing reallocated


def test_lora_sync_leaves_the_frozen_tables_alone(policy_dir):
    from qwen25.train.rollout_weights import QuantizedCopy

    ckpt = _load(policy_dir, lora=True)
    source = QuantizedCopy(ckpt.model)
    table = source.model.lm_head.raw.copy()
    with torch.no_grad():
        ckpt.model.lm_head.weight.add_(1.0)  # frozen under LoRA: a sync must not spend time re-quantizing it
    source.sync()
    assert np.array_equal(source.model.lm_head.raw, table)


def test_grpo_loader_scores_rollouts_from_the_q8_copy_and_reference_from_the_policy(policy_dir):
    """With a QuantizedCopy the loader samples from the copy but takes reference log-probs from the policy."""
    from qwen25.sampling_params import SamplingParams
    from qwen25.train.distributed import DistContext
    from qwen25.train.grpo_data import PromptRecord
    from qwen25.train.grpo_rollout import GRPOLoader
    from qwen25.train.logprobs import token_logps
    from qwen25.train.rewards import build_rewards
    from qwen25.train.rollout_weights import QuantizedCopy

    ckpt = _load(policy_dir, lora=True)
    policy, tok = ckpt.model, ckpt.tokenizer
    _update(policy, seed=7)
    source = QuantizedCopy(policy)
    source.engine = engine = _engine(source.model, tok)
    rewards, weights = build_rewards(["format:/a/"], policy_tokenizer=tok)
    prompts = [PromptRecord(tok.encode(f"Say {c}."), f"Say {c}.", {}) for c in "ab"]
    loader = GRPOLoader(prompts, engine, rewards, weights, SamplingParams(n=2, temperature=1.0, max_tokens=6),
                        prompts_per_batch=2, ctx=DistContext(), pad_id=tok.eos_token_id, beta=0.1,
                        weights_source=source)
    batch = next(iter(loader))
    from qwen25.train.grpo_rollout import adapters_disabled

    with torch.no_grad(), adapters_disabled(policy):
        expected = token_logps(policy.eval(), batch.input_ids, batch.labels, DistContext()).logps
    assert torch.equal(batch.ref_logps, expected)
    assert batch.stats["sync_s"] >= 0.0 and batch.stats["rollout_tokens"] > 0


def test_rollout_cache_is_sized_for_the_dtype_the_engine_stores(policy_dir):
    """The q8 copy's engine stores an fp16 cache (`auto`), the policy's own tensors an fp32 one: the budget GRPO
    asks for is 2 (K and V) x layers x KV heads x head_dim x that itemsize per token, for every rollout sequence
    at full length plus one spare."""
    from types import SimpleNamespace

    from qwen25.engine.engine import kv_cache_dtype_of
    from qwen25.kernels.native import NativeForward
    from qwen25.train.grpo import _kv_bytes
    from qwen25.train.rollout_weights import QuantizedCopy

    policy = _load(policy_dir, lora=True).model
    copy_model = QuantizedCopy(policy).model
    if not NativeForward.takes(copy_model):
        pytest.skip("no native kernel on this machine (no C compiler or AVX2): the q8 copy stores no fp16 cache")
    cfg = SimpleNamespace(max_num_seqs=64, batch_size=2, num_generations=8, seq_len=96)
    per_token_elements = 2 * 2 * 2 * 8  # K and V, 2 layers, 2 KV heads, head_dim 32 / 4
    assert kv_cache_dtype_of(copy_model, "auto") == torch.float16
    assert _kv_bytes(copy_model, cfg) == per_token_elements * 2 * 96 * 17
    assert _kv_bytes(policy, cfg) == per_token_elements * 4 * 96 * 17
