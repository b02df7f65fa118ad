"""GRPO's objective through the training loop under `torchrun --nproc_per_node 2` (FSDP2, CPU gloo): the per-step
loss, KL and clip fraction equal one process's with the same global batch of rollouts (within 1e-5), for a
per-token normalisation (dapo) and a per-sequence one (grpo, with truncated completions masked). Tiny model;
the two runs of a pair start in parallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("grpo_fsdp_worker.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")


def _start(ranks: int, args: list[str]) -> subprocess.Popen:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    return subprocess.Popen([*launcher, str(WORKER), *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]


def _steps(output: Path) -> list[dict]:
    return [r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("loss_type,extra", [("dapo", []), ("grpo", ["--mask-truncated"])])
def test_two_ranks_equal_one_process(loss_type, extra, tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    common = ["--loss-type", loss_type, *extra]
    two = _start(2, ["--output", str(tmp_path / "two"), *common])
    one = _start(1, ["--output", str(tmp_path / "one"), *common])
    _finish(two), _finish(one)
    a, b = _steps(tmp_path / "two"), _steps(tmp_path / "one")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "kl", "clip_fraction", "grad_norm"):
            assert abs(ra[key] - rb[key]) < 1e-5, (key, ra, rb)
    assert any(r["clip_fraction"] > 0 for r in b) and b[-1]["kl"] > 0  # clipping and the KL term took part
