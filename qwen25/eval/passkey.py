"""Passkey retrieval: a 5-digit key hidden at a chosen depth of filler text, asked for at the end.

The layout of llama.cpp's passkey example and the Qwen2.5-1M blog (an instruction, repeated filler, one line
stating the key, more filler, the question, greedy answer), worded here. Prompts are built in the model's own
tokens so a length means exactly that many prompt tokens; the answer is scored by the first number it contains.
This module builds prompts and scores answers; generating them is the caller's (an `LLM`, llama.cpp, ...).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

INTRO = ("Below is a long text. Most of it is noise, but one line holds a pass key. "
         "Read everything, keep the pass key in mind, and give it when asked.\n\n")
FILLER = "The river runs to the sea. The hills are quiet. The wind moves the trees. Day follows night. "
KEY_LINE = "\nThe pass key is {key}. Keep it in mind: {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True, slots=True)
class PasskeyPrompt:
    ids: list[int]
    key: str
    depth: float  # where the key line sits in the filler, 0 (start) .. 1 (end)
    key_token: int  # index of the key line's first token in ids


def passkey_keys(n: int, seed: int = 0) -> list[str]:
    """n 5-digit keys from a seeded generator."""
    rng = random.Random(seed)
    return [str(rng.randint(10_000, 99_999)) for _ in range(n)]


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of exactly `length` tokens of `tokenizer` (encode(text) -> ids) with the key at `depth`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if not (key.isdigit() and len(key) == 5):
        raise ValueError(f"a pass key is 5 digits, got {key!r}")
    intro, filler = tokenizer.encode(INTRO), tokenizer.encode(FILLER)
    key_ids, question = tokenizer.encode(KEY_LINE.format(key=key)), tokenizer.encode(QUESTION)
    room = length - len(intro) - len(key_ids) - len(question)
    if room < 0:
        raise ValueError(f"a passkey prompt needs at least {length - room} tokens, got length={length}")
    reps, rest = divmod(room, len(filler))
    noise = filler * reps + filler[:rest]  # whole filler sentences, then a cut one: exactly `room` tokens
    before = round(depth * reps) * len(filler)  # the key goes between two filler repetitions
    ids = intro + noise[:before] + key_ids + noise[before:] + question
    assert len(ids) == length
    return PasskeyPrompt(ids, key, depth, len(intro) + before)


def first_number(text: str) -> str | None:
    """The first run of digits in an answer (None if it has none)."""
    match = re.search(r"\d+", text)
    return None if match is None else match.group()


def is_found(answer: str, key: str) -> bool:
    """Whether the answer's first number is the key."""
    return first_number(answer) == key
