"""DPO's objective for the shared loop, and the reference log-probs computed once and cached with the data.

`DPOObjective(beta, loss_type)`: for a PairBatch (`qwen25.train.pairs`) the policy's summed log-probs of each
chosen and rejected response (`qwen25.train.logprobs.sequence_logps`: chunked over positions, no full-vocabulary
logits) against the reference log-probs the batch carries; the loss summed over the pairs is
`qwen25.train.preference_losses.dpo_loss` (sigmoid or IPO), which the loop divides by the global pair count.
Extras (per-pair means in metrics.jsonl): rewards_chosen / rewards_rejected (beta * log-ratio), reward_accuracy
(chosen reward > rejected), reward_margin, logps_chosen / logps_rejected.

`reference_logps(model, pairs)`: the reference model's log-probs of every pair's two responses, (N, 2) float64,
computed once before training with the starting weights, in eval mode, without gradients, pairs batched by
length. `cached_reference_logps` keeps them in a .npz file keyed by a SHA-256 of the pairs' token ids, the
reference checkpoint (path, size and modification time of its files) and the dtype: a rerun or a --resume reads
the file instead of recomputing (a file whose key differs is recomputed and replaced), and the reference model
is never resident while the policy trains.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from qwen25.train.distributed import DistContext, barrier, broadcast_object
from qwen25.train.logprobs import sequence_logps
from qwen25.train.pairs import EncodedPair, collate_pairs
from qwen25.train.preference_losses import DPO_LOSS_TYPES, dpo_loss

__all__ = ["DPOObjective", "cached_reference_logps", "reference_key", "reference_logps"]


class DPOObjective:
    """DPO over PairBatches carrying `ref_logps` (see the module docstring)."""

    def __init__(self, beta: float = 0.1, loss_type: Literal["sigmoid", "ipo"] = "sigmoid") -> None:
        if beta <= 0:
            raise ValueError(f"--beta must be > 0, got {beta}")
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"--loss-type {loss_type!r}: use one of {', '.join(DPO_LOSS_TYPES)}")
        self.beta, self.loss_type = beta, loss_type
        self.loss_label = ("DPO loss per pair, -log sigmoid(beta x margin), nats" if loss_type == "sigmoid" else
                           "IPO loss per pair, (per-token log-ratio margin - 1/(2 beta))^2")

    def __call__(self, model: nn.Module, batch: Any, ctx: DistContext,
                 dtype: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.ref_logps is None:
            raise ValueError("the batch carries no reference log-probs (compute them with reference_logps first)")
        logps, counts = sequence_logps(model, batch.input_ids, batch.labels, ctx, dtype)
        n = batch.num_loss_units
        ref = batch.ref_logps.to(ctx.device, torch.float32)
        losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.beta, self.loss_type,
                                            counts[:n], counts[n:])
        detached = logps.detach()
        return losses.sum(), {"rewards_chosen": chosen.sum(), "rewards_rejected": rejected.sum(),
                              "reward_accuracy": (chosen > rejected).float().sum(),
                              "reward_margin": (chosen - rejected).sum(),
                              "logps_chosen": detached[:n].sum(), "logps_rejected": detached[n:].sum()}


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: Sequence[EncodedPair], ctx: DistContext, pad_id: int,
                    dtype: str = "float32", batch_size: int = 8, progress: bool = False) -> np.ndarray:
    """(N, 2) float64: log p_ref(chosen | prompt), log p_ref(rejected | prompt) of every pair. Every rank computes
    all of them in the same order (FSDP2's forward is collective)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))  # similar lengths share a batch: less padding
    out = np.zeros((len(pairs), 2), dtype=np.float64)
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), desc="reference log-probs", unit="pair", dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        ids = order[start:start + batch_size]
        batch = collate_pairs([pairs[i] for i in ids], ids, pad_id)
        logps, _ = sequence_logps(model, batch.input_ids, batch.labels, ctx, dtype)
        logps = logps.double().cpu().numpy()
        out[ids, 0], out[ids, 1] = logps[:len(ids)], logps[len(ids):]
        if bar is not None:
            bar.update(len(ids))
    if bar is not None:
        bar.close()
    model.train(was_training)
    return out


def _checkpoint_identity(path: Path) -> list[Any]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files
            if p.suffix in (".gguf", ".safetensors", ".json", ".bin")]


def reference_key(pairs: Sequence[EncodedPair], reference: str | Path, dtype: str) -> str:
    """SHA-256 naming a reference-log-prob cache: the pairs' token ids, the reference checkpoint's files, dtype."""
    h = hashlib.sha256()
    for p in pairs:
        for part in (p.prompt, p.chosen, p.rejected):
            h.update(np.asarray(part, dtype=np.int64).tobytes())
            h.update(b"|")
    h.update(json.dumps({"reference": _checkpoint_identity(Path(reference)), "dtype": dtype}).encode())
    return h.hexdigest()


def cache_path(data: str | Path, key: str) -> Path:
    """Next to the data file (`<data>.ref-<key>.npz`) when that directory is writable, else in the user cache."""
    data = Path(data)
    if os.access(data.parent, os.W_OK):
        return data.with_name(f"{data.name}.ref-{key[:16]}.npz")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen25" / "reference_logps"
    return base / f"{data.name}.ref-{key[:16]}.npz"


def cached_reference_logps(model: nn.Module, pairs: Sequence[EncodedPair], ctx: DistContext, pad_id: int, *,
                           data: str | Path, reference: str | Path, dtype: str = "float32", batch_size: int = 8,
                           cache: str | Path | None = None, progress: bool = False) -> tuple[np.ndarray, Path, bool]:
    """(reference log-probs (N, 2), the cache file, whether it was read rather than computed)."""
    key = reference_key(pairs, reference, dtype)
    path = Path(cache) if cache is not None else cache_path(data, key)
    if broadcast_object(ctx, path.is_file()):
        with np.load(path) as saved:
            if str(saved["key"]) == key and saved["logps"].shape == (len(pairs), 2):
                return saved["logps"], path, True
    values = reference_logps(model, pairs, ctx, pad_id, dtype, batch_size, progress)
    if ctx.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, logps=values, key=np.array(key))
        os.replace(tmp, path)
    barrier(ctx)
    return values, path, False
