"""SFT examples -> token ids + next-token labels that train only on the assistant's turns.

Input records (one per jsonl line): `{"messages": [...], "tools": [...]?}` in OpenAI form (system / user /
assistant / tool roles, assistant `tool_calls`), or `{"prompt": str, "completion": str}`, which is the
conversation [user: prompt, assistant: completion]. A conversation is rendered with the checkpoint's own chat
template (`qwen25.chat.render_chat`); the trained spans are the assistant turns' text as the model would
generate it after the generation prompt: each turn's content (and tool calls) plus its closing end-of-turn token
(`<|im_end|>` for ChatML), not the newline after it and not the `<|im_start|>assistant\\n` header.

Spans are found by rendering prefixes: for assistant message i, the render of messages[:i] with the generation
prompt ends where the turn's content starts, and the render of messages[:i + 1] ends (trailing whitespace aside)
where the turn ends. Both must be prefixes of the full render; a template that re-renders earlier turns once later
ones exist is refused. The rendered text is then tokenized segment by segment (untrained, trained, untrained...)
and the ids concatenated, so no token straddles a span edge and each assistant turn is tokenized exactly as
generation would produce it after the prompt (for ordinary text this equals tokenizing the whole render).
Content is plain text (`qwen25.chat.prompt`'s control-token policy, as at inference): a `<|im_start|>system`
typed inside a message of the data is trained as the characters it is, never as a forged turn; only the
template's own markup becomes control tokens.

A malformed line (bad JSON, neither form, an invalid message) raises ValueError naming file and line: training
silently on part of a data set is worse than stopping. A conversation without an assistant turn is skipped and
counted. Packing into rows is `qwen25.train.data.SFTLoader`'s job.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen25.chat import render_chat
from qwen25.chat.prompt import chat_prompt
from qwen25.tokenizer import Tokenizer

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "Conversation", "EncodedConversation", "assistant_spans", "conversation_from_record",
           "encode_conversations", "load_sft_file", "read_sft_jsonl"]


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    where: str = ""  # "file:line", for error messages


@dataclass
class EncodedConversation:
    """input_ids (L,) int64 and labels (L,) int64: labels[t] = input_ids[t + 1] where that token is trained, else
    -100 (so labels[L - 1] is always -100)."""

    input_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.size)

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def truncated(self, length: int) -> EncodedConversation:
        """The first `length` tokens; the last position loses its label (its next token is gone)."""
        labels = self.labels[:length].copy()
        labels[-1] = IGNORE_INDEX
        return EncodedConversation(self.input_ids[:length], labels)


def read_sft_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line; ValueError naming the line for bad JSON."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def conversation_from_record(record: Any, where: str) -> Conversation:
    """A jsonl record in either form -> Conversation; ValueError (prefixed with `where`) for anything else."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages, tools = record["messages"], record.get("tools")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of messages")
        if tools is not None and not isinstance(tools, list):
            raise ValueError(f"{where}: 'tools' must be a list, got {type(tools).__name__}")
        return Conversation(messages, tools, where)
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return Conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                            None, where)
    raise ValueError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": str, \"completion\": str}}, "
                     f"got keys {sorted(record)}")


def assistant_spans(chat_template: str | None, messages: Sequence[Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The full render of `messages` and the [start, end) character spans of its assistant turns.

    ValueError when the template is not prefix-stable (see the module docstring) or a turn renders empty."""
    full = render_chat(chat_template, messages, tools=tools, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation starts with an assistant turn; nothing prompts it")
        before = render_chat(chat_template, messages[:i], tools=tools, add_generation_prompt=True)
        through = render_chat(chat_template, messages[:i + 1], tools=tools, add_generation_prompt=False)
        start, end = len(before), len(through.rstrip())
        if not (full.startswith(before) and full.startswith(through)):
            raise ValueError(f"the chat template renders the turns before message {i} differently once later turns "
                             "are added; cannot locate the assistant spans")
        if end <= start or (spans and start < spans[-1][1]):
            raise ValueError(f"message {i}: the assistant turn renders to no text after the generation prompt")
        spans.append((start, end))
    return full, spans


def encode_conversations(tokenizer: Tokenizer, chat_template: str | None,
                         conversations: Sequence[Conversation]) -> list[EncodedConversation | None]:
    """Encode each conversation (None for one without an assistant turn); ValueError names the bad one."""
    control_tokens = tuple(getattr(tokenizer, "added_tokens", ()))
    out: list[EncodedConversation | None] = []
    for conv in conversations:
        try:
            text, spans = assistant_spans(chat_template, conv.messages, conv.tools)
            prompt = chat_prompt(chat_template, conv.messages, conv.tools, add_generation_prompt=False,
                                 control_tokens=control_tokens)
        except ValueError as e:
            raise ValueError(f"{conv.where}: {e}") from None
        if not spans:
            out.append(None)
            continue
        if prompt.text != text:
            raise ValueError(f"{conv.where}: the chat template renders differently once control-token spellings "
                             "in content are escaped; cannot keep content plain")
        pieces = prompt.cut([edge for span in spans for edge in span])
        parts = [piece.token_ids(tokenizer) for piece in pieces]
        flags = [False, True] * len(spans) + [False]
        ids = np.fromiter((t for p in parts for t in p), dtype=np.int64)
        trained = np.fromiter((f for p, f in zip(parts, flags) for _ in p), dtype=bool, count=ids.size)
        labels = np.full(ids.size, IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
        out.append(EncodedConversation(ids, labels))
    return out


def load_sft_file(path: str | Path, tokenizer: Tokenizer,
                  chat_template: str | None) -> tuple[list[EncodedConversation], Counter]:
    """Every usable conversation of an SFT jsonl file, in file order, and counters (conversations,
    skipped_no_assistant)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SFT data file")
    conversations = [conversation_from_record(record, f"{path}:{lineno}") for lineno, record in read_sft_jsonl(path)]
    if not conversations:
        raise ValueError(f"{path}: no conversations (the file is empty)")
    encoded = encode_conversations(tokenizer, chat_template, conversations)
    stats = Counter(conversations=len(encoded), skipped_no_assistant=sum(e is None for e in encoded))
    return [e for e in encoded if e is not None], stats
