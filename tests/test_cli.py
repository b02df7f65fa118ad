"""The `qwen25` command as a user runs it: help, models, bad input (clear one-line errors, non-zero exit, never a
traceback), and answering a piped or --prompt message."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "-m", "qwen25.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("qwen25: error:"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_help_teaches_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("generate", "chat", "download", "models", "examples:"):
        assert word in result.stdout
    for sub in ("generate", "chat", "download", "models"):
        assert run_cli(sub, "--help").returncode == 0


def test_models_lists_known_names_and_cache(real_gguf):
    result = run_cli("models", "--paths")
    assert result.returncode == 0
    assert "qwen2.5-coder-0.5b-instruct" in result.stdout and "qwen2.5-coder-1.5b-instruct" in result.stdout
    assert str(real_gguf) in result.stdout


def test_wrong_path():
    assert_clean_error(run_cli("generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"),
                       "/nonexistent/model.gguf", "no such file")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"NOTAGGUF" + os.urandom(4096))
    assert_clean_error(run_cli("generate", "--model", str(bad), "--prompt", "hi"), str(bad))


def test_truncated_gguf(tmp_path, real_gguf):
    cut = tmp_path / "truncated.gguf"
    with open(real_gguf, "rb") as src:
        cut.write_bytes(src.read(50_000_000))
    assert_clean_error(run_cli("generate", "--model", str(cut), "--prompt", "hi"), str(cut), "truncated")


@pytest.mark.parametrize("flag,value,message", [("--temperature", "-1", "temperature must be >= 0"),
                                                ("--top-p", "1.5", "top_p must be in (0, 1]"),
                                                ("--max-tokens", "0", "max_tokens must be >= 1")])
def test_invalid_sampling_values_fail_before_loading(flag, value, message):
    assert_clean_error(run_cli("generate", "--model", "/nonexistent.gguf", "--prompt", "x", flag, value), message)


def test_prompt_longer_than_context(tiny_hf_dir):
    result = run_cli("generate", "--model", str(tiny_hf_dir), "--prompt", "word " * 200)
    assert_clean_error(result, "prompt has", "context window is 96 tokens")


def test_unknown_architecture_hf_dir(tmp_path, tiny_hf_dir):
    import json
    import shutil

    bad = tmp_path / "llama-dir"
    shutil.copytree(tiny_hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(config))
    assert_clean_error(run_cli("chat", "--model", str(bad), "--prompt", "hi"), "unknown architecture 'llama'")


def test_piped_chat_and_generate_answer_once(tiny_hf_dir):
    piped = run_cli("chat", "--model", str(tiny_hf_dir), "--max-tokens", "5", "--seed", "1", stdin="hello there\n")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.strip()
    greedy = run_cli("generate", "--model", str(tiny_hf_dir), "--prompt", "abc", "-t", "0", "--max-tokens", "4")
    assert greedy.returncode == 0, greedy.stderr
    assert_clean_error(run_cli("chat", "--model", str(tiny_hf_dir), stdin="   \n"), "empty message")


@pytest.mark.real_model
def test_chat_prompt_with_the_default_model_writes_code(real_gguf):
    result = run_cli("chat", "--prompt", "Write a Python function that checks whether a number is prime.",
                     "--temperature", "0", "--max-tokens", "128")
    assert result.returncode == 0, result.stderr
    assert "def " in result.stdout
