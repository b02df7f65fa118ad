"""Speculative decoding: prompt lookup, draft models, and the one-pass verification loop. The output must be the
target's plain greedy output token for token, whatever the proposer guesses; the block kernels must give a row the
same bits whatever other rows share the call (that is what makes verification match one-token decoding).

Tiny random models for the loop (seconds); the real Qwen2.5-Coder GGUFs in the slow tests."""

from __future__ import annotations

import pytest
import torch

from qwen25.config import ModelConfig
from qwen25.engine.kv_cache import ContiguousKVCache
from qwen25.engine.engine import LLMEngine
from qwen25.engine.speculative import DraftModelProposer, NgramProposer, SpeculativeConfig, SpeculativeStats, ngram_lookup
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.sampling_params import SamplingParams

from tiny_models import unit_scale_

VOCAB = 512


def tiny_model(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return unit_scale_(Qwen2ForCausalLM(config).eval())


@pytest.fixture(scope="module")
def target() -> Qwen2ForCausalLM:
    return tiny_model(0)


def plain_greedy(model: Qwen2ForCausalLM, prompt: list[int], max_new: int, stop: frozenset[int]) -> list[int]:
    """One token per forward pass on a contiguous cache: the reference."""
    cache = ContiguousKVCache(model.config, 1, len(prompt) + max_new + 1)
    out: list[int] = []
    fed = prompt
    with torch.inference_mode():
        while len(out) < max_new:
            token = int(model(torch.tensor([fed]), cache=cache, logits_to_keep=1)[0, -1].argmax())
            if token in stop:
                break
            out.append(token)
            fed = [token]
    return out


class ByteTokenizer:
    special_ids: frozenset[int] = frozenset()

    def token_bytes(self, token_id: int) -> bytes:
        return chr(32 + token_id % 95).encode()


def spec_engine(model: Qwen2ForCausalLM, proposer, k: int, stop: frozenset[int] = frozenset(),  # noqa: ANN001
                **settings) -> LLMEngine:  # noqa: ANN003
    """An engine speculating with `proposer` (every sequence shares it) and k drafts per step."""
    eng = LLMEngine(model, ByteTokenizer(), num_blocks=128, block_size=4, stop_token_ids=sorted(stop),
                    speculative_config={"num_speculative_tokens": k}, **settings)
    eng.runner.new_proposer = lambda: proposer
    return eng


def run(model: Qwen2ForCausalLM, prompt: list[int], max_new: int, stop: frozenset[int], proposer, k: int,
        stats: SpeculativeStats | None = None) -> tuple[list[int], str | None]:
    """Greedy generation through the engine with speculation; the engine's counters are copied to `stats`."""
    eng = spec_engine(model, proposer, k, stop)
    result = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=max_new))[0]
    if stats is not None:
        stats.__dict__.update(eng.speculative_stats.__dict__)
    return result.token_ids, result.finish_reason


class Oracle:
    """Proposes the true continuation with every `corrupt_every`-th draft wrong: exercises partial acceptance."""

    def __init__(self, prompt: list[int], truth: list[int], corrupt_every: int) -> None:
        self.full, self.corrupt_every, self.calls = prompt + truth, corrupt_every, 0

    def propose(self, tokens: list[int], k: int) -> list[int]:
        self.calls += 1
        guess = self.full[len(tokens):len(tokens) + k]
        return [(t + 1) % VOCAB if (self.calls + i) % self.corrupt_every == 0 else t for i, t in enumerate(guess)]


# --- prompt lookup ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,k,max_n,expected", [
    ([1, 2, 3, 9, 1, 2, 3], 3, 3, [9, 1, 2]),      # trigram match, continuation runs into the tail
    ([1, 2, 3, 4, 5, 7, 2, 3], 2, 3, [4, 5]),      # no trigram; bigram "2 3" matched
    ([5, 1, 6, 1, 7, 1], 2, 3, [7, 1]),            # unigram: the latest earlier occurrence wins
    ([1, 2, 3, 4], 3, 3, []),                      # nothing repeats
    ([4], 3, 3, []),                               # too short
    ([1, 2, 1, 2, 1, 2], 4, 2, [1, 2]),            # latest match "1 2" at index 2 is followed by only [1, 2]
])
def test_ngram_lookup(tokens: list[int], k: int, max_n: int, expected: list[int]) -> None:
    assert ngram_lookup(tokens, k, max_n, 1) == expected


def test_ngram_lookup_respects_min_n() -> None:
    assert ngram_lookup([5, 1, 6, 1], 2, max_n=3, min_n=2) == []
    assert ngram_lookup([5, 1, 6, 1], 2, max_n=3, min_n=1) == [6, 1]


def test_config_validation() -> None:
    assert SpeculativeConfig.from_dict({"model": "x"}).method == "draft_model"
    assert SpeculativeConfig.from_dict({}).method == "ngram"
    with pytest.raises(ValueError, match="unknown speculative_config keys"):
        SpeculativeConfig.from_dict({"num_spec_tokens": 3})
    with pytest.raises(ValueError, match="needs 'model'"):
        SpeculativeConfig(method="draft_model")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="prompt_lookup"):
        SpeculativeConfig(prompt_lookup_max=1, prompt_lookup_min=2)
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig(method="medusa")


# --- the verification loop -------------------------------------------------------------------------
PROMPTS = [[3, 14, 15, 92, 65, 35], [7] * 3, list(range(40, 90)), [1, 2, 3, 1, 2, 3, 1, 2]]


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_equals_plain_greedy_with_every_proposer(target, prompt: list[int], k: int) -> None:  # noqa: ANN001
    truth = plain_greedy(target, prompt, 30, frozenset())
    proposers = {"ngram": NgramProposer(3, 1), "self-draft": DraftModelProposer(target),
                 "other-draft": DraftModelProposer(tiny_model(7)), "oracle": Oracle(prompt, truth, 3)}
    for name, proposer in proposers.items():
        stats = SpeculativeStats()
        out, reason = run(target, prompt, 30, frozenset(), proposer, k, stats)
        assert out == truth, name
        # The prefill gives the first token; each speculative pass its accepted drafts plus the target's next.
        assert reason == "length" and stats.emitted == 29
        assert stats.emitted == stats.accepted + stats.target_passes
        if name == "self-draft":  # the draft is the target: everything it proposes is accepted
            assert stats.accepted == stats.drafted > 0


def test_self_draft_needs_few_target_passes(target) -> None:  # noqa: ANN001
    stats = SpeculativeStats()
    run(target, PROMPTS[0], 30, frozenset(), DraftModelProposer(target), 5, stats)
    assert stats.target_passes == 5  # after the prefill's token, ceil(29 / 6) passes of up to 6 tokens each
    assert stats.emitted == 29


def test_stop_token_inside_accepted_drafts(target) -> None:  # noqa: ANN001
    prompt = PROMPTS[2]
    truth = plain_greedy(target, prompt, 30, frozenset())
    stop = frozenset({truth[11]})
    expected = truth[:truth.index(truth[11])]
    out, reason = run(target, prompt, 30, stop, DraftModelProposer(target), 4)
    assert out == expected == plain_greedy(target, prompt, 30, stop) and reason == "stop"


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_max_tokens_cut(target, max_new: int) -> None:  # noqa: ANN001
    out, reason = run(target, PROMPTS[1], max_new, frozenset(), DraftModelProposer(target), 4)
    assert out == plain_greedy(target, PROMPTS[1], max_new, frozenset()) and len(out) == max_new
    assert reason == "length"


def test_speculating_rows_batch_with_other_requests(target) -> None:  # noqa: ANN001
    """Verification runs in the same pass as other rows: sampled and greedy requests beside speculating ones
    give what each gives alone (the sampled one with its seed)."""
    sampled = SamplingParams(temperature=0.8, seed=5, max_tokens=12)
    greedy = SamplingParams(temperature=0, max_tokens=20)
    alone_sampled = LLMEngine(target, ByteTokenizer(), num_blocks=128, block_size=4).generate([PROMPTS[0]], sampled)
    eng = spec_engine(target, NgramProposer(3, 1), 3)
    results = eng.generate([PROMPTS[3], PROMPTS[0], PROMPTS[2]], [greedy, sampled, greedy])
    assert results[0].token_ids == plain_greedy(target, PROMPTS[3], 20, frozenset())
    assert results[1].token_ids == alone_sampled[0].token_ids
    assert results[2].token_ids == plain_greedy(target, PROMPTS[2], 20, frozenset())
    assert eng.speculative_stats.drafted > 0 and eng.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.3), dict(presence_penalty=0.8, frequency_penalty=0.5)])
def test_greedy_with_penalties_speculates_exactly(target, penalties) -> None:  # noqa: ANN001
    """Penalties depend on the tokens before each position, drafts included: verification applies them per
    position, so a penalized greedy request speculates and still equals one-token decoding."""
    params = SamplingParams(temperature=0, max_tokens=24, **penalties)
    plain = LLMEngine(target, ByteTokenizer(), num_blocks=128, block_size=4).generate(PROMPTS, params)
    for proposer in (NgramProposer(2, 1), DraftModelProposer(target)):
        eng = spec_engine(target, proposer, 4)
        assert [r.token_ids for r in eng.generate(PROMPTS, params)] == [r.token_ids for r in plain]
        assert eng.speculative_stats.drafted > 0


def test_engine_refuses_a_draft_method_without_the_draft(target) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="draft model"):
        LLMEngine(target, ByteTokenizer(), num_blocks=16, speculative_config={"model": "somewhere"})


# --- the block kernels: a row's result does not depend on its batch ---------------------------------
@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q5_0", "Q4_K"])  # what quantization "q8" / "q4" makes
def test_block_matmul_rows_independent_of_batch(ggml_type) -> None:  # noqa: ANN001
    from qwen25.kernels import load_ggml_kernels
    from qwen25.kernels.ggml_linear import GGMLLinear
    from qwen25.weights.block_quant import quantize_blocks
    from qwen25.weights.quants import GGMLType

    if load_ggml_kernels() is None:
        pytest.skip("the block kernels did not build here (no AVX2 or no compiler)")
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=True)
    kind = GGMLType[ggml_type]
    layer = GGMLLinear(quantize_blocks(linear.weight.detach(), kind), kind, 256, 96, linear.bias.detach())
    x = torch.randn(23, 256)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(23)])
    for m in (2, 3, 4, 5, 8, 23):
        assert torch.equal(layer(x[:m]), alone[:m]), m


# --- LLM integration ---------------------------------------------------------------------------------
def test_llm_speculative_equals_plain(tiny_hf_dir) -> None:  # noqa: ANN001
    from qwen25 import LLM

    plain = LLM(str(tiny_hf_dir))
    spec = LLM(str(tiny_hf_dir), speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    draft = LLM(str(tiny_hf_dir), speculative_config={"model": str(tiny_hf_dir), "num_speculative_tokens": 2})
    prompts = ["def add(a, b):\n    return a + b\n\ndef add(a, b):", "hello hello hello"]
    for params in (SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=12, stop=["e"])):
        expected = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
                    for o in plain.generate(prompts, params)]
        for llm in (spec, draft):
            got = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
                   for o in llm.generate(prompts, params)]
            assert got == expected
            assert llm.speculative_stats is not None and llm.speculative_stats.emitted > 0
        streamed = "".join(d.text for d in spec.stream(prompts[:1], params))
        assert streamed == expected[0][1]
    assert draft.speculative_stats.accepted == draft.speculative_stats.drafted  # the draft is the target
    # Sampling is not speculative: it runs on the same engine without drafts, and the counters stay.
    before = dict(vars(spec.speculative_stats))
    spec.generate(prompts, SamplingParams(temperature=0.8, seed=1, max_tokens=5))
    assert vars(spec.speculative_stats) == before


# --- the real models ---------------------------------------------------------------------------------
CODE = '''def merge_sorted(a, b):
    result = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            result.append(a[i])
            i += 1
        else:
            result.append(b[j])
            j += 1
    result.extend(a[i:])
    result.extend(b[j:])
    return result
'''
REAL_PROMPTS = [
    [{"role": "user", "content": "Add type hints and a docstring to this function:\n\n" + CODE}],
    [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
    [{"role": "user", "content": "Rename the variable result to merged in this code:\n\n" + CODE}],
]


@pytest.mark.slow
@pytest.mark.real_model
def test_real_model_ngram_and_draft_equal_plain(real_gguf) -> None:  # noqa: ANN001
    from qwen25 import LLM

    params = SamplingParams(temperature=0, max_tokens=96)
    plain = LLM(str(real_gguf))
    expected = [o.outputs[0].token_ids for o in plain.chat(REAL_PROMPTS, params)]
    ngram = LLM(str(real_gguf), speculative_config={"method": "ngram", "num_speculative_tokens": 5})
    assert [o.outputs[0].token_ids for o in ngram.chat(REAL_PROMPTS, params)] == expected
    assert ngram.speculative_stats.accepted > 0


@pytest.mark.slow
@pytest.mark.real_model
def test_real_draft_0_5b_for_1_5b_equals_plain(real_gguf) -> None:  # noqa: ANN001
    from qwen25 import LLM
    from qwen25.weights.registry import KNOWN_MODELS, fetch_known_model

    big = fetch_known_model(KNOWN_MODELS["qwen2.5-coder-1.5b-instruct"], progress=False)
    params = SamplingParams(temperature=0, max_tokens=64)
    llm = LLM(str(big), speculative_config={"model": str(real_gguf), "num_speculative_tokens": 4})
    got = [o.outputs[0].token_ids for o in llm.chat(REAL_PROMPTS[:2], params)]
    stats = llm.speculative_stats
    llm.speculative = None  # the same target, plain greedy on the engine
    assert got == [o.outputs[0].token_ids for o in llm.chat(REAL_PROMPTS[:2], params)]
    assert stats.accepted > 0 and stats.tokens_per_pass > 1.5
