"""Command-line argument groups shared by the trainers on preference pairs (`qwen25 train dpo`, `qwen25 train rm`).

`PairDataArgs` is where the pairs come from and how they are rendered (the jsonl of `qwen25.train.pairs`);
`PairTrainArgs` is the training defaults both trainers use in place of `TrainArgs`'s pretraining ones. A trainer
subclasses both and restates only what differs for it: which model is trained (its docstring), the learning rate
and the warmup. Fields keep their order (and so their place in --help) when a subclass restates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qwen25.cli_args import arg
from qwen25.train.config import TrainArgs
from qwen25.weights.registry import DEFAULT_MODEL

__all__ = ["PairDataArgs", "PairTrainArgs"]


@dataclass(kw_only=True)
class PairDataArgs:
    cli_group = "model and data"

    model: str = arg(DEFAULT_MODEL, short="-m")
    """the model to train: a known name, a .gguf file or an HF directory"""
    data: str | None = arg(None, metavar="JSONL")
    """(required) preference pairs, one per line: {"prompt", "chosen", "rejected"} as text or messages"""
    eval_data: str | None = arg(None, metavar="JSONL")
    """held-out pairs: eval loss and accuracy (the share of pairs whose chosen response scores higher)"""
    chat_template: str | None = arg(None, metavar="FILE")
    """a Jinja chat template file to render message pairs with (default: the model's own)"""
    overlong: Literal["drop", "truncate"] = "drop"
    """a pair longer than --seq-len: drop it, or cut its responses to fit (counted either way)"""


@dataclass(kw_only=True)
class PairTrainArgs(TrainArgs):
    cli_group = "training"

    batch_size: int = 4
    """pairs per micro-batch per process (each pair is two rows); global batch = batch-size x grad-accum x processes"""
    seq_len: int = 1024
    """most tokens of prompt + response"""
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    """decay after warmup (default: linear)"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on matrices"""
    adam_beta2: float = 0.999
    """AdamW beta2"""
