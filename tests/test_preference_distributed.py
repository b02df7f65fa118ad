"""`qwen25 train dpo` and `qwen25 train rm` under `torchrun --nproc_per_node 2` (FSDP2 on a CPU gloo group): the
per-step losses and metrics equal one process's with the same global batch (within 1e-5), and the outputs are
written once, gathered from the shards. Tiny model; the processes of a pair start in parallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")


def _pairs(path: Path, n: int) -> None:
    rows = []
    for i in range(n):
        rows.append({"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
                     "chosen": [{"role": "assistant", "content": f"{2 * i}"}],
                     "rejected": [{"role": "assistant", "content": f"It is {2 * i + 1}, I believe"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _start(stage: str, ranks: int, args: list[str]) -> subprocess.Popen:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    return subprocess.Popen([*launcher, "-m", "qwen25.cli", "train", stage, *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def _records(output: Path) -> list[dict]:
    return [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_two_ranks_equal_one_process(stage, tmp_path, tiny_hf_dir):
    data = tmp_path / "pairs.jsonl"
    _pairs(data, 16)
    common = ["--model", str(tiny_hf_dir), "--data", str(data), "--eval-data", str(data), "--seq-len", "64",
              "--max-steps", "3", "--lr", "1e-3", "--warmup-ratio", "0", "--no-progress", "--threads", "1"]
    if stage == "dpo":  # the reference log-probs first, once: both runs then read the same cache
        _finish(_start(stage, 1, [*common, "--output", str(tmp_path / "warm"), "--max-steps", "1",
                                  "--batch-size", "4"]))
    two = _start(stage, 2, [*common, "--output", str(tmp_path / "two"), "--batch-size", "2"])
    one = _start(stage, 1, [*common, "--output", str(tmp_path / "one"), "--batch-size", "4"])
    _finish(two), _finish(one)
    a, b = _records(tmp_path / "two"), _records(tmp_path / "one")
    keys = ["loss", "eval_loss"] + (["reward_accuracy", "reward_margin", "eval_reward_accuracy"] if stage == "dpo"
                                    else ["accuracy", "margin", "eval_accuracy"])
    compared = 0
    for ra, rb in zip(a, b, strict=True):
        for key in keys:
            if key in rb:
                assert abs(ra[key] - rb[key]) < 1e-5, (key, ra, rb)
                compared += 1
    assert compared >= 3 * 3 + 2  # 3 steps x (loss + 2 metrics), then the held-out loss and accuracy
    assert [r["loss"] for r in b if "loss" in r][-1] < [r["loss"] for r in b if "loss" in r][0]
    assert (tmp_path / "two" / "model.safetensors").is_file() and (tmp_path / "two" / "config.json").is_file()
