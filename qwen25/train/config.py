"""The options every training stage shares (`TrainArgs`), as a dataclass whose fields are the command's flags.

`qwen25 train pretrain` and `qwen25 train sft` extend it with their own fields (`qwen25.train.pretrain` /
`qwen25.train.sft`); `qwen25.cli_args` turns the fields into `--kebab-case` flags with the attribute docstrings
as help, and reads the same keys from `--config FILE` (TOML, JSON or YAML), flags winning. No torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qwen25.cli_args import arg

__all__ = ["TrainArgs"]


@dataclass(kw_only=True)
class TrainArgs:
    cli_group = "training"

    output: str | None = arg(None, short="-o", metavar="DIR")
    """run directory (required): checkpoints, metrics.jsonl, loss.png, the final model (must be new or empty,
    or hold this run with --resume)"""
    resume: str | None = arg(None, metavar="CKPT")
    """continue a killed run: --resume alone takes the newest checkpoint in --output, or name a checkpoint
    directory (refused if it belongs to another model or run)"""
    seed: int = 0
    """seeds data order, initialisation and dropout"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """float32, or bfloat16 autocast over fp32 master weights (under FSDP also bf16 all-gathers, fp32
    reductions)"""
    batch_size: int = 8
    """rows per micro-batch per process; global batch = batch-size x grad-accum x processes"""
    grad_accum: int = 1
    """micro-batches accumulated into one optimizer step"""
    seq_len: int = 512
    """tokens per row (documents are packed into rows)"""
    epochs: int = 1
    """passes over the data (ignored when --max-steps is given)"""
    max_steps: int | None = None
    """stop after this many optimizer steps (default: --epochs over the data)"""
    lr: float = 3e-4
    """peak learning rate"""
    min_lr: float | None = None
    """learning rate at the end of the decay (default: lr / 10)"""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after warmup (default: cosine)"""
    warmup_steps: int | None = None
    """linear warmup steps (default: --warmup-ratio of the run)"""
    warmup_ratio: float = 0.0
    """warmup as a fraction of the optimizer steps"""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (not norms, biases or embeddings)"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.95
    """AdamW beta2"""
    max_grad_norm: float = 1.0
    """clip gradients to this global L2 norm (0 = no clipping)"""
    activation_checkpointing: bool = False
    """recompute each decoder layer in backward: less memory, about a third more compute"""
    eval_every: int = 0
    """held-out loss every N steps (0 = only at the end; needs --eval-data)"""
    eval_batches: int | None = None
    """limit each evaluation to N batches per process (default: all)"""
    save_every: int = 0
    """checkpoint every N steps (0 = only at the end)"""
    save_total_limit: int | None = None
    """keep only the newest N checkpoints (default: all)"""
    report_to: Literal["none", "tensorboard"] = "none"
    """also log to TensorBoard (<output>/tensorboard; needs the tensorboard package)"""
    threads: int | None = None
    """torch threads per process (default: all cores, at most 8)"""
    no_progress: bool = False
    """no progress bar"""

    def __post_init__(self) -> None:
        for name in ("output", "data"):  # required, but may come from --config FILE, so not argparse-required
            if hasattr(self, name) and not getattr(self, name):
                raise ValueError(f"--{name} is required (as a flag or a key of --config FILE)")
        positive = dict(batch_size=self.batch_size, grad_accum=self.grad_accum, seq_len=self.seq_len,
                        epochs=self.epochs)
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("eval_every", "save_every", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr <= 0 or (self.min_lr is not None and not 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need --lr > 0 and 0 <= --min-lr <= --lr, got {self.lr} and {self.min_lr}")
