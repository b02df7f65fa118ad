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
                 documents: int = 300) -> None:
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
            ids, labels, docs = (torch.tensor([r[k] for r in picked]) for k in range(3))
            yield Batch(ids, labels, docs, int((labels != -100).sum()))
