"""The real Qwen2.5-Coder-0.5B-Instruct GGUF: qwen25 against transformers on the same (dequantized, fp32) weights.

transformers is the reference: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` dequantizes with the
`gguf` package; qwen25 uses its own GGUF parser and dequantizers. Prompt ids come from qwen25's tokenizer and
template for both sides (those are checked against transformers in their own test files).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qwen25 import LLM, SamplingParams  # noqa: E402

pytestmark = pytest.mark.real_model

CHAT_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "What is the difference between a list and a tuple in Python?",
    "Write an SQL query that returns the top 5 customers by total order amount.",
    "Explain what a race condition is in one paragraph.",
    "Give a bash one-liner that counts the lines of all .py files in a directory tree.",
]

LONG_PROMPTS = [
    "def quicksort(arr):\n    \"\"\"Sort a list of integers with the quicksort algorithm and return a new list.\n\n"
    "    The pivot is the middle element; elements equal to the pivot are grouped together so that lists\n"
    "    with many duplicates do not degrade to quadratic time.\n\n    >>> quicksort([3, 1, 2, 3, 0])\n"
    "    [0, 1, 2, 3, 3]\n    \"\"\"\n    if len(arr) <= 1:\n        return list(arr)\n",
    "The Qwen2.5 models are dense decoder-only transformers. They use grouped-query attention, SwiGLU feed-forward "
    "layers, RMSNorm before each block and rotary position embeddings with a base frequency of one million. "
    "Explain, step by step, why grouped-query attention reduces the memory needed for the key-value cache.",
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nTranslate to French, German and Japanese: 'The quick brown fox jumps over the lazy dog "
    "near the river bank, while 3 children count 1234567 stars.'<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def ours(real_gguf):
    return LLM(str(real_gguf), dtype="float32", quantization="none")


@pytest.fixture(scope="module")
def reference(real_gguf):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        real_gguf.parent, gguf_file=real_gguf.name, dtype=torch.float32)
    return model.eval()


def test_logits_match_transformers(ours, reference):
    for text in LONG_PROMPTS:
        ids = torch.tensor([ours.tokenizer.encode(text)])
        assert ids.shape[1] >= 64, "the acceptance bar asks for prompts of >= 64 tokens"
        with torch.no_grad():
            ref = reference(ids).logits.float()
            got = ours.model(ids)
        diff = (got - ref).abs().max().item()
        assert diff < 1e-3, f"max |logit diff| {diff:.2e}"
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_greedy_chat_matches_transformers(ours, reference):
    params = SamplingParams(temperature=0, max_tokens=64)
    for prompt in CHAT_PROMPTS:
        text = ours.apply_chat_template([{"role": "user", "content": prompt}])
        ids = ours.tokenizer.encode(text)
        with torch.no_grad():
            ref = reference.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                     eos_token_id=[151645, 151643], pad_token_id=151643)[0, len(ids):].tolist()
        ref = [t for t in ref if t not in (151645, 151643)]
        got = ours.generate([ids], params)[0].outputs[0].token_ids
        assert got == ref, f"prompt {prompt!r}:\nours: {ours.tokenizer.decode(got)!r}\nref:  {ours.tokenizer.decode(ref)!r}"


def test_batched_ragged_greedy_equals_each_alone(ours):
    params = SamplingParams(temperature=0, max_tokens=24)
    prompts = [ours.apply_chat_template([{"role": "user", "content": p}]) for p in CHAT_PROMPTS[:3]]
    batched = [o.outputs[0].token_ids for o in ours.generate(prompts, params)]
    alone = [ours.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone


def test_prime_answer_contains_def(ours):
    out = ours.chat([{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
                    SamplingParams(temperature=0, max_tokens=96))[0].outputs[0]
    assert "def " in out.text


def test_streaming_equals_non_streaming_and_stop_strings(ours):
    messages = [{"role": "user", "content": "Write a haiku about the sea, in Japanese, with emoji."}]
    params = SamplingParams(temperature=0, max_tokens=40)
    full = ours.chat(messages, params)[0].outputs[0].text
    deltas = [d.text for d in ours.chat_stream(messages, params)]
    assert "".join(deltas) == full
    assert all("\ufffd" not in d for d in deltas)
    cut = full[len(full) // 2:][:3]
    stopped = ours.chat(messages, SamplingParams(temperature=0, max_tokens=40, stop=[cut]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.text == full[: full.index(cut)]


def test_seeded_sampling_reproduces_and_n_samples_differ(ours):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=7, n=2)
    first = ours.generate("def hello():", params)[0].outputs
    again = ours.generate("def hello():", params)[0].outputs
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert first[0].token_ids != first[1].token_ids
