"""Preference pairs: jsonl records -> token ids (prompt, chosen, rejected) -> padded batches for DPO and the RM.

Records (one per line), in either form:
  text:          {"prompt": str, "chosen": str, "rejected": str} — tokenized as they are (no chat template);
                 the tokenizer's end-of-sequence token is appended to each response that does not end with it
  conversation:  {"prompt": [messages], "chosen": [assistant messages] | str, "rejected": ... | str} — rendered
                 with the checkpoint's chat template (`qwen25.chat.chat_prompt`: control-token spellings in
                 message content stay plain text). The prompt is the render of the prompt messages with the
                 generation prompt; a response is what the full render adds after it, through its end-of-turn
                 token (<|im_end|>), without the newline the template writes after that.
The prompt and each response are tokenized separately, so no token straddles the boundary and a response is
tokenized as generation would produce it.

Skipped and counted, never silently: a pair with an empty prompt, a pair with an empty side (no response
tokens), identical sides, a prompt that leaves no room for a response within `max_length`, and (with
overlong="drop", the default) a pair whose prompt + longer response exceeds `max_length`; overlong="truncate"
cuts the responses to fit instead. A line
that is not such a record is a ValueError naming file and line. `PairLoader` deals pairs to ranks and batches:
rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], right-padded to the longest row (causal attention
keeps padding out of every real position), `labels` = the next token on response positions and -100
elsewhere, and the cached reference log-probs of each pair when the trainer attached them.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from qwen25.chat import chat_prompt
from qwen25.tokenizer import Tokenizer
from qwen25.train.sft_data import IGNORE_INDEX, read_sft_jsonl

__all__ = ["EncodedPair", "PairBatch", "PairLoader", "collate_pairs", "describe_stats", "encode_pair_record",
           "load_pairs", "read_template"]


def read_template(path: str | None) -> str | None:
    """The text of a --chat-template file (None for None); ValueError naming the file when unreadable."""
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--chat-template {path}: cannot read it ({e.strerror or e})") from None


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0  # the record's optional "margin": how much more the chosen side should score (RM)

    def __len__(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (2B, T) int64: B chosen rows, then the B rejected rows of the same pairs
    labels: torch.Tensor  # (2B, T) int64: next token on response positions, -100 elsewhere
    lengths: torch.Tensor  # (2B,) int64: real tokens per row (the rest is padding)
    pair_ids: torch.Tensor  # (B,) int64: index of each pair in the data set
    ref_logps: torch.Tensor | None  # (2B,) float64 reference log-probs of the responses, or None
    margins: torch.Tensor  # (B,) float32: each pair's margin (0 unless the record gives one)
    num_loss_tokens: int  # response tokens in the batch
    num_loss_units: int  # pairs in the batch (what DPO and the reward model average over)


def _messages(value: Any, where: str, side: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return value
    raise ValueError(f"{where}: '{side}' must be a string or a list of messages, got {type(value).__name__}")


def _response(tokenizer: Tokenizer, template: str | None, prompt: list[dict], reply: list[dict],
              prompt_text: str, where: str) -> list[int]:
    full = chat_prompt(template, [*prompt, *reply], add_generation_prompt=False,
                       control_tokens=tokenizer.added_tokens)
    text = full.text
    if not text.startswith(prompt_text):
        raise ValueError(f"{where}: the chat template renders the prompt differently once a response follows; "
                         "cannot locate the response")
    _, response, _ = full.cut([len(prompt_text), len(text.rstrip())])
    return response.token_ids(tokenizer) if response.parts else []


def encode_pair_record(record: Any, tokenizer: Tokenizer, template: str | None, where: str) -> EncodedPair:
    """One record (either form) -> ids; ValueError (prefixed with `where`) when it is not a pair record."""
    if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= record.keys():
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: expected {{\"prompt\", \"chosen\", \"rejected\"}}, got {keys}")
    prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise ValueError(f"{where}: 'margin' must be a number, got {margin!r}")
    if isinstance(prompt, str):
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise ValueError(f"{where}: a text 'prompt' needs text 'chosen' and 'rejected'")
        eos = tokenizer.eos_token_id
        sides = []
        for side in (chosen, rejected):
            ids = tokenizer.encode(side) if side else []
            if ids and eos is not None and ids[-1] != eos:
                ids.append(eos)
            sides.append(ids)
        return EncodedPair(tokenizer.encode(prompt) if prompt else [], *sides, float(margin))
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    prompt_messages = _messages(prompt, where, "prompt")
    head = chat_prompt(template, prompt_messages, add_generation_prompt=True, control_tokens=tokenizer.added_tokens)
    sides = []
    for name in ("chosen", "rejected"):
        reply = _messages(record[name], where, name)
        empty = not reply or all(not str(m.get("content") or "").strip() and not m.get("tool_calls") for m in reply)
        sides.append([] if empty else _response(tokenizer, template, prompt_messages, reply, head.text, where))
    return EncodedPair(head.token_ids(tokenizer), *sides, float(margin))


def load_pairs(path: str | Path, tokenizer: Tokenizer, template: str | None, max_length: int,
               overlong: Literal["drop", "truncate"] = "drop") -> tuple[list[EncodedPair], Counter]:
    """The usable pairs of a jsonl file and counters (pairs, empty_side, identical, prompt_too_long, overlong
    dropped or truncated); ValueError for a malformed line or when no pair is usable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such preference-pair file")
    if overlong not in ("drop", "truncate"):
        raise ValueError(f"overlong must be 'drop' or 'truncate', got {overlong!r}")
    stats: Counter = Counter()
    pairs: list[EncodedPair] = []
    for lineno, record in read_sft_jsonl(path):
        pair = encode_pair_record(record, tokenizer, template, f"{path}:{lineno}")
        stats["pairs"] += 1
        if not pair.prompt:
            stats["skipped_empty_prompt"] += 1
            continue
        if not pair.chosen or not pair.rejected:
            stats["skipped_empty_side"] += 1
            continue
        if pair.chosen == pair.rejected:
            stats["skipped_identical"] += 1
            continue
        room = max_length - len(pair.prompt)
        if room < 2:
            stats["skipped_prompt_too_long"] += 1
            continue
        if len(pair) > max_length:
            if overlong == "drop":
                stats["skipped_overlong"] += 1
                continue
            pair = EncodedPair(pair.prompt, pair.chosen[:room], pair.rejected[:room], pair.margin)
            if pair.chosen == pair.rejected:
                stats["skipped_identical"] += 1
                continue
            stats["truncated"] += 1
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path}: no usable preference pair ({dict(stats) or 'the file is empty'})")
    return pairs, stats


def describe_stats(stats: dict[str, int]) -> str:
    """load_pairs' counters as one line: "pairs 65, skipped empty side 1"."""
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stats.items())


def collate_pairs(pairs: Sequence[EncodedPair], pair_ids: Sequence[int], pad_id: int,
                  ref_logps: np.ndarray | None = None) -> PairBatch:
    """A PairBatch of `pairs` (see the module docstring); ref_logps: (N, 2) for the whole data set, or None."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    width = max(len(a) + len(b) for a, b in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    lengths = np.zeros(len(rows), dtype=np.int64)
    for r, (prompt, response) in enumerate(rows):
        n, p = len(prompt) + len(response), len(prompt)
        ids[r, :n] = prompt + response
        labels[r, p - 1:n - 1] = response  # position t predicts token t + 1: the response's tokens
        lengths[r] = n
    refs = None
    if ref_logps is not None:
        picked = ref_logps[np.asarray(pair_ids)]
        refs = torch.from_numpy(np.concatenate([picked[:, 0], picked[:, 1]]).astype(np.float64))
    labels_t = torch.from_numpy(labels)
    margins = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return PairBatch(torch.from_numpy(ids), labels_t, torch.from_numpy(lengths), torch.tensor(list(pair_ids)), refs,
                     margins, int((labels_t != IGNORE_INDEX).sum()), len(pairs))


class PairLoader:
    """Batches of pairs: each epoch shuffles the pairs (seed, epoch); step s takes pairs [s*W*B, (s+1)*W*B) of that
    order and rank r its B of them. The last partial step is dropped, unless drop_last=False on one process
    (evaluation: every pair counts once). Resumable (epoch, steps consumed)."""

    def __init__(self, pairs: list[EncodedPair], batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, identity: dict[str, Any] | None = None,
                 drop_last: bool = True) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size {batch_size} / rank {rank} of {world_size}")
        self.pairs, self.batch_size, self.seed, self.pad_id = pairs, batch_size, seed, pad_id
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.drop_last = drop_last or world_size > 1  # ranks must run the same number of (collective) batches
        self.identity = {"kind": "pairs", "pairs": len(pairs), "seed": seed, **(identity or {})}
        self.epoch, self.position = 0, 0
        self.ref_logps: np.ndarray | None = None  # (N, 2) float64, attached by the DPO trainer
        if len(self) == 0:
            raise ValueError(f"{len(pairs)} pairs are fewer than one step of {world_size} rank(s) x batch size "
                             f"{batch_size}: lower --batch-size or add pairs")

    def __len__(self) -> int:
        per_step = self.batch_size * self.world_size
        return len(self.pairs) // per_step if self.drop_last else -(-len(self.pairs) // per_step)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, **self.identity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in self.identity.items():
            if state.get(key) != value:
                raise ValueError(f"data position was saved for {key}={state.get(key)!r}, this loader has {value!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.pairs)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[PairBatch]:
        epoch = self.epoch
        order = self.order(epoch)
        per_step = self.batch_size * self.world_size
        while self.position < len(self):
            start = self.position * per_step + self.rank * self.batch_size
            picked = order[start:start + self.batch_size]
            self.position += 1
            yield collate_pairs([self.pairs[i] for i in picked], picked, self.pad_id, self.ref_logps)
        if self.epoch == epoch:
            self.epoch, self.position = epoch + 1, 0
