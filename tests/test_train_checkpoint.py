"""Checkpoints and resume: a run killed with SIGKILL after a checkpoint and resumed logs bit-identical per-step
losses to an uninterrupted run (one rank); checkpoints appear atomically; runs refuse foreign output directories
and checkpoints of another model with one line, changing nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwen25.model.init import model_from_config
from qwen25.train.checkpointing import TrainingRunError, list_checkpoints
from qwen25.train.config import TrainArgs
from qwen25.train.distributed import DistContext
from qwen25.train.loop import train
from train_toy import TOY_CONFIG, ToyLoader

TOY_SCRIPT = Path(__file__).with_name("train_toy.py")
CTX = DistContext()


def toy(output: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.Popen([sys.executable, str(TOY_SCRIPT), "--output", str(output), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(output: Path) -> list[float]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


def test_sigkill_then_resume_gives_bit_identical_losses(tmp_path):
    steps = ["--max-steps", "12", "--save-every", "4"]
    victim = toy(tmp_path / "killed", *steps, "--sleep-after", "5")  # slow after step 5: a window to kill in
    deadline = time.monotonic() + 90
    while not (tmp_path / "killed" / "checkpoint-4").is_dir():
        assert victim.poll() is None and time.monotonic() < deadline, victim.stdout.read()
        time.sleep(0.05)
    time.sleep(0.5)  # let it get past step 4 (it logs step 5 and sleeps in the data of step 6)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    written = losses(tmp_path / "killed")
    assert 4 <= len(written) < 12, "the kill should land between checkpoint-4 and the end"
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["checkpoint-4"]
    reference = toy(tmp_path / "straight", *steps)
    resumed = toy(tmp_path / "killed", *steps, "--resume", "latest")
    for proc in (reference, resumed):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    assert "resumed from" in out and "checkpoint-4 at step 4" in out
    straight = losses(tmp_path / "straight")
    assert len(straight) == 12
    assert losses(tmp_path / "killed") == straight  # bit for bit: exact float equality, every step


def _args(output: Path, **kw) -> TrainArgs:
    return TrainArgs(output=str(output), **{"max_steps": 4, "save_every": 2, "lr": 1e-3, "no_progress": True, **kw})


def _train(output: Path, config=TOY_CONFIG, **kw):
    model = model_from_config(config, seed=0)
    return train(model, ToyLoader(seq_len=32, batch_size=8), _args(output, **kw), ctx=CTX,
                 fingerprint={"kind": "toy", "model": config.to_dict()})


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_checkpoint_layout_and_in_process_resume(tmp_path):
    full = _train(tmp_path / "a", max_steps=6, schedule="constant")
    _train(tmp_path / "b", max_steps=4, schedule="constant")
    ckpt = tmp_path / "b" / "checkpoint-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 1 and len([r for r in state["history"] if "loss" in r]) == 4
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "rank-0.pt").is_file()
    assert not list((tmp_path / "b").glob(".tmp-*"))
    more = _train(tmp_path / "b", max_steps=6, resume=str(ckpt), schedule="constant")  # extended from step 4
    assert more.step == 6 and more.losses == full.losses


def test_a_new_run_refuses_an_occupied_output_and_changes_nothing(tmp_path):
    _train(tmp_path / "run")
    before = _snapshot(tmp_path / "run")
    with pytest.raises(TrainingRunError, match="already holds this run; continue it with --resume"):
        _train(tmp_path / "run")
    expected = r"different run \(model\.hidden_size 32 there, 64 here; model.head_dim 8 there, 16 here\)"
    with pytest.raises(TrainingRunError, match=expected):
        _train(tmp_path / "run", config=TOY_CONFIG.replace(hidden_size=64), resume="latest")
    assert _snapshot(tmp_path / "run") == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TrainingRunError, match="not empty and holds no qwen25 training run"):
        _train(tmp_path / "other")
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    _train(tmp_path / "run")
    other = TOY_CONFIG.replace(num_hidden_layers=3)
    with pytest.raises(TrainingRunError, match=r"--resume .*checkpoint-4 belongs to a different run "
                                               r"\(model\.num_hidden_layers 2 there, 3 here\)"):
        _train(tmp_path / "new", config=other, resume=str(tmp_path / "run" / "checkpoint-4"))
    assert not (tmp_path / "new").exists()
    with pytest.raises(TrainingRunError, match="not a complete training checkpoint"):
        _train(tmp_path / "new", resume=str(tmp_path / "nowhere"))


def test_resume_latest_with_nothing_saved_starts_fresh(tmp_path):
    result = _train(tmp_path / "run", resume="latest")
    assert result.step == 4


def test_incomplete_checkpoints_are_never_listed_or_loaded(tmp_path):
    _train(tmp_path / "run", max_steps=2)
    fake = tmp_path / "run" / ".tmp-checkpoint-9"  # what a crash mid-save leaves
    fake.mkdir()
    (tmp_path / "run" / "checkpoint-7").mkdir()  # a directory without trainer_state.json
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    result = _train(tmp_path / "run", max_steps=4, resume="latest")
    assert result.step == 4 and not fake.exists()


def test_save_total_limit_keeps_the_newest(tmp_path):
    _train(tmp_path / "run", max_steps=6, save_every=1, save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-5", "checkpoint-6"]


def test_rng_states_round_trip(tmp_path):
    import random

    _train(tmp_path / "run", max_steps=2)
    saved = torch.load(tmp_path / "run" / "checkpoint-2" / "rank-0.pt", weights_only=False)
    expected = (random.random(), torch.rand(3))
    random.setstate(saved["rng"]["python"])
    torch.set_rng_state(saved["rng"]["torch"])
    again = (random.random(), torch.rand(3))
    assert again[0] == expected[0] and torch.equal(again[1], expected[1])
