"""Long context on the engine's paged cache: for Dual Chunk Attention and dynamic YaRN the cache stores keys before
rotation, so chunked prefill + decode of ragged concurrent requests equals, token for token and in logprobs, a
greedy loop of cache-less full-sequence forwards (the definition of both methods) well past the length where they
stop being plain attention."""

from __future__ import annotations

import torch

from qwen25.config import ModelConfig
from qwen25.engine.engine import LLMEngine
from qwen25.model.long_context import needs_unrotated_keys, plain_attention_limit
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.sampling_params import SamplingParams

from tiny_models import unit_scale_

WINDOW = 32  # the dynamic-YaRN models' native window
DCA = {"chunk_size": 16, "local_size": 4, "original_max_position_embeddings": 64}  # plain attention up to 16 tokens


class Bytes:
    special_ids: frozenset[int] = frozenset()

    def token_bytes(self, token_id: int) -> bytes:
        return chr(32 + token_id % 95).encode()

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(32 + t % 95) for t in ids)


def tiny(layers: int, **long_context) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=10_000.0, tie_word_embeddings=False, **long_context)
    return unit_scale_(Qwen2ForCausalLM(config).eval(), norms=True)


def full_forward_greedy(model: Qwen2ForCausalLM, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs, each from one cache-less forward over the whole sequence so far."""
    ids, logps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
            logps.append(float(torch.log_softmax(logits, -1)[ids[-1]]))
    return ids[len(prompt):], logps


def check_engine_equals_full_forward(model: Qwen2ForCausalLM, prompts: list[list[int]], n: int) -> None:
    # A small token budget: prompts prefill in several chunks while the other request decodes (ragged passes).
    engine = LLMEngine(model, Bytes(), block_size=4, num_blocks=128, max_num_batched_tokens=16, use_native=False)
    params = SamplingParams(temperature=0, max_tokens=n, logprobs=0, ignore_eos=True)
    results = engine.generate(prompts, params)
    for prompt, result in zip(prompts, results):
        tokens, logps = full_forward_greedy(model, prompt, n)
        assert result.token_ids == tokens
        got = torch.tensor([lp[0] for lp in result.logprobs])
        torch.testing.assert_close(got, torch.tensor(logps), atol=1e-4, rtol=0)


def test_dca_on_the_paged_cache_equals_full_forward_past_the_plain_length():
    model = tiny(2, dual_chunk_attention_config=dict(DCA))
    assert needs_unrotated_keys(model.config) and plain_attention_limit(model.config) == 16
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (37, 11)]
    # 37 + 24 = 61 tokens: five 12-position chunks, all three DCA parts; <= 64, so no length scaling.
    check_engine_equals_full_forward(model, prompts, 24)


def test_dynamic_yarn_on_the_paged_cache_follows_each_sequence_across_the_window():
    """One layer, so a cached key depends on its token only: every step, the whole context is rotated with the
    regime of the sequence's current length, as a full forward does (more layers would keep the hidden states
    computed before the crossing; see qwen25.model.rope)."""
    model = tiny(1, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": WINDOW,
                                  "dynamic": True})
    assert needs_unrotated_keys(model.config) and plain_attention_limit(model.config) == WINDOW
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (WINDOW - 6, 9, WINDOW + 10)]
    check_engine_equals_full_forward(model, prompts, 16)  # crosses the window in decode, stays short, starts long


def test_dynamic_yarn_prompt_beyond_the_window_in_one_pass():
    """With two layers: a prompt already past the window computes every hidden state in the YaRN regime, so the
    engine still equals the full forward exactly."""
    model = tiny(2, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": WINDOW,
                                       "dynamic": True})
    prompt = torch.randint(0, 256, (WINDOW + 8,), generator=torch.Generator().manual_seed(3)).tolist()
    engine = LLMEngine(model, Bytes(), block_size=4, num_blocks=128, max_num_batched_tokens=64, use_native=False)
    result = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, logprobs=0, ignore_eos=True))[0]
    tokens, logps = full_forward_greedy(model, prompt, 12)
    assert result.token_ids == tokens
    torch.testing.assert_close(torch.tensor([lp[0] for lp in result.logprobs]), torch.tensor(logps), atol=1e-4, rtol=0)


def test_plain_models_keep_rotated_keys():
    assert not needs_unrotated_keys(tiny(1).config)
    assert not needs_unrotated_keys(tiny(1, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": WINDOW}).config)
