"""Passkey retrieval (`qwen25.eval.passkey`): prompts of exactly the asked length with the key where asked, the
first-number scoring, the engine's plumbing at a length past the native window with YaRN + DCA (a tiny random
model: its answer is meaningless, so the test asserts the engine's tokens equal a full-forward greedy loop), and
the real 0.5B's retrieval inside its window (slow)."""

from __future__ import annotations

import pytest
import torch

from qwen25.eval.passkey import DEPTHS, KEY_LINE, first_number, is_found, passkey_keys, passkey_prompt
from qwen25.sampling_params import SamplingParams


class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode()


@pytest.mark.parametrize("length", [300, 301, 1000])
@pytest.mark.parametrize("depth", DEPTHS)
def test_prompt_has_the_length_and_the_key_at_its_depth(length, depth):
    tok = ByteTokenizer()
    prompt = passkey_prompt(tok, length, depth, "12345")
    assert len(prompt.ids) == length
    text = tok.decode(prompt.ids)
    line = KEY_LINE.format(key="12345")
    assert text.count("12345") == 2 and text.count(line) == 1
    assert text.index(line) == prompt.key_token  # bytes: token index = character index
    assert text.endswith("What is the pass key? The pass key is")
    body = length - len(tok.encode(text[:text.index("\n\n") + 2])) - len(line) - len("\nWhat is the pass key? The "
                                                                                      "pass key is")
    filler_before = prompt.key_token - text.index("\n\n") - 2
    assert abs(filler_before - depth * body) <= 100  # within one filler sentence group of the asked depth


def test_bad_arguments_are_refused():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="depth must be in"):
        passkey_prompt(tok, 500, 1.5, "12345")
    with pytest.raises(ValueError, match="5 digits"):
        passkey_prompt(tok, 500, 0.5, "1234")
    with pytest.raises(ValueError, match="needs at least .* tokens, got length=100"):
        passkey_prompt(tok, 100, 0.5, "12345")


def test_scoring_takes_the_first_number():
    assert first_number(" 48213. Keep it") == "48213" and is_found(" 48213.", "48213")
    assert not is_found(" 4821 3", "48213") and not is_found(" unknown", "48213")
    assert not is_found(" 11111, not 48213", "48213")
    keys = passkey_keys(20, seed=3)
    assert keys == passkey_keys(20, seed=3) and all(len(k) == 5 and k.isdigit() for k in keys)


@pytest.mark.real_model
def test_engine_answers_at_length_past_the_window_with_yarn_and_dca(tiny_hf_dir):
    """A 300-token passkey prompt for a 96-token model with YaRN x4 + DCA (chunk = the native window): the
    engine's chunked prefill + paged decode gives the tokens of a greedy loop of cache-less full forwards."""
    from qwen25.llm import LLM

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 96}
    llm = LLM(str(tiny_hf_dir), rope_scaling=rope, dual_chunk_attention_config="on",
              engine_kwargs={"max_num_batched_tokens": 64})
    prompts = [passkey_prompt(llm.tokenizer, 300, depth, key) for depth, key in zip((0.25, 0.75), passkey_keys(2))]
    assert [len(p.ids) for p in prompts] == [300, 300]
    outs = llm.generate([p.ids for p in prompts], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ref = list(prompt.ids)
        with torch.no_grad():
            for _ in range(4):
                ref.append(int(llm.model(torch.tensor([ref]))[0, -1].argmax()))
        assert out.outputs[0].token_ids == ref[300:]


@pytest.mark.slow
@pytest.mark.real_model
def test_real_model_finds_the_key_inside_its_window(real_gguf):
    """Qwen2.5-Coder-0.5B-Instruct (q8, plain attention, 32K native window) at 1K tokens (5 depths) and 4K (3).
    Scaled down from the issue's 4K..32K for this CPU's test budget (a 4K prefill took 25-74 s on the shared 2
    cores); benchmarks/bench_long.py runs the long lengths. Measured: found at 1K and 4K at all 5 depths."""
    from qwen25.llm import LLM

    llm = LLM(str(real_gguf))
    cases = [(1024, depth) for depth in DEPTHS] + [(4096, depth) for depth in (0.0, 0.5, 1.0)]
    prompts = [passkey_prompt(llm.tokenizer, n, d, k) for (n, d), k in zip(cases, passkey_keys(len(cases)))]
    found = []
    for prompt in prompts:
        out = llm.generate([prompt.ids], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
        found.append(is_found(out, prompt.key))
    assert sum(found) >= len(found) - 1, list(zip(cases, found))


@pytest.mark.real_model
def test_eval_passkey_writes_a_record_per_length_and_depth(tiny_hf_dir, tmp_path, capsys):
    import json

    from qwen25.cli import main

    out = tmp_path / "pk.jsonl"
    rc = main(["eval", "passkey", "-m", str(tiny_hf_dir), "--lengths", "80,86", "--depths", "0,1", "-o", str(out),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()][1:]  # after the meta record
    assert sorted((r["length"], r["depth"]) for r in records) == [(80, 0.0), (80, 1.0), (86, 0.0), (86, 1.0)]
    assert all(len(r["key"]) == 5 and r["found"] == (r["number"] == r["key"]) for r in records)
    summary = json.loads((tmp_path / "pk.jsonl.summary.json").read_text())
    assert set(summary["by_length"]) == {"80", "86"} and "80 tokens" in capsys.readouterr().out
    rc = main(["eval", "passkey", "-m", str(tiny_hf_dir), "--lengths", "80,x", "-o", str(out)])
    assert rc != 0 and "--lengths takes integers" in capsys.readouterr().err
