"""LLMEngine with a model: greedy outputs equal the prompt run alone (the lock-step `BatchGenerator` on the
PyTorch path; an engine with that one request for native models), whatever the batching (continuous, chunked
prefill, prefix-cache hits, preemption); abort, seeds, stops, logprobs.

Most tests use a tiny random Qwen2 (vocabulary 512) and a printable byte tokenizer, so they run in seconds; two
check the real Qwen2.5-Coder-0.5B GGUF."""

from __future__ import annotations

import pytest
import torch

from qwen25.config import ModelConfig
from qwen25.engine.block_manager import BlockManager
from qwen25.engine.engine import LLMEngine, StepOutput
from qwen25.engine.kv_cache import ContiguousKVCache
from qwen25.engine.runner import ModelRunner, split_by_length
from qwen25.engine.sequence import Sequence
from qwen25.kernels.native import NativeForward
from qwen25.engine.errors import ContextLengthError
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.sampling_params import SamplingParams

from batch_generator import BatchGenerator, Sequence as GenSequence
from tiny_models import unit_scale_

GREEDY = SamplingParams(temperature=0, max_tokens=12)


class PrintableTokenizer:
    """Token i decodes to one printable ASCII character (what StreamDecoder needs from a tokenizer)."""

    special_ids: frozenset[int] = frozenset()

    def token_bytes(self, token_id: int) -> bytes:
        return chr(32 + token_id % 95).encode()

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(32 + t % 95) for t in ids)


@pytest.fixture(scope="module", params=["fp32", "q8-native"])
def model(request) -> Qwen2ForCausalLM:  # noqa: ANN001
    """The tiny model on the PyTorch path, and quantized to q8 (Q8_0 blocks), where every pass runs the fused
    native forward."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = unit_scale_(Qwen2ForCausalLM(config).eval())
    if request.param == "q8-native":
        from qwen25.weights.quantized import quantize_loaded_model

        model = quantize_loaded_model(model)
        if native_of(model) is None:
            pytest.skip("the native forward kernel did not build here")
    return model


_natives: dict[int, NativeForward | None] = {}


def native_of(model) -> NativeForward | None:  # noqa: ANN001
    """The native forward the engine's runner builds for this model (None: the PyTorch path runs)."""
    if id(model) not in _natives:
        _natives[id(model)] = NativeForward.for_model(model)
    return _natives[id(model)]


def random_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


PROMPTS = random_prompts([5, 40, 17, 70, 33, 1])


def alone(model, prompt: list[int], params: SamplingParams = GREEDY, stop: frozenset[int] = frozenset()) -> list[int]:
    """The output of the prompt run by itself: through BatchGenerator on the PyTorch path, or, for a model with
    the native forward (whose matmul inputs are quantized to 129 levels per group, so its greedy path may part
    from the PyTorch one), through an engine serving only this request."""
    if native_of(model) is not None:
        return engine(model, stop_token_ids=sorted(stop)).generate([prompt], params)[0].token_ids
    seq = GenSequence(prompt, params, stop, params.max_tokens)
    list(BatchGenerator(model, [seq]))
    return seq.output_ids


def engine(model, **kwargs) -> LLMEngine:
    kwargs.setdefault("num_blocks", 256)
    return LLMEngine(model, PrintableTokenizer(), **kwargs)


def drain(eng: LLMEngine, results: dict[str, list[StepOutput]] | None = None) -> dict[str, list[StepOutput]]:
    results = {} if results is None else results
    while eng.has_unfinished_requests():
        for out in eng.step():
            results.setdefault(out.request_id, []).append(out)
    return results


def assert_all_freed(eng: LLMEngine) -> None:
    stats = eng.stats()
    assert stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == 0
    assert all(b.ref_count == 0 for b in eng.block_manager.blocks)
    assert not eng._samples and not eng._request_seqs and not eng._forks and not eng.runner._generators


@pytest.fixture(scope="module")
def references(model) -> list[list[int]]:
    return [alone(model, p) for p in PROMPTS]


# --- greedy equivalence ------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["batched", "chunked", "preempted", "no_prefix_cache"])
def test_greedy_equals_batch_generator_alone(model, references, setting):
    kwargs = {"batched": {},
              "chunked": dict(max_num_batched_tokens=16, max_num_seqs=4),
              "preempted": dict(num_blocks=30, block_size=4, max_num_batched_tokens=32, max_num_seqs=6),
              "no_prefix_cache": dict(num_blocks=30, block_size=4, enable_prefix_caching=False)}[setting]
    eng = engine(model, **kwargs)
    eng.runner.cache.keys.fill_(float("nan"))  # never-written slots must never be read, even masked
    eng.runner.cache.values.fill_(float("nan"))
    results = eng.generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in results] == references
    assert all(r.finish_reason == "length" for r in results)
    assert [r.text for r in results] == [PrintableTokenizer().decode(t) for t in references]
    if setting in ("preempted", "no_prefix_cache"):
        assert eng.stats()["num_preemptions"] > 0
    assert_all_freed(eng)


def test_prefix_cache_hits_give_the_same_outputs(model):
    system = random_prompts([48], seed=5)[0]  # 3 full 16-token blocks
    prompts = [system + tail for tail in random_prompts([3, 9, 20], seed=6)]
    eng = engine(model)
    first = eng.generate(prompts[:1], GREEDY)
    assert eng.stats()["prefix_cache_hit_tokens"] == 0
    rest = eng.generate(prompts[1:], GREEDY)
    assert eng.stats()["prefix_cache_hit_tokens"] == 2 * 48
    assert [r.token_ids for r in first + rest] == [alone(model, p) for p in prompts]
    # A follow-up turn (prompt + its reply + more) reuses the blocks computed during decoding, too.
    follow = prompts[0] + first[0].token_ids + [1, 2, 3]
    before = eng.stats()["prefix_cache_hit_tokens"]
    assert eng.generate([follow], GREEDY)[0].token_ids == alone(model, follow)
    assert eng.stats()["prefix_cache_hit_tokens"] - before == (len(prompts[0]) + 12) // 16 * 16


def test_requests_added_mid_flight(model, references):
    eng = engine(model, max_num_seqs=4, max_num_batched_tokens=24)
    results: dict[str, list[StepOutput]] = {}
    pending = list(enumerate(PROMPTS))
    while pending or eng.has_unfinished_requests():
        if pending:
            i, prompt = pending.pop(0)
            eng.add_request(f"r{i}", prompt, GREEDY)
        for _ in range(2):
            for out in eng.step():
                results.setdefault(out.request_id, []).append(out)
    got = [[t for o in results[f"r{i}"] for t in o.new_token_ids] for i in range(len(PROMPTS))]
    assert got == references
    assert_all_freed(eng)


def test_paged_cache_chunks_match_a_full_forward(model):
    """Cache consistency: chunked prefill + decodes through the paged cache, ragged rows in one batch."""
    runner = ModelRunner(model, num_blocks=32, block_size=4)
    bm = BlockManager(32, 4)
    a, b = (Sequence(r, p, GREEDY) for r, p in zip("ab", random_prompts([23, 9], seed=3)))
    bm.allocate(a)
    bm.allocate(b)

    def full(ids: list[int]) -> torch.Tensor:  # all positions in one pass (natively: on a contiguous cache)
        native = native_of(model)
        if native is None:
            return model(torch.tensor([ids]))[0]
        cache = ContiguousKVCache(model.config, 1, len(ids))
        return native.forward_cache(torch.tensor([ids]), cache, cache.native_view(), len(ids))[0]

    with torch.no_grad():
        full_a, full_b = full(a.token_ids), full(b.token_ids)
        for counts in ([10, 4], [7, 5], [6, 0]):
            rows = [(s, n) for s, n in zip((a, b), counts) if n]
            logits = runner.forward([s for s, _ in rows], [n for _, n in rows], [1] * len(rows),
                                    runner.native_for_pass())
            for (s, n), got in zip(rows, (row[-1] for row in logits)):
                end = s.num_computed_tokens + n
                want = (full_a if s is a else full_b)[end - 1]
                if native_of(model) is None:
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
                else:  # rows do not depend on the chunking, the other rows or the cache layout
                    assert torch.equal(got, want)
                s.num_computed_tokens = end


def test_split_by_length_keeps_decodes_apart_from_long_chunks():
    assert split_by_length([1, 1, 1, 1], pass_cost=16) == [[0, 1, 2, 3]]
    assert sorted(map(sorted, split_by_length([1, 500, 1, 1], pass_cost=16))) == [[0, 2, 3], [1]]
    assert split_by_length([30, 32], pass_cost=16) == [[0, 1]]


# --- lifecycle -----------------------------------------------------------------------------------------
def test_abort_mid_generation_frees_everything(model, references):
    eng = engine(model, max_num_seqs=2)
    for i in range(3):
        eng.add_request(f"r{i}", PROMPTS[i], GREEDY)
    results: dict[str, list[StepOutput]] = {}
    for _ in range(3):
        for out in eng.step():
            results.setdefault(out.request_id, []).append(out)
    assert eng.stats()["num_waiting"] == 1
    eng.abort_request("r1")  # running
    eng.abort_request("r2")  # waiting
    eng.abort_request("nope")  # unknown ids are ignored
    final = eng.step()
    for out in final:
        results.setdefault(out.request_id, []).append(out)
    aborted = {o.request_id: o for o in final if o.finish_reason == "abort"}
    assert set(aborted) == {"r1", "r2"} and aborted["r1"].num_output_tokens == 3
    drain(eng, results)
    assert [t for o in results["r0"] for t in o.new_token_ids] == references[0]
    assert [o.finish_reason for o in results["r1"]] == [None] * 3 + ["abort"]
    assert_all_freed(eng)


def test_seeded_sampling_reproducible_whatever_the_batch(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    prompt = PROMPTS[2]
    solo = engine(model).generate([prompt], params)[0].token_ids
    crowd = engine(model, max_num_batched_tokens=16).generate(PROMPTS, [params] * len(PROMPTS))[2].token_ids
    assert solo == crowd == alone(model, prompt, params)
    other = engine(model).generate([prompt], SamplingParams(temperature=1.0, top_p=0.9, seed=8, max_tokens=12))
    assert other[0].token_ids != solo


def test_stop_tokens_stop_strings_and_lengths(model, references):
    ref, prompt = references[1], PROMPTS[1]
    eng = engine(model, stop_token_ids=[ref[4]])
    out = eng.generate([prompt], GREEDY)[0]
    assert out.token_ids == ref[: ref.index(ref[4])] and out.finish_reason == "stop"
    out = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert out.token_ids == ref and out.finish_reason == "length"
    out = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ref[6]]))[0]
    assert out.token_ids == ref[: ref.index(ref[6])]

    text = PrintableTokenizer().decode(ref)
    stop = text[5:7]
    for include in (False, True):
        out = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True,
                                                    include_stop_str_in_output=include))[0]
        cut = text.index(stop) + (len(stop) if include else 0)
        assert out.finish_reason == "stop" and out.text == text[:cut]
        assert out.token_ids == ref[: text.index(stop) + 2]  # the tokens up to the one completing the stop string

    eng = engine(model, max_model_len=len(prompt) + 5)
    out = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=None))[0]
    assert out.token_ids == ref[:5] and out.finish_reason == "length"
    assert_all_freed(eng)


def test_step_outputs_counts_logprobs_and_text(model, references):
    eng = engine(model)
    eng.add_request("x", PROMPTS[3], SamplingParams(temperature=0, max_tokens=12, logprobs=3))
    outs = drain(eng)["x"]
    assert [o.num_output_tokens for o in outs] == list(range(1, 13))
    assert all(o.num_prompt_tokens == len(PROMPTS[3]) for o in outs)
    assert [o.new_token_ids[0] for o in outs] == references[3]
    assert "".join(o.new_text for o in outs) == PrintableTokenizer().decode(references[3])
    for o in outs:
        (chosen, top), = o.logprobs
        assert len(top) == 3 and top[0][0] == o.new_token_ids[0] and chosen == pytest.approx(top[0][1])
    assert [o.finish_reason for o in outs] == [None] * 11 + ["length"]


def test_bad_requests(model):
    eng = engine(model, num_blocks=8, block_size=4)  # the cache (32 tokens) is smaller than the context (256)
    eng.add_request("a", [1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="already running"):
        eng.add_request("a", [1, 2, 3], GREEDY)
    with pytest.raises(ContextLengthError, match="KV cache holds 32 tokens"):
        eng.add_request("b", list(range(40)), GREEDY)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add_request("c", [], GREEDY)
    with pytest.raises(ContextLengthError, match="context window is 256"):
        engine(model).add_request("d", list(range(300)), GREEDY)
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine(model, max_num_seqs=8, max_num_batched_tokens=4)
    drain(eng)
    eng.add_request("a", [1, 2, 3], GREEDY)  # finished ids can be reused


# --- the real model -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_llm(real_gguf):
    from qwen25 import LLM

    return LLM(str(real_gguf), dtype="float32")


@pytest.mark.real_model
def test_real_model_chunked_prefix_cached_greedy_equals_alone(real_llm):
    system = [{"role": "system", "content": "You are a terse senior Python reviewer. Answer in one sentence."}]
    questions = ["What does `yield from` do?", "Why prefer `pathlib` over `os.path`?", "What is a dataclass?"]
    prompts = [real_llm.tokenizer.encode(real_llm.apply_chat_template(system + [{"role": "user", "content": q}]))
               for q in questions]
    params = SamplingParams(temperature=0, max_tokens=12)
    stops = frozenset(real_llm.stop_token_ids())
    want = [alone(real_llm.model, p, params, stops) for p in prompts]
    eng = LLMEngine.from_checkpoint(real_llm.checkpoint, max_num_batched_tokens=24, num_blocks=64)
    first = eng.generate(prompts[:1], params)
    rest = eng.generate(prompts[1:], params)
    assert [r.token_ids for r in first + rest] == want
    assert eng.stats()["prefix_cache_hit_tokens"] >= 2 * 16
    assert [r.text for r in first + rest] == [real_llm.tokenizer.decode(w, skip_special_tokens=True) for w in want]


@pytest.mark.real_model
def test_real_model_stream_text_is_utf8_safe(real_llm):
    prompt = real_llm.tokenizer.encode(real_llm.apply_chat_template(
        [{"role": "user", "content": "Reply with three emoji and the Japanese word for sea."}]))
    eng = LLMEngine.from_checkpoint(real_llm.checkpoint, num_blocks=32)
    eng.add_request("e", prompt, SamplingParams(temperature=0, max_tokens=16))
    outs = drain(eng)["e"]
    tokens = [t for o in outs for t in o.new_token_ids]
    assert all("\ufffd" not in o.new_text for o in outs)
    assert "".join(o.new_text for o in outs) == real_llm.tokenizer.decode(tokens, skip_special_tokens=True)


# --- LLM on the engine ------------------------------------------------------------------------------------
def test_llm_generate_and_stream_run_on_the_engine(tiny_hf_dir):
    from qwen25 import LLM

    llm = LLM(str(tiny_hf_dir))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["hello there", "a b c d e f"]
    want = [alone(llm.model, llm.tokenizer.encode(p), params) for p in prompts]
    outputs = [o.outputs[0] for o in llm.generate(prompts, params)]
    assert [o.token_ids for o in outputs] == want
    # Two live streams interleaved: each gets exactly its own deltas.
    texts = ["", ""]
    streams = {s: llm.stream(p, params) for s, p in enumerate(prompts)}
    while streams:
        for s, stream in list(streams.items()):
            delta = next(stream, None)
            if delta is None:
                del streams[s]
            else:
                texts[s] += delta.text
    assert texts == [o.text for o in outputs]
    # Abandoning a stream aborts its request and frees its blocks.
    stream = llm.stream("hello there", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    llm.engine.step()
    assert not llm.engine.has_unfinished_requests() and llm.engine.stats()["kv_blocks_used"] == 0


# --- n samples of one prompt --------------------------------------------------------------------------
@pytest.mark.parametrize("prompt_len", [37, 32])  # a partial last block (copied per sample), and none
def test_n_samples_share_one_prefill(model, prompt_len: int):
    """n=8 computes the prompt once: the engine's computed-token count is the prompt plus one token per decode
    step of each sample, and each sample equals the same seed run as its own request (n=1)."""
    prompt = random_prompts([prompt_len], seed=9)[0]
    params = SamplingParams(temperature=0.9, seed=11, max_tokens=6, n=8)
    eng = engine(model, block_size=16)
    results = eng.generate([prompt], params)
    assert [r.index for r in results] == list(range(8))
    decode_tokens = sum(len(r.token_ids) - 1 for r in results)  # the first token of each comes from the prefill
    assert eng.num_computed_tokens == prompt_len + decode_tokens
    for k, result in enumerate(results):
        single = engine(model, block_size=16).generate(
            [prompt], SamplingParams(temperature=0.9, seed=11 + k, max_tokens=6))[0]
        assert result.token_ids == single.token_ids, k
    assert len({tuple(r.token_ids) for r in results}) > 1  # the samples differ
    assert_all_freed(eng)


def test_n_samples_without_room_to_fork_queue_as_their_own_requests(model):
    """max_num_seqs=2: the other samples cannot start beside the first; they wait and run later (prefix-cache
    hits on the prompt's full blocks), with the same outputs."""
    prompt = random_prompts([37], seed=9)[0]
    params = SamplingParams(temperature=0.9, seed=11, max_tokens=4, n=4)
    wide = engine(model, block_size=16).generate([prompt], params)
    narrow = engine(model, block_size=16, max_num_seqs=2)
    assert [r.token_ids for r in narrow.generate([prompt], params)] == [r.token_ids for r in wide]
    assert_all_freed(narrow)


def test_abort_reaches_every_sample(model):
    eng = engine(model, block_size=16)
    eng.add_request("r", PROMPTS[1], SamplingParams(temperature=0.9, seed=1, max_tokens=50, n=4))
    eng.step()
    eng.step()
    eng.abort_request("r")
    finals = [o for o in eng.step() if o.finish_reason == "abort"]
    assert sorted(o.index for o in finals) == [0, 1, 2, 3]
    assert_all_freed(eng)


# --- weights pushed into a live engine (rollouts of a model being trained) ---------------------------
def test_update_weights_equals_an_engine_built_on_the_new_weights():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    policy = unit_scale_(Qwen2ForCausalLM(config).eval())
    updated = unit_scale_(Qwen2ForCausalLM(config).eval())  # other random weights: "after a training step"
    eng = engine(policy, block_size=4)
    prompt = PROMPTS[3]
    before = eng.generate([prompt], GREEDY)[0].token_ids
    hits = eng.stats()["prefix_cache_hit_tokens"]
    eng.update_weights(updated.named_parameters())
    after = eng.generate([prompt], GREEDY)[0].token_ids
    assert eng.stats()["prefix_cache_hit_tokens"] == hits  # the stale prompt blocks were not reused
    assert after == engine(updated, block_size=4).generate([prompt], GREEDY)[0].token_ids
    assert after != before
    assert_all_freed(eng)


def test_update_weights_refuses_while_running_and_bad_names(model):
    eng = engine(model)
    eng.add_request("r", PROMPTS[0], GREEDY)
    with pytest.raises(RuntimeError, match="running"):
        eng.update_weights([])
    eng.abort_request("r")
    eng.step()
    with pytest.raises(KeyError, match="no parameter"):
        eng.update_weights([("model.nope.weight", torch.zeros(1))])
