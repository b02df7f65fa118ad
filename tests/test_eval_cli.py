"""`qwen25 eval`: argument parsing, an end-to-end run on a scripted backend, resume, errors, compare."""

from __future__ import annotations

import json

import pytest

from qwen25.cli import main
from test_eval_fakes import ScriptedBackend


@pytest.fixture()
def scripted(monkeypatch):
    """Make every backend a scripted one that answers HumanEval prompts with the canonical solution."""
    from qwen25.eval import backends
    from qwen25.eval.data import load_humaneval

    problems = {p["prompt"].strip(): p for p in load_humaneval()}
    made = []

    def reply(prompt: str) -> str:
        for key, p in problems.items():
            if key in prompt:
                return p["prompt"] + p["canonical_solution"]
        raise AssertionError(prompt)

    def fake_make_backend(name, model, **kwargs):  # noqa: ANN001, ANN003
        backend = ScriptedBackend(reply)
        backend.name, backend.kwargs = name, kwargs
        made.append(backend)
        return backend

    monkeypatch.setattr(backends, "make_backend", fake_make_backend)
    return made


def test_eval_humaneval_end_to_end_and_resume(tmp_path, scripted, capsys):
    out = tmp_path / "he.jsonl"
    assert main(["eval", "humaneval", "--limit", "3", "--output", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "pass@1" in table and "100.0%  (3/3)" in table
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["_meta"]["task"] == "humaneval-instruct" and len(lines) == 4
    assert {"prompt", "completion", "solution", "passed", "gen_seconds", "exec_seconds"} <= set(lines[1])
    summary = json.loads((tmp_path / "he.jsonl.summary.json").read_text())
    assert summary["pass@1"] == 1.0 and summary["n"] == 3

    # the same output again without --resume: a one-line error, nothing overwritten
    assert main(["eval", "humaneval", "--limit", "3", "--output", str(out), "--no-progress"]) == 1
    assert "--resume" in capsys.readouterr().err
    # extend to 5 with --resume: only 2 new samples are generated
    assert main(["eval", "humaneval", "--limit", "5", "--output", str(out), "--resume", "--no-progress"]) == 0
    assert scripted[-1].calls == 2
    assert len(out.read_text().splitlines()) == 6
    # other settings on resume are refused
    assert main(["eval", "humaneval", "--protocol", "base", "--output", str(out), "--resume", "--no-progress"]) == 1
    assert "different settings" in capsys.readouterr().err


def test_compare_two_runs(tmp_path, scripted, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, backend in ((a, "qwen25"), (b, "llamacpp")):
        assert main(["eval", "humaneval", "--limit", "2", "--backend", backend, "--output", str(path),
                     "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "identical completions  100.0%  (2/2)" in out and "same pass/fail" in out
    assert "pass only A / only B   0 / 0  (exact McNemar p = 1: no significant difference at 0.05)" in out


def test_quantization_reaches_the_engine_and_the_results(tmp_path, scripted):
    """`--quantization none` scores the dequantized reference: the LLM gets it, the results file records it, and
    llama.cpp (which has no such choice) refuses it."""
    out = tmp_path / "ref.jsonl"
    assert main(["eval", "humaneval", "--limit", "1", "--quantization", "none", "--output", str(out),
                 "--no-progress"]) == 0
    assert scripted[-1].kwargs["llm_kwargs"]["quantization"] == "none"
    assert json.loads(out.read_text().splitlines()[0])["_meta"]["quantization"] == "none"
    assert main(["eval", "humaneval", "--limit", "1", "--backend", "llamacpp", "--quantization", "none",
                 "--output", str(tmp_path / "x.jsonl"), "--no-progress"]) == 1


def test_bad_arguments():
    with pytest.raises(SystemExit):
        main(["eval", "humaneval", "--backend", "vllm"])
    assert main(["eval", "humaneval", "--limit", "0"]) == 1


def test_llamacpp_missing_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    from qwen25.eval.backends import LlamaCppBackend

    with pytest.raises(ImportError, match="pip install llama-cpp-python"):
        LlamaCppBackend("whatever.gguf")
