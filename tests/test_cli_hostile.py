"""The `qwen25` command against hostile and careless input: every bad file, flag or input is one line on stderr,
a non-zero exit and no traceback. Covers stdin and text flags that are not UTF-8 (invalid bytes, lone
surrogates), non-finite and out-of-range numbers, malformed model directories (bad JSON, wrong types, broken
tokenizer, truncated weights, broken chat templates), usage errors, unexpected exceptions, a closed stdout pipe,
and the interactive chat surviving a bad line. Most cases call `qwen25.cli.main` in-process (fast); the byte-level
stdin/argv paths and the closed pipe run the real command in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen25.cli import main

pytestmark = pytest.mark.real_model  # tiny_hf_dir carries the real tokenizer


def run(argv: list[str], capsys: pytest.CaptureFixture, stdin: bytes | str | None = None,
        monkeypatch: pytest.MonkeyPatch | None = None, tty: bool = False) -> tuple[int, str, str]:
    if stdin is not None:
        assert monkeypatch is not None
        stream = io.StringIO(stdin) if isinstance(stdin, str) else io.TextIOWrapper(io.BytesIO(stdin),
                                                                                     encoding="utf-8")
        stream.isatty = lambda: tty  # type: ignore[method-assign]
        monkeypatch.setattr(sys, "stdin", stream)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "error:" in lines[0], err
    for fragment in fragments:
        assert fragment in lines[0], err
    assert len(lines[0]) < 500, err


def cli(*args: str, stdin: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "-m", "qwen25.cli", *args], input=stdin, capture_output=True,
                          timeout=timeout, env=env)


# --- text input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["generate"], ["generate", "--chat"], ["chat"]])
@pytest.mark.parametrize("data,where", [(b"hi \xff\xfe there", "byte 0xff at offset 3"),
                                        (b"\xed\xa0\x80 surrogate", "byte 0xed at offset 0"),
                                        (b"ok \xc3", "byte 0xc3 at offset 3")])
def test_stdin_that_is_not_utf8(tiny_hf_dir, capsys, monkeypatch, command, data: bytes, where: str) -> None:  # noqa: ANN001
    rc, out, err = run([*command, "-m", "/nonexistent.gguf"], capsys, data, monkeypatch)
    assert_one_line_error(rc, err, "stdin is not UTF-8 text", where)  # before any model is loaded


def test_stdin_text_stream_with_surrogates(capsys, monkeypatch) -> None:  # noqa: ANN001
    rc, _, err = run(["generate", "-m", "/nonexistent.gguf"], capsys, "a\udcffb", monkeypatch)
    assert_one_line_error(rc, err, "stdin is not valid UTF-8 text", "byte 0xff at character 1")


@pytest.mark.parametrize("argv,fragment", [
    (["generate", "--prompt", "x\udcffy"], "--prompt is not valid UTF-8 text (byte 0xff at character 1)"),
    (["generate", "--chat", "--prompt", "\ud800"], "--prompt is not valid UTF-8 text (lone surrogate U+D800"),
    (["chat", "--prompt", "ok\udced\udca0\udc80"], "--prompt is not valid UTF-8 text (byte 0xed at character 2)"),
    (["chat", "--prompt", "ok", "--system", "\udc80"], "--system is not valid UTF-8 text"),
    (["generate", "--prompt", "ok", "--stop", "a\udcfe"], "--stop is not valid UTF-8 text"),
    (["chat", "--prompt", "ok", "--stop", "fine", "--stop", "\udfff"], "--stop is not valid UTF-8 text"),
])
def test_text_flags_that_are_not_utf8(capsys, argv: list[str], fragment: str) -> None:  # noqa: ANN001
    rc, _, err = run([*argv, "-m", "/nonexistent.gguf"], capsys)
    assert_one_line_error(rc, err, fragment)


def test_raw_bytes_through_a_real_process(tiny_hf_dir) -> None:  # noqa: ANN001
    """The bytes as a shell passes them: argv decoded with surrogateescape, stdin read as bytes."""
    result = cli("generate", "-m", str(tiny_hf_dir), stdin=b"caf\xe9 latin-1\n")
    assert_one_line_error(result.returncode, result.stderr.decode(), "byte 0xe9 at offset 3")
    result = cli("chat", "-m", str(tiny_hf_dir), "--prompt", os.fsdecode(b"caf\xe9"))
    assert_one_line_error(result.returncode, result.stderr.decode(), "--prompt is not valid UTF-8 text")


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_empty_input(tiny_hf_dir, capsys, monkeypatch, command: str) -> None:  # noqa: ANN001
    rc, _, err = run([command, "-m", str(tiny_hf_dir), "--max-tokens", "2"], capsys, b"", monkeypatch)
    assert_one_line_error(rc, err, "empty")


# --- numbers and usage errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,fragment", [
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--top-p=-inf"], "--top-p must be a finite number"),
    (["--min-p", "nan"], "--min-p must be a finite number"),
    (["--repetition-penalty", "inf"], "--repetition-penalty must be a finite number"),
    (["--presence-penalty", "nan"], "--presence-penalty must be a finite number"),
    (["--frequency-penalty", "1e999"], "--frequency-penalty must be a finite number"),
    (["--seed", str(2**64)], "--seed must fit in 64 bits"),
    (["--seed", str(-(2**63) - 1)], "--seed must fit in 64 bits"),
    (["--seed", "9" * 5000], "invalid int value: '999"),  # past Python's int() digit limit: argparse refuses it
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--max-tokens", "0"], "max_tokens must be >= 1"),
    (["--max-tokens", "-5"], "max_tokens must be >= 1"),
    (["--top-k", "-5"], "top_k must be >= -1"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_numbers_fail_before_loading(capsys, command: str, flags: list[str], fragment: str) -> None:  # noqa: ANN001
    rc, _, err = run([command, "-m", "/nonexistent.gguf", "--prompt", "x", *flags], capsys)
    assert_one_line_error(rc, err, fragment)


@pytest.mark.parametrize("threads", ["0", "-3"])
def test_bad_thread_counts(capsys, threads: str) -> None:  # noqa: ANN001
    rc, _, err = run(["generate", "-m", "/nonexistent.gguf", "--prompt", "x", "--threads", threads], capsys)
    assert_one_line_error(rc, err, "--threads must be >= 1")


@pytest.mark.parametrize("argv,fragment", [
    (["generate", "--max-tokens", "abc"], "invalid int value: 'abc'"),
    (["generate", "--temperature", "warm"], "invalid float value"),
    (["chat", "--quantization", "q9"], "invalid choice: 'q9'"),
    (["generate", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["generate", "--prompt"], "expected one argument"),
    (["no-such-command"], "invalid choice"),
    (["serve", "--port", "http"], "invalid int value"),
])
def test_usage_errors_are_one_line(capsys, argv: list[str], fragment: str) -> None:  # noqa: ANN001
    rc, _, err = run(argv, capsys)
    assert rc == 2
    assert_one_line_error(rc, err, fragment, "--help")


@pytest.mark.parametrize("content,fragment", [
    (b"max-tokens = [", "--config"), (b"\xff\xfe garbage", "codec"), (b"[1, 2]", "--config"),
    (b'temperature = "hot"', "expected float"), (b"unknown-option = 1", "unknown option"),
])
def test_bad_config_files(tmp_path: Path, capsys, content: bytes, fragment: str) -> None:  # noqa: ANN001
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    rc, _, err = run(["generate", "--config", str(path), "--prompt", "x"], capsys)
    assert_one_line_error(rc, err, fragment)


# --- model files ------------------------------------------------------------------------------------------------
def broken_copy(tiny_hf_dir: Path, tmp_path: Path, name: str, content: bytes | None) -> Path:
    """A copy of the tiny model directory (weights symlinked) with file `name` replaced (None: removed)."""
    target = tmp_path / "model"
    target.mkdir()
    for f in tiny_hf_dir.iterdir():
        (target / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, target / f.name)
    (target / name).unlink()
    if content is not None:
        (target / name).write_bytes(content)
    return target


def config_with(tiny_hf_dir: Path, **changes: object) -> bytes:
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    return json.dumps({**config, **changes}).encode()


def tokenizer_config_with(tiny_hf_dir: Path, **changes: object) -> bytes:
    config = json.loads((tiny_hf_dir / "tokenizer_config.json").read_text())
    return json.dumps({**config, **changes}).encode()


BROKEN_FILES = {
    "config-not-json": ("config.json", lambda d: b"{not json"),
    "config-not-utf8": ("config.json", lambda d: b"\xff\xfe{}"),
    "config-a-list": ("config.json", lambda d: b"[1, 2]"),
    "config-wrong-type": ("config.json", lambda d: config_with(d, num_hidden_layers="two")),
    "config-negative": ("config.json", lambda d: config_with(d, hidden_size=-32)),
    "config-missing": ("config.json", lambda d: None),
    "config-empty": ("config.json", lambda d: b""),
    "tokenizer-empty-object": ("tokenizer.json", lambda d: b"{}"),
    "tokenizer-not-json": ("tokenizer.json", lambda d: b"{bad"),
    "tokenizer-missing": ("tokenizer.json", lambda d: None),
    "tokenizer-config-not-utf8": ("tokenizer_config.json", lambda d: b"\xff"),
    "generation-config-not-json": ("generation_config.json", lambda d: b"{bad"),
    "generation-config-wrong-type": ("generation_config.json", lambda d: b'{"temperature": "hot"}'),
    "weights-truncated": ("model.safetensors", lambda d: (d / "model.safetensors").read_bytes()[:1000]),
    "weights-garbage": ("model.safetensors", lambda d: b"garbagegarbage"),
    "weights-missing": ("model.safetensors", lambda d: None),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_broken_model_directories(tiny_hf_dir: Path, tmp_path: Path, capsys, case: str) -> None:  # noqa: ANN001
    name, make = BROKEN_FILES[case]
    model = broken_copy(tiny_hf_dir, tmp_path, name, make(tiny_hf_dir))
    rc, _, err = run(["generate", "-m", str(model), "--prompt", "hi", "--max-tokens", "2"], capsys)
    assert_one_line_error(rc, err)


@pytest.mark.parametrize("template,fragment", [("{% for %}", "does not compile"),
                                               ("{{ messages[0].nope.x }}", "failed to render"),
                                               ("{{ raise_exception('no users here') }}", "no users here")])
@pytest.mark.parametrize("command", [["generate", "--chat"], ["chat"]])
def test_broken_chat_templates(tiny_hf_dir: Path, tmp_path: Path, capsys, command, template: str,  # noqa: ANN001
                               fragment: str) -> None:
    model = broken_copy(tiny_hf_dir, tmp_path, "tokenizer_config.json",
                        tokenizer_config_with(tiny_hf_dir, chat_template=template))
    rc, _, err = run([*command, "-m", str(model), "--prompt", "hi", "--max-tokens", "2"], capsys)
    assert_one_line_error(rc, err, fragment)


@pytest.mark.parametrize("make", ["missing", "text-file", "empty-gguf", "dir-named-gguf", "symlink-loop", "empty"])
def test_bad_model_paths(tmp_path: Path, capsys, make: str) -> None:  # noqa: ANN001
    path = tmp_path / "m.gguf"
    if make == "text-file":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
    elif make == "empty-gguf":
        path.write_bytes(b"")
    elif make == "dir-named-gguf":
        path.mkdir()
    elif make == "symlink-loop":
        path.symlink_to(path)
    rc, _, err = run(["generate", "-m", "" if make == "empty" else str(path), "--prompt", "hi"], capsys)
    assert_one_line_error(rc, err)


def test_bad_lora_paths(tiny_hf_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    (tmp_path / "file").write_text("x")
    for lora in (tmp_path / "missing", tmp_path / "file", tmp_path):
        rc, _, err = run(["generate", "-m", str(tiny_hf_dir), "--lora", str(lora), "--prompt", "hi"], capsys)
        assert_one_line_error(rc, err)


def test_context_overflow_is_one_line(tiny_hf_dir: Path, capsys) -> None:  # noqa: ANN001
    rc, _, err = run(["chat", "-m", str(tiny_hf_dir), "--prompt", "word " * 200], capsys)
    assert_one_line_error(rc, err, "context window is 96 tokens")


# --- unexpected failures, pipes, the interactive loop ---------------------------------------------------------
def test_unexpected_exceptions_are_one_line_unless_debugging(tiny_hf_dir: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    from qwen25.llm import LLM

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(LLM, "stream", boom)
    argv = ["generate", "-m", str(tiny_hf_dir), "--prompt", "hi", "--max-tokens", "2"]
    rc, _, err = run(argv, capsys)
    assert_one_line_error(rc, err, "RuntimeError: boom second line", "QWEN25_DEBUG=1")
    monkeypatch.setenv("QWEN25_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)


def test_a_closed_pipe_is_quiet(tiny_hf_dir: Path) -> None:  # noqa: ANN001
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen([sys.executable, "-m", "qwen25.cli", "generate", "-m", str(tiny_hf_dir), "--prompt",
                             "one two", "--max-tokens", "80", "--temperature", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(1)
    proc.stdout.close()  # like `| head -c 1`
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert proc.returncode in (0, 1)


def test_interactive_chat_survives_bad_lines(tiny_hf_dir: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    lines = "hello\nbad \udcff line\n" + "word " * 200 + "\nhi again\n/exit\n"
    rc, out, err = run(["chat", "-m", str(tiny_hf_dir), "--max-tokens", "2"], capsys, lines, monkeypatch,
                       tty=True)
    assert rc == 0, err
    assert "Traceback" not in err
    assert "that line is not valid UTF-8 text (byte 0xff at character 4); ignored" in err
    assert "context window is 96 tokens" in err  # the over-long message is refused, the session goes on
    assert out.count("\n") >= 2  # "hello" and "hi again" were answered
