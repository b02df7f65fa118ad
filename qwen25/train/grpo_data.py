"""GRPO's prompts: a jsonl of task records, encoded once, with the records kept for the rewards.

Each line is a dict with either "messages" (OpenAI chat messages, rendered with the chat template and the
assistant generation prompt) or "prompt" (a string: as a chat user turn by default, raw text with
`chat=False`). Every other field (the answer, unit tests, a schema...) stays in the record and reaches the
rewards as their `examples[i]` (see `qwen25.train.rewards.base`); `scripts/make_rl_tasks.py` writes such
files. A prompt that leaves fewer than `min_room` tokens within `max_length` is skipped and counted, as is an
empty one; a line that is not such a record is a ValueError naming file and line.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen25.chat import chat_prompt

__all__ = ["PromptRecord", "load_prompts"]


@dataclass
class PromptRecord:
    ids: list[int]  # the prompt's token ids (chat-rendered, with the generation prompt)
    text: str  # the same as text: what the rewards see as the prompt
    record: dict[str, Any]  # the whole task record: the rewards' example


def _encode(record: Any, tokenizer: Any, template: str | None, chat: bool, where: str) -> tuple[list[int], str]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    if messages is None:
        prompt = record.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: a record needs 'messages' (a list) or 'prompt' (a string); "
                             f"got keys {sorted(record)}")
        if not prompt.strip():
            return [], prompt
        if not chat:
            return tokenizer.encode(prompt), prompt
        messages = [{"role": "user", "content": prompt}]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    if not any(str(m.get("content") or "").strip() for m in messages):
        return [], ""
    head = chat_prompt(template, messages, add_generation_prompt=True, control_tokens=tokenizer.added_tokens)
    return head.token_ids(tokenizer), head.text


def load_prompts(path: str | Path, tokenizer: Any, template: str | None, max_length: int, *, chat: bool = True,
                 min_room: int = 1, limit: int | None = None) -> tuple[list[PromptRecord], Counter]:
    """(prompts, counts) from a jsonl file: counts["kept"], ["empty"], ["too_long"] (see the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the prompts ({e.strerror or e})") from None
    out: list[PromptRecord] = []
    counts: Counter = Counter()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        ids, text = _encode(record, tokenizer, template, chat, where)
        if not ids:
            counts["empty"] += 1
        elif len(ids) + min_room > max_length:
            counts["too_long"] += 1
        else:
            counts["kept"] += 1
            out.append(PromptRecord(ids, text, record))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path}: no usable prompt ({dict(counts)}; a prompt needs at least {min_room} free "
                         f"tokens within --seq-len {max_length})")
    return out, counts
