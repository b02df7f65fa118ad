"""FSDP2 on a CPU gloo process group: `torchrun --nproc_per_node 2` and one process, same global batch and seed, log
the same per-step losses (within 1e-5 over 20 fp32 steps); a checkpoint saved at 2 ranks (DCP shards) resumes
at 1 rank and continues as the uninterrupted single-process run does. Tiny model; the processes start in
parallel, about 20 s on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOY_SCRIPT = Path(__file__).with_name("train_toy.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")


def start(args: list[str], ranks: int = 1) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = [*(launcher if ranks > 1 else [sys.executable]), str(TOY_SCRIPT), *args]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(output: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_fsdp2_two_ranks_equal_one_process_and_resume_at_one_rank(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    common = ["--max-steps", "20", "--global-batch", "4", "--save-every", "10"]
    sharded = start(["--output", str(tmp_path / "fsdp2"), *common], ranks=2)
    single = start(["--output", str(tmp_path / "single"), *common])
    finish(sharded)
    finish(single)
    two, one = losses(tmp_path / "fsdp2"), losses(tmp_path / "single")
    assert sorted(two) == sorted(one) == list(range(1, 21))
    assert max(abs(two[s] - one[s]) for s in one) < 1e-5
    assert one[20] < one[1]

    ckpt = tmp_path / "fsdp2" / "checkpoint-10"
    shards = sorted(p.name for p in (ckpt / "dcp").iterdir())
    assert len([s for s in shards if s.endswith(".distcp")]) == 2, shards  # one file per rank
    assert (ckpt / "rank-0.pt").is_file() and (ckpt / "rank-1.pt").is_file()
    out = finish(start(["--output", str(tmp_path / "resumed"), *common, "--resume", str(ckpt)]))
    assert "at step 10" in out
    resumed = losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 21))  # steps 1-10 come from the checkpoint's history
    assert max(abs(resumed[s] - one[s]) for s in range(11, 21)) < 1e-5


@pytest.mark.slow
def test_sft_under_torchrun_full_and_lora_and_resume_at_one_rank(tmp_path, tiny_hf_dir):
    """The real command under torchrun: full SFT at 2 ranks equals 1 process and resumes at 1; LoRA at 2 ranks
    writes the peft adapter (gathered from the shards)."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"secret {i}?"},
                                                     {"role": "assistant", "content": "PAPAYA."}]}) + "\n"
                            for i in range(16)))

    def sft(output: str, ranks: int, *extra: str) -> subprocess.Popen:
        args = ["--model", str(tiny_hf_dir), "--data", str(data), "--output", str(tmp_path / output), "--seq-len",
                "64", "--max-steps", "3", "--save-every", "2", "--lr", "1e-3", "--no-progress", "--threads", "1",
                *extra]
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                    if ranks > 1 else [sys.executable])
        return subprocess.Popen([*launcher, "-m", "qwen25.cli", "train", "sft", *args], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    finish(sft("full2", 2, "--batch-size", "2"))
    finish(sft("full1", 1, "--batch-size", "4"))
    two, one = losses(tmp_path / "full2"), losses(tmp_path / "full1")
    assert max(abs(two[s] - one[s]) for s in one) < 1e-5
    out = finish(sft("resumed", 1, "--batch-size", "4", "--resume", str(tmp_path / "full2" / "checkpoint-2")))
    assert "at step 2" in out and abs(losses(tmp_path / "resumed")[3] - one[3]) < 1e-5
    assert (tmp_path / "full2" / "model.safetensors").is_file()
    finish(sft("lora2", 2, "--batch-size", "2", "--lora", "--lora-r", "4"))
    assert (tmp_path / "lora2" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "lora2" / "checkpoint-2" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_with_activation_checkpointing_tracks_fp32(tmp_path):
    common = ["--max-steps", "6", "--global-batch", "4"]
    bf16 = start(["--output", str(tmp_path / "bf16"), *common, "--dtype", "bfloat16", "--activation-checkpointing"],
                 ranks=2)
    fp32 = start(["--output", str(tmp_path / "fp32"), *common])
    finish(bf16)
    finish(fp32)
    low, full = losses(tmp_path / "bf16"), losses(tmp_path / "fp32")
    assert max(abs(low[s] - full[s]) / full[s] for s in full) < 2e-2
