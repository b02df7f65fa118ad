"""Qwen2.5 prompt-format rules that sit around the chat template: OpenAI role aliases, continuing a final
assistant turn, and the Coder fill-in-the-middle prompt.

Owns the string-level conventions of ChatML and FIM that any caller (the HTTP server, `LLM.chat`, SFT data,
eval) applies the same way. Rendering itself is `chat.template`; message validation is `chat.messages`;
tokenization happens elsewhere. Errors are ValueError naming what is wrong; the caller's messages are never
mutated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qwen25.chat.template import render_chat

END_OF_TURN = "<|im_end|>"
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"


def rename_roles(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` with OpenAI role aliases (developer) renamed to the ChatML role (system)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") in ROLE_ALIASES:
            m["role"] = ROLE_ALIASES[m["role"]]
        out.append(m)
    return out


def strip_end_of_turn(text: str) -> str:
    """A rendered prompt whose last turn is left open: a trailing `<|im_end|>` (and newlines) removed.

    A text that does not end in `<|im_end|>` is returned unchanged."""
    end = text.rstrip("\n")
    return end[: -len(END_OF_TURN)] if end.endswith(END_OF_TURN) else text


def render_prompt(template: str | None, messages: Sequence[Mapping[str, Any]],
                  tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
                  continue_final_message: bool = False,
                  template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt text for OpenAI-style `messages` with the checkpoint's `template` (None: the ChatML fallback).

    continue_final_message: the last message must be an assistant turn, rendered without its end-of-turn so the
    model continues it (no generation prompt is added). template_kwargs become template variables
    (OpenAI's chat_template_kwargs).
    Raises ValueError for messages the template or these rules refuse."""
    messages = rename_roles(messages)
    text = render_chat(template, messages, tools=tools,
                       add_generation_prompt=add_generation_prompt and not continue_final_message,
                       **dict(template_kwargs or {}))
    if continue_final_message:
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("continue_final_message needs the last message to be an assistant message")
        text = strip_end_of_turn(text)
    return text


def fim_prompt(prefix: str, suffix: str) -> str:
    """Qwen2.5-Coder's fill-in-the-middle prompt (SPEC §5): the model writes the middle after it."""
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"


__all__ = ["END_OF_TURN", "FIM_MIDDLE", "FIM_PREFIX", "FIM_SUFFIX", "ROLE_ALIASES", "fim_prompt", "rename_roles",
           "render_prompt", "strip_end_of_turn"]
