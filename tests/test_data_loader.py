"""PackedLoader: packing invariants, per-document ids and labels, determinism, rank slices and exact resume.

Documents are synthetic: document d holds the ids d*1000, d*1000+1, ... followed by end-of-text, so every token
says which document it came from and where; rows are checked against that, not against the loader's own logic.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from qwen25.data.shards import ShardWriter
from qwen25.model.rope import positions_in_documents
from qwen25.train.data import Batch, PackedLoader

EOT = 999_999
LENGTHS = [3, 40, 5, 1, 17, 2, 9, 0, 26, 11, 4, 8, 13, 6, 30, 7]  # some longer than a row
SEQ = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    with ShardWriter(path, EOT, max_tokens_per_file=60) as w:
        for d, n in enumerate(LENGTHS):
            w.add([d * 1000 + k for k in range(n)])
    return path


def _doc(d: int) -> list[int]:
    return [d * 1000 + k for k in range(LENGTHS[d])] + [EOT]


def _epoch_rows(shards, world_size=2, batch_size=2, seed=0, epoch=0, drop_last=False):
    """All rows of one epoch in global order (step by step, rank by rank), and the per-rank batch counts."""
    loaders = [PackedLoader(shards, SEQ, batch_size, seed, r, world_size, drop_last) for r in range(world_size)]
    per_rank = []
    for loader in loaders:
        loader.set_epoch(epoch)
        per_rank.append(list(loader))
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(loaders[0])
    rows = [(b.input_ids[i], b.labels[i], b.document_ids[i])
            for step in zip(*per_rank) for b in step for i in range(b.input_ids.shape[0])]
    return rows, per_rank


def _pieces(ids: torch.Tensor, docs: torch.Tensor) -> list[list[int]]:
    """The runs of equal document id in a row, in order."""
    cuts = [0] + [t for t in range(1, len(docs)) if docs[t] != docs[t - 1]] + [len(docs)]
    return [ids[a:b].tolist() for a, b in zip(cuts, cuts[1:])]


def test_every_token_once_per_epoch_across_ranks_and_document_runs_match_documents(shards):
    total = sum(LENGTHS) + len(LENGTHS)
    rows, _ = _epoch_rows(shards)
    stream = torch.cat([ids for ids, _, _ in rows]).tolist()
    assert len(stream) >= total and all(t == EOT for t in stream[total:])  # the tail is padding
    stream = stream[:total]
    docs_seen = Counter()
    for ids, _, docs in rows:
        pieces = _pieces(ids, docs)
        assert docs[0] == 0 and torch.all(docs.diff() >= 0) and docs.unique().numel() == len(pieces)  # 0, 1, 2...
        for j, piece in enumerate(pieces):
            d = piece[0] // 1000 if piece[0] != EOT else None
            if d is None:  # only end-of-text: the tail of a split document, or padding
                assert len(piece) == 1 or j == len(pieces) - 1
                continue
            k = piece[0] % 1000
            assert piece == _doc(d)[k:k + len(piece)], "a run is a contiguous piece of one document"
            assert piece[-1] == EOT or j == len(pieces) - 1, "only the row's last run may stop before its end"
    # the row stream is the documents one after another, each exactly once
    starts = [0] + [i + 1 for i, t in enumerate(stream) if t == EOT][:-1]
    for s in starts:
        d = stream[s] // 1000 if stream[s] != EOT else LENGTHS.index(0)
        assert stream[s:s + LENGTHS[d] + 1] == _doc(d)
        docs_seen[d] += 1
    assert docs_seen == Counter(range(len(LENGTHS)))


def test_labels_are_the_next_token_of_the_same_document(shards):
    rows, batches = _epoch_rows(shards)
    for ids, labels, docs in rows:
        assert ids.numel() <= SEQ
        for t in range(ids.numel()):
            token, label = int(ids[t]), int(labels[t])
            if token == EOT:
                assert label == -100  # a document's last token, or padding
            else:
                d, k = divmod(token, 1000)
                assert label == _doc(d)[k + 1]  # never the next document's first token
                if t + 1 < ids.numel():
                    assert docs[t + 1] == docs[t] and ids[t + 1] == label
    for b in (b for rank in batches for b in rank):
        assert isinstance(b, Batch) and b.num_loss_tokens == int((b.labels != -100).sum())
        assert b.input_ids.dtype == b.labels.dtype == b.document_ids.dtype == torch.int64
    # every batch is 2 full rows but the epoch's last ones: fewer rows, or as wide as their content
    shapes = [tuple(b.input_ids.shape) for rank in batches for b in rank]
    assert shapes.count((2, SEQ)) >= len(shapes) - len(batches) and all(w <= SEQ for _, w in shapes)


def test_positions_restart_at_each_document_piece(shards):
    rows, _ = _epoch_rows(shards, world_size=1, batch_size=1)
    for ids, _, docs in rows:
        pos = positions_in_documents(docs[None])[0].tolist()
        t = 0
        for piece in _pieces(ids, docs):
            assert pos[t:t + len(piece)] == list(range(len(piece)))
            t += len(piece)


def test_order_is_deterministic_per_seed_and_epoch(shards):
    def stream(seed, epoch):
        rows, _ = _epoch_rows(shards, seed=seed, epoch=epoch)
        return torch.cat([r[0] for r in rows]).tolist()

    assert stream(0, 0) == stream(0, 0)
    assert stream(0, 0) != stream(1, 0) and stream(0, 0) != stream(0, 1)
    assert Counter(stream(0, 0)) == Counter(stream(0, 1))


def test_rank_slices_are_disjoint_and_equal_in_length(shards):
    total_rows = -(-(sum(LENGTHS) + len(LENGTHS)) // SEQ)
    for world in (1, 2, 3):
        rows, per_rank = _epoch_rows(shards, world_size=world, batch_size=1)
        assert len(rows) == world * len(per_rank[0]) >= total_rows
        single, _ = _epoch_rows(shards, world_size=1, batch_size=1)
        for a, b in zip(rows, single):  # ranks interleave the single-rank row order
            assert torch.equal(a[0], b[0])


def test_drop_last_keeps_only_full_steps(shards):
    n = sum(LENGTHS) + len(LENGTHS)
    loader = PackedLoader(shards, SEQ, 2, 0, 0, 2, drop_last=True)
    assert len(loader) == (n // SEQ) // 4
    for b in loader:
        assert b.input_ids.shape == (2, SEQ)
    with pytest.raises(ValueError, match="fewer than one step"):
        PackedLoader(shards, 64, 8, 0, drop_last=True)


def test_exact_resume_mid_epoch_and_across_epochs(shards):
    """Take k batches (breaking out of the loop, as a trainer stopping at a step does), save, resume in a new
    loader: the rest equals an uninterrupted run over three epochs, for k inside, at the end of and past epoch 0."""
    reference = PackedLoader(shards, SEQ, 2, 7, drop_last=False)
    expected = [b for e in range(3) for b in (reference.set_epoch(e) or list(reference))]
    for k in (0, 1, 3, len(reference) - 1, len(reference), len(reference) + 2):
        first = PackedLoader(shards, SEQ, 2, 7, drop_last=False)
        taken = []
        while len(taken) < k:
            for b in first:
                taken.append(b)
                if len(taken) == k:
                    break
        state = first.state_dict()
        resumed = PackedLoader(shards, SEQ, 2, 7, drop_last=False)
        resumed.load_state_dict(state)
        rest = []
        while len(taken) + len(rest) < len(expected):
            rest.extend(resumed)
        for a, b in zip(taken + rest, expected):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.document_ids, b.document_ids)


def test_set_epoch_after_a_resume_keeps_the_position(shards):
    a = PackedLoader(shards, SEQ, 1, 3)
    a.set_epoch(2)
    it = iter(a)
    next(it), next(it)
    b = PackedLoader(shards, SEQ, 1, 3)
    b.load_state_dict(a.state_dict())
    b.set_epoch(2)  # what a trainer's epoch loop does after restoring
    assert torch.equal(next(iter(b)).input_ids, next(it).input_ids)
    b.set_epoch(3)
    assert b.state_dict()["rows_consumed"] == 0


def test_resume_at_another_world_size(shards):
    """Two ranks x batch 1 saved after 2 steps == one rank x batch 2 resumed: same global rows."""
    two = [PackedLoader(shards, SEQ, 1, 5, r, 2, drop_last=False) for r in range(2)]
    iters = [iter(x) for x in two]
    for _ in range(2):
        for it in iters:
            next(it)
    state = two[0].state_dict()
    assert state == two[1].state_dict() and state["rows_consumed"] == 4
    one = PackedLoader(shards, SEQ, 2, 5, drop_last=False)
    one.load_state_dict(state)
    for b in one:
        rows = [next(it).input_ids[0] for it in iters]
        # the same rows; past the epoch's last row a rank steps on a 2-token padding row the batch of 2 leaves out
        assert b.input_ids.shape[0] == len(rows) or (b.input_ids.shape[0] == 1 and torch.all(rows[1] == EOT))
        for row, alone in zip(b.input_ids, rows):
            width = alone.numel()
            assert torch.equal(row[:width], alone) and torch.all(row[width:] == EOT)


def test_state_from_other_data_or_settings_is_refused(shards, tmp_path):
    state = PackedLoader(shards, SEQ, 1, 0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(shards, SEQ, 1, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(shards, 8, 1, 0).load_state_dict(state)
    with ShardWriter(tmp_path, EOT) as w:
        w.add(list(range(100)))
    with pytest.raises(ValueError, match="data"):
        PackedLoader(tmp_path, SEQ, 1, 0).load_state_dict(state)


def test_bad_settings(shards):
    with pytest.raises(ValueError, match="rank 2"):
        PackedLoader(shards, SEQ, 1, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(shards, 1, 1, 0)
    with pytest.raises(ValueError, match="no such shard directory"):
        PackedLoader(shards / "nope", SEQ, 1, 0)


def test_rows_are_numpy_free_of_shared_memory(shards):
    """Batches own their memory: changing one does not touch the memory-mapped shards."""
    loader = PackedLoader(shards, SEQ, 1, 0)
    b = next(iter(loader))
    b.input_ids += 1
    assert np.asarray(loader.reader[0])[-1] == EOT
