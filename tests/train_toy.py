"""A tiny in-test data source and model for the trainer's tests (imported by name: pytest puts tests/ on sys.path).

`ToyLoader` follows the loader contract of `qwen25.train.data` (Batch objects, set_epoch, state_dict,
load_state_dict, __len__) without depending on it: a few hundred short arithmetic "documents" (learnable, so the
loss falls) packed into rows, shuffled per epoch by seed + epoch. Global batch i is rows [i*G, (i+1)*G) of the
epoch's order with G = batch_size x world_size, and rank r takes its batch_size rows [r*b, (r+1)*b) of it, so one
process with batch_size G sees exactly the rows that N ranks see together. Its state is the epoch and the number
of global batches consumed, which is the same on every rank and at every world size.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from qwen25.config import ModelConfig

TOY_CONFIG = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=10_000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    document_ids: torch.Tensor
    num_loss_tokens: int


def toy_documents(n: int = 300, vocab: int = 256, seed: int = 1234) -> list[list[int]]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        start, stride, length = rng.randrange(2, vocab), rng.randrange(1, 5), rng.randrange(4, 24)
        docs.append([2 + (start + stride * i) % (vocab - 2) for i in range(length)] + [1])
    return docs


def pack_rows(docs: list[list[int]], seq_len: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(input_ids, labels, document_ids) rows of seq_len tokens; a document cut at a row end continues in the next
    row as a new document; the row's tail is padding (its own document, no loss)."""
    rows, ids, labels, doc_ids = [], [], [], []
    for d, doc in enumerate(docs):
        pos = 0
        while pos < len(doc):
            room = seq_len - len(ids)
            piece = doc[pos:pos + room]
            ids += piece
            labels += piece[1:] + [-100]  # the last token of a document (piece) predicts nothing
            doc_ids += [d] * len(piece)
            pos += len(piece)
            if len(ids) == seq_len:
                rows.append((ids, labels, doc_ids))
                ids, labels, doc_ids = [], [], []
    return rows


class ToyLoader:
    def __init__(self, seq_len: int = 32, batch_size: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1,
                 documents: int = 300, sleep_after: int | None = None) -> None:
        self.sleep_after = sleep_after  # slow down after this many batches (a window to SIGKILL a run in)
        self.rows = pack_rows(toy_documents(documents), seq_len)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self.stats: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.rows) // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self):
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1000 + self.epoch).shuffle(order)
        global_batch = self.batch_size * self.world_size
        while self.position < len(self):
            start = self.position * global_batch + self.rank * self.batch_size
            picked = [self.rows[i] for i in order[start:start + self.batch_size]]
            self.position += 1
            if self.sleep_after is not None and self.position > self.sleep_after:
                time.sleep(1.0)
            ids, labels, docs = (torch.tensor([r[k] for r in picked]) for k in range(3))
            yield Batch(ids, labels, docs, int((labels != -100).sum()))


def main(argv: list[str] | None = None) -> int:
    """`python tests/train_toy.py --output DIR [...]` (or under torchrun): toy training through the real loop,
    for tests that need a separate process (SIGKILL and resume, FSDP2 at 2 ranks)."""
    import argparse

    from qwen25.model.init import model_from_config
    from qwen25.train.config import TrainArgs
    from qwen25.train.distributed import init_distributed, shard_model, shutdown
    from qwen25.train.loop import train

    p = argparse.ArgumentParser()
    p.add_argument("--output", required=True)
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--resume", default=None)
    p.add_argument("--sleep-after", type=int, default=None, help="sleep 0.3 s per batch after this many batches")
    p.add_argument("--config-seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--activation-checkpointing", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    ctx = init_distributed()
    model = model_from_config(TOY_CONFIG, seed=a.config_seed)
    if ctx.distributed:
        shard_model(model, mixed_precision=torch.bfloat16 if a.dtype == "bfloat16" else None)
    loader = ToyLoader(seq_len=32, batch_size=a.global_batch // ctx.world_size, rank=ctx.rank,
                       world_size=ctx.world_size, sleep_after=a.sleep_after)
    args = TrainArgs(output=a.output, max_steps=a.max_steps, save_every=a.save_every, lr=3e-3, warmup_steps=2,
                     batch_size=a.global_batch // ctx.world_size, resume=a.resume, no_progress=True,
                     dtype=a.dtype, activation_checkpointing=a.activation_checkpointing)
    train(model, loader, args, ctx=ctx, fingerprint={"kind": "toy", "model": TOY_CONFIG.to_dict()})
    shutdown(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
