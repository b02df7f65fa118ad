"""`qwen25 train pretrain|sft|rm|dpo|grpo`: the training commands (`add_train_parser` registers them with the qwen25 CLI).

Each is a config dataclass whose fields are its flags (`qwen25.cli_args`; `--config FILE` reads the same keys
from TOML/JSON/YAML, flags winning) and the stage's `main(cfg)`. Errors a user can fix — a wrong model path, a
resume that does not fit, an occupied output directory, bad data — are one line, raised as ValueError /
FileNotFoundError and printed by `qwen25.cli.main`. Under torchrun every rank runs the same command.
"""

from __future__ import annotations

import argparse
from typing import Any

from qwen25.cli_args import add_command
from qwen25.train.dpo import DPOConfig
from qwen25.train.grpo import GRPOConfig
from qwen25.train.pretrain import PretrainConfig
from qwen25.train.rm import RMConfig
from qwen25.train.sft import SFTConfig

TRAIN_DESCRIPTION = """Train Qwen2.5 models.

  qwen25 train pretrain --data SHARDS --output DIR    from scratch on packed token shards, in two context stages
  qwen25 train sft --model BASE --data train.jsonl --output DIR [--lora]    fine-tune on chat conversations
  qwen25 train rm --model BASE --data pairs.jsonl --output DIR      a reward model (Bradley-Terry) on preference pairs
  qwen25 train dpo --model BASE --data pairs.jsonl --output DIR [--lora]    DPO on preference pairs
  qwen25 train grpo --model BASE --data tasks.jsonl --reward math --output DIR [--lora]    online RL (GRPO)

Each writes checkpoints, metrics.jsonl and loss.png into --output and continues a killed run with --resume. Run
them under `torchrun --nproc_per_node N -m qwen25.cli train ...` to shard the model over N processes (FSDP2)."""

COMMON = """
every run:
  --output DIR holds checkpoint-<step>/ (the model in HF layout or the LoRA adapter, plus optimizer, scheduler,
  RNG and data position), metrics.jsonl (one JSON line per step: loss, lr, grad_norm, tokens/s), loss.png and the
  final model. A new run needs a new or empty --output; --resume continues the newest checkpoint there (or
  --resume DIR/checkpoint-N), bit for bit on one process, and refuses a checkpoint of another model or run.
  --config run.toml takes any flag as a key (seq-len = 1024); flags on the command line win.
  torchrun --nproc_per_node 2 -m qwen25.cli train ...   shards the model over 2 processes (FSDP2; gloo on CPU,
  NCCL on GPUs); --batch-size is per process. Checkpoints saved at N processes resume at any other count."""

PRETRAIN_EPILOG = """examples:
  qwen25 data pack /usr/lib/python3.11 --include '*.py' --output shards/stdlib
  qwen25 train pretrain --data shards/stdlib --output runs/tiny --max-steps 2000 --stage2-steps 200
      the tiny model (~10M parameters + the 151,936-token embedding): stage 1 at 256 tokens with RoPE base
      10,000, stage 2 at 1,024 tokens with base 1,000,000 from stage 1's weights
  qwen25 train pretrain --data shards/train --eval-data shards/heldout --output runs/tiny --eval-every 100 \\
      --save-every 500 --max-steps 2000 --stage2-steps 200     held-out loss, and the position-bucket table
  qwen25 train pretrain --data shards/train --output runs/tiny --resume      continue after a crash or kill
  qwen25 train pretrain --data shards/train --model-config qwen2.5-0.5b --output runs/0.5b --dtype bfloat16 \\
      --activation-checkpointing             any preset, or --model-config path/to/config.json
outputs: runs/tiny/stage1 and runs/tiny/stage2 (each a run directory, final model at its top level) and
runs/tiny/position_loss.md (held-out loss by position in the document, after each stage).""" + COMMON

SFT_EPILOG = """examples:
  qwen25 train sft --model qwen2.5-coder-0.5b-instruct --data train.jsonl --output runs/sft
      full fine-tuning with the Qwen2.5 report's recipe (2 epochs, lr 7e-6 -> 7e-7, weight decay 0.1, clip 1.0)
  qwen25 train sft --data train.jsonl --eval-data heldout.jsonl --output runs/lora --lora --lora-r 16
      a LoRA adapter on every linear layer (lr 1e-4 -> 1e-5); then: qwen25 chat --lora runs/lora
  qwen25 train sft --model ~/models/Qwen2.5-1.5B-Instruct --data train.jsonl --output runs/sft --config sft.toml
data: one conversation per line, {"messages": [{"role": "system"|"user"|"assistant"|"tool", ...}]} with optional
"tools" and assistant "tool_calls" (OpenAI form), or {"prompt": ..., "completion": ...}. The loss covers the
assistant turns only. A malformed line is an error naming its line; conversations without an assistant turn are
skipped and counted; longer than --seq-len ones are truncated (or dropped: --overlong drop) and counted.""" + COMMON

PAIRS = """data: one pair per line, {"prompt": "...", "chosen": "...", "rejected": "..."} as plain text (tokenized as
is, end-of-sequence appended to each response), or {"prompt": [messages], "chosen": [assistant message] or "...",
"rejected": ...} rendered with the chat template (content stays plain text). Pairs with an empty side, identical
sides, a prompt with no room within --seq-len, or (--overlong drop) too long are skipped and counted; a malformed
line is an error naming it."""

RM_EPILOG = """examples:
  qwen25 train rm --model qwen2.5-coder-0.5b-instruct --data pairs.jsonl --eval-data heldout.jsonl --output runs/rm
      prints the held-out pairwise accuracy; the output loads in transformers as
      AutoModelForSequenceClassification and scores GRPO rollouts with --reward rm:runs/rm
""" + PAIRS + COMMON

DPO_EPILOG = """examples:
  qwen25 train dpo --model qwen2.5-coder-0.5b-instruct --data pairs.jsonl --output runs/dpo
      full DPO with the Qwen2.5 report's settings (beta 0.1, 1 epoch, lr 7e-7); reference log-probs are computed
      once and cached next to the data (pairs.jsonl.ref-<key>.npz)
  qwen25 train dpo --data pairs.jsonl --eval-data heldout.jsonl --output runs/dpo-lora --lora --loss-type ipo
      a LoRA adapter (lr 5e-6) with the IPO loss; metrics.jsonl has reward_accuracy and reward_margin
""" + PAIRS + COMMON

GRPO_EPILOG = """examples:
  python scripts/make_rl_tasks.py /tmp/rg/reasoning_gym-*.whl --output data/rl     verifiable math/code tasks
  qwen25 train grpo --model qwen2.5-coder-0.5b-instruct --data data/rl/gsm_train.jsonl \\
      --eval-data data/rl/gsm_heldout.jsonl --reward math --reward format:boxed=0.1 --lora --output runs/grpo
      8 completions per prompt sampled by qwen25's engine from the policy being trained; LoRA lr 1e-5
  qwen25 train grpo --data tasks.jsonl --reward rm:runs/rm --output runs/grpo-rm --lora --loss-type dr_grpo \\
      --scale-rewards none       the reward model as the reward, Dr. GRPO's normalisation
data: one task per line, {"messages": [...]} or {"prompt": "..."} plus what the rewards check ("answer" for
math, "tests" for code, "schema" for json). Prompts with no room within --seq-len are skipped and counted; a
reward that raises or times out scores 0 (reward_failures in metrics.jsonl). metrics.jsonl also has reward,
kl, clip_fraction, entropy, completion_length, truncated_share, all_equal_share and rollout/reward/ref/sync
seconds; reward.png shows the reward curve, heldout.json the held-out mean reward before and after.""" + COMMON


def _resume_flag_takes_an_optional_value(parser: argparse.ArgumentParser) -> None:
    """`--resume` alone means "latest" (the newest checkpoint in --output); `--resume DIR` names one."""
    action = parser._option_string_actions["--resume"]
    action.nargs, action.const = "?", "latest"
    action.metavar = "CKPT"


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `train` with its `pretrain`, `sft`, `rm` and `dpo` sub-commands to the qwen25 CLI."""
    from qwen25.train import dpo, grpo, pretrain, rm, sft

    p = subparsers.add_parser("train", help="train models: pretrain from scratch, sft (full or LoRA), rm, dpo, grpo",
                              description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    stages = p.add_subparsers(dest="stage", metavar="STAGE")
    for name, cls, main, help_text, epilog in (
            ("pretrain", PretrainConfig, pretrain.main, "pretrain a Qwen2 model from scratch on packed token shards "
             "(two context stages)", PRETRAIN_EPILOG),
            ("sft", SFTConfig, sft.main, "fine-tune a checkpoint on chat conversations (full or LoRA)", SFT_EPILOG),
            ("rm", RMConfig, rm.main, "train a reward model on preference pairs (Bradley-Terry)", RM_EPILOG),
            ("dpo", DPOConfig, dpo.main, "align a checkpoint on preference pairs with DPO / IPO (full or LoRA)",
             DPO_EPILOG),
            ("grpo", GRPOConfig, grpo.main, "online RL with GRPO, rollouts from qwen25's engine (full or LoRA)",
             GRPO_EPILOG)):
        sub = add_command(stages, name, cls, main, help=help_text, epilog=epilog)
        _resume_flag_takes_an_optional_value(sub)
    return p
