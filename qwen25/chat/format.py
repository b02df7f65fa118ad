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
# Names render_chat fills itself (a caller's value would collide with them, or be a TypeError).
RESERVED_TEMPLATE_VARIABLES = frozenset({"template", "messages", "tools", "add_generation_prompt"})


def rename_roles(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` with OpenAI role aliases (developer) renamed to the ChatML role (system).

    Anything that is not a list of dicts is returned as it is, for `chat.messages` to refuse with a clear error."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        return messages  # type: ignore[return-value]
    out = []
    for m in messages:
        if isinstance(m, Mapping):
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
    Raises ValueError for messages the template or these rules refuse, and for template_kwargs that name one of
    RESERVED_TEMPLATE_VARIABLES (set by the arguments above)."""
    messages = rename_roles(messages)
    template_kwargs = dict(template_kwargs or {})
    reserved = sorted(k for k in template_kwargs if k in RESERVED_TEMPLATE_VARIABLES)
    if reserved:
        raise ValueError(f"template variables {', '.join(map(repr, reserved))} are set from the request itself "
                         "and cannot be given as template kwargs")
    text = render_chat(template, messages, tools=tools,
                       add_generation_prompt=add_generation_prompt and not continue_final_message, **template_kwargs)
    if continue_final_message:
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("continue_final_message needs the last message to be an assistant message")
        text = strip_end_of_turn(text)
    return text


def fim_prompt(prefix: str, suffix: str) -> str:
    """Qwen2.5-Coder's fill-in-the-middle prompt (SPEC §5): the model writes the middle after it."""
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"


__all__ = ["END_OF_TURN", "FIM_MIDDLE", "FIM_PREFIX", "FIM_SUFFIX", "RESERVED_TEMPLATE_VARIABLES", "ROLE_ALIASES",
           "fim_prompt", "rename_roles", "render_prompt", "strip_end_of_turn"]
