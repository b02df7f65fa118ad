"""The evaluation backends on the real 0.5B GGUF: qwen25 against llama.cpp (slow; llama.cpp tests skip without
llama-cpp-python), and batched greedy generation against one-at-a-time."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


@pytest.fixture(scope="module")
def qwen25_backend(real_gguf):
    from qwen25.eval.backends import Qwen25Backend

    return Qwen25Backend(str(real_gguf))


def _llamacpp(real_gguf, **kwargs):
    pytest.importorskip("llama_cpp")
    from qwen25.eval.backends import LlamaCppBackend

    return LlamaCppBackend(str(real_gguf), **kwargs)


def test_batched_greedy_equals_single(qwen25_backend):
    from qwen25.eval.data import load_humaneval
    from qwen25.eval.humaneval import INSTRUCT_STOP, HumanEvalTask

    task = HumanEvalTask("instruct")
    tok = qwen25_backend.tokenizer
    ids = [tok.encode(task.prompt_text(p, qwen25_backend.chat_template)) for p in load_humaneval()[:3]]
    stop_ids = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    batched = qwen25_backend.generate(ids, 40, INSTRUCT_STOP, stop_ids)
    single = [qwen25_backend.generate([i], 40, INSTRUCT_STOP, stop_ids)[0] for i in ids]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]


def test_perplexity_matches_llamacpp_within_one_percent(real_gguf, qwen25_backend):
    from qwen25.eval.data import load_text
    from qwen25.eval.perplexity import windows

    llama = _llamacpp(real_gguf, n_ctx=256, logits_all=True)
    text, _ = load_text(None, 4000)
    tokens = qwen25_backend.tokenizer.encode(text)
    totals = {"qwen25": 0.0, "llamacpp": 0.0}
    count = 0
    for begin, end, n in windows(len(tokens), 256, 128):
        totals["qwen25"] += qwen25_backend.nll(tokens[begin:end], n)
        totals["llamacpp"] += llama.nll(tokens[begin:end], n)
        count += n
    import math

    ppl = {k: math.exp(v / count) for k, v in totals.items()}
    assert abs(ppl["qwen25"] / ppl["llamacpp"] - 1) < 0.01, ppl


def test_mmlu_letter_logits_match_llamacpp(real_gguf, qwen25_backend):
    from qwen25.eval.mmlu import MMLUTask, build_prompt, letter_token_ids

    llama = _llamacpp(real_gguf, n_ctx=4096)
    letters = letter_token_ids(qwen25_backend.tokenizer)
    samples = MMLUTask(shots=0, limit=1).samples()[:6]
    for s in samples:
        ids = qwen25_backend.tokenizer.encode(build_prompt(s["row"], s["shots"]))
        ours = qwen25_backend.next_token_logits(ids)[letters]
        theirs = llama.next_token_logits(ids)[letters]
        assert int(ours.argmax()) == int(theirs.argmax())
        assert float((ours - theirs).abs().max()) < 0.5


def test_llamacpp_greedy_generation_honours_stops(real_gguf):
    llama = _llamacpp(real_gguf, n_ctx=1024)
    tok = llama.tokenizer
    ids = tok.encode("<|im_start|>user\nCount from 1 to 20, one number per line.<|im_end|>\n<|im_start|>assistant\n")
    [gen] = llama.generate([ids], 60, ["\n5"], [tok.token_to_id("<|im_end|>")])
    assert gen.finish_reason == "stop" and "5" not in gen.text.split("\n")[-1:] and "4" in gen.text
