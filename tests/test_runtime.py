"""qwen25.runtime: `restored_runtime` puts back the thread count and OMP_WAIT_POLICY, and `qwen25.cli.main` leaves
the calling process's settings as it found them (a `--threads 1` training run once left the test process on one
thread, so a later test's two forwards ran at different thread counts and their logits differed in the last bit)."""

from __future__ import annotations

import gc

import pytest
import torch

from qwen25 import runtime
from qwen25.cli import main
from qwen25.runtime import configure_runtime, cyclic_gc_paused, restored_runtime


@pytest.fixture
def caller_threads():
    """The test process's thread count (conftest's), put back even if a test fails half-way."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.mark.parametrize("policy", [None, "ACTIVE"])
def test_restored_runtime_puts_back_threads_and_wait_policy(caller_threads, monkeypatch, policy):
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    with restored_runtime():
        assert configure_runtime(caller_threads + 1) == caller_threads + 1
        assert torch.get_num_threads() == caller_threads + 1
        assert runtime.os.environ["OMP_WAIT_POLICY"] == (policy or "PASSIVE")
    assert torch.get_num_threads() == caller_threads
    assert runtime.os.environ.get("OMP_WAIT_POLICY") == policy


def test_restored_runtime_restores_when_the_block_raises(caller_threads):
    with pytest.raises(RuntimeError, match="boom"), restored_runtime():
        torch.set_num_threads(caller_threads + 1)
        raise RuntimeError("boom")
    assert torch.get_num_threads() == caller_threads


def _spy_on_configure(monkeypatch) -> list[int]:
    """Record the thread count each configure_runtime call leaves (the command's own setting)."""
    seen: list[int] = []

    def spy(threads=None):
        used = configure_runtime(threads)
        seen.append(torch.get_num_threads())
        return used

    monkeypatch.setattr(runtime, "configure_runtime", spy)
    return seen


def test_a_command_runs_at_its_threads_and_hands_back_the_callers(tiny_hf_dir, tmp_path, caller_threads,
                                                                   monkeypatch, capsys):
    seen = _spy_on_configure(monkeypatch)
    threads = str(caller_threads + 1)
    assert main(["export", str(tiny_hf_dir), "--output", str(tmp_path / "hf"), "--threads", threads]) == 0
    assert seen == [caller_threads + 1] and torch.get_num_threads() == caller_threads
    # and when the command fails after configuring the runtime (no such model)
    assert main(["export", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--threads", threads]) == 1
    assert "missing" in capsys.readouterr().err
    assert seen == [caller_threads + 1] * 2 and torch.get_num_threads() == caller_threads


@pytest.mark.parametrize("enabled_before", [True, False])
def test_cyclic_gc_paused_turns_it_off_inside_and_back_as_it_was(enabled_before):
    was = gc.isenabled()
    try:
        (gc.enable if enabled_before else gc.disable)()
        with pytest.raises(RuntimeError):
            with cyclic_gc_paused():
                assert not gc.isenabled()
                raise RuntimeError("a load that fails")
        assert gc.isenabled() == enabled_before
    finally:
        (gc.enable if was else gc.disable)()


def test_a_load_pauses_the_collector_while_building_and_leaves_it_on(tiny_hf_dir, monkeypatch):
    """checkpoint.load builds the weights and the vocabulary with the collector off, and turns it back on."""
    from qwen25 import checkpoint

    seen = []
    build = checkpoint._tokenizer
    monkeypatch.setattr(checkpoint, "_tokenizer", lambda weights: (seen.append(gc.isenabled()), build(weights))[1])
    assert gc.isenabled()
    checkpoint.load(tiny_hf_dir)
    assert seen == [False] and gc.isenabled()
