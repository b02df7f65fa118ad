"""The `qwen25` command as a user runs it: help, models, bad input (clear one-line errors, non-zero exit, never a
traceback), and answering a piped or --prompt message."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import pytest

from qwen25.cli_args import add_command, arg, parse_args


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


# --- the dataclass -> argparse helper (in process) ------------------------------------------------------------
@dataclass
class Toy:
    name: str = arg(positional=True)
    """what to greet"""
    max_tokens: int = 16
    """tokens per reply"""
    shots: int = 0
    """examples"""
    mode: Literal["fast", "exact"] = "fast"
    """how"""
    verbose: bool = False
    """say more"""
    color: bool = True
    """colored output"""
    stop: list[str] | None = arg(None, metavar="TEXT")
    """repeatable"""
    ratio: float | None = arg(None, short="-r")
    """a fraction (default: none)"""


def _toy_parser():  # noqa: ANN202
    seen = []
    parser = argparse.ArgumentParser(prog="toy")
    add_command(parser.add_subparsers(dest="command"), "run", Toy, lambda cfg: seen.append(cfg) or 0, help="run it")
    return parser, Toy, seen


def test_dataclass_becomes_a_subcommand_and_parses_back_to_it():
    parser, toy, seen = _toy_parser()
    ns = parse_args(parser, ["run", "world", "--max-tokens", "3", "--mode", "exact", "--verbose", "--no-color",
                             "--stop", "a", "--stop", "b", "-r", "0.5"])
    assert ns.func(ns) == 0
    assert seen == [toy("world", 3, 0, "exact", True, False, ["a", "b"], 0.5)]
    ns = parse_args(parser, ["run", "x"])
    ns.func(ns)
    assert seen[-1] == toy("x")
    help_text = parser._subparsers._group_actions[0].choices["run"].format_help()
    for fragment in ("--max-tokens MAX_TOKENS", "tokens per reply (default: 16)", "examples (default: 0)", "{fast,exact}", "--no-color",
                     "--stop TEXT", "a fraction (default: none)", "--config FILE", "what to greet"):
        assert fragment in help_text, fragment
    with pytest.raises(SystemExit):
        parse_args(parser, ["run", "x", "--mode", "slow"])


@pytest.mark.parametrize("suffix", [".toml", ".json", ".yaml"])
def test_config_file_values_are_defaults_that_flags_override(tmp_path, suffix):
    if suffix == ".yaml":
        pytest.importorskip("yaml")
    text = {".toml": 'max-tokens = 7\nmode = "exact"\ncolor = false\nstop = ["x", "y"]\n',
            ".json": '{"max_tokens": 7, "mode": "exact", "color": false, "stop": ["x", "y"]}',
            ".yaml": "max-tokens: 7\nmode: exact\ncolor: false\nstop: [x, y]\n"}[suffix]
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    parser, toy, seen = _toy_parser()
    ns = parse_args(parser, ["run", "w", "--config", str(path)])
    ns.func(ns)
    assert seen[-1] == toy("w", max_tokens=7, mode="exact", color=False, stop=["x", "y"])
    parser, toy, seen = _toy_parser()
    ns = parse_args(parser, ["run", "w", "--config", str(path), "--max-tokens", "9", "--stop", "z", "--color"])
    ns.func(ns)
    assert seen[-1] == toy("w", max_tokens=9, mode="exact", color=True, stop=["z"])


@pytest.mark.parametrize("text,message", [('bogus = 1\n', "unknown option 'bogus'"),
                                          ('max-tokens = "many"\n', "expected int"),
                                          ('mode = "slow"\n', "'slow' is not one of"),
                                          ('max-tokens = \n', "TOMLDecodeError")])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, message):
    from qwen25.cli import main

    path = tmp_path / "serve.toml"
    path.write_text(text.replace("max-tokens", "max-concurrency").replace("mode", "log-level"))
    assert main(["serve", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qwen25: error: --config") and message.replace("max-tokens", "max-concurrency") in err, err


def test_serve_reads_a_config_file_and_passes_speculative_settings_only_when_given(tmp_path, monkeypatch):
    import uvicorn

    from qwen25 import cli
    from qwen25.server import app as server_app

    calls = []
    monkeypatch.setattr(server_app, "create_app_from_checkpoint", lambda checkpoint, **kw: calls.append(kw) or "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(("run", kw)))

    class FakeLLM:
        checkpoint, path = object(), "/models/m.gguf"

    monkeypatch.setattr(cli.ModelArgs, "load", lambda self: FakeLLM())
    config = tmp_path / "serve.toml"
    config.write_text('model = "m.gguf"\nport = 9001\nmax-concurrency = 3\n')
    assert cli.main(["serve", "--config", str(config), "--port", "9002"]) == 0
    assert "speculative_config" not in calls[0] and calls[0]["max_concurrency"] == 3
    assert calls[1][1]["port"] == 9002 and calls[0]["aliases"] == ["m.gguf", "/models/m.gguf"]
    calls.clear()
    assert cli.main(["serve", "--speculative", "ngram"]) == 0
    assert calls[0]["speculative_config"] == {"method": "ngram"}
    calls.clear()
    assert cli.main(["serve", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}']) == 0
    assert calls[0]["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 4}


@pytest.mark.parametrize("flags,message", [(["--speculative-config", "{nope"], "not valid JSON"),
                                           (["--speculative-config", "[1]"], "must be a JSON object"),
                                           (["--speculative", "ngram", "--speculative-config", '{"method": "draft"}'],
                                            "contradicts")])
def test_bad_speculative_flags_fail_before_loading(capsys, flags, message):
    from qwen25.cli import main

    assert main(["serve", "--model", "/nonexistent.gguf", *flags]) == 1
    assert message in capsys.readouterr().err
