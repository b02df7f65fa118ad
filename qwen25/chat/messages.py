"""Chat message normalisation and validation: OpenAI-style messages in, template-ready dicts out.

Owns the checks that run before a chat template sees the conversation (roles, content shapes,
tool calls) and the fixes for known client/template mismatches, chiefly JSON-string tool-call
arguments that the Qwen2.5 template would double-encode (SPEC §3.2, §7.1). It does not render;
`chat.template` does. The caller's messages are never mutated.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate `messages` and return fresh, template-ready copies.

    - `role` must be one of system/user/assistant/tool.
    - `content` may be a string, a list of OpenAI text parts (joined with "\\n"), or None/absent
      for an assistant message that has tool calls. Tool results given as a JSON value other than
      a string are serialised with json.dumps (templates would otherwise print a Python repr).
    - assistant `tool_calls[].function.arguments` given as a JSON string is parsed to an object.
    Unknown keys (`name`, `tool_call_id`, ...) are passed through untouched.
    Raises ValueError naming the offending message index.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    return [_normalize_message(i, m) for i, m in enumerate(messages)]


def _normalize_message(index: int, message: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ValueError(f"messages[{index}] must be a dict with 'role' and 'content', "
                         f"got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"messages[{index}] has unsupported role {role!r}; expected one of {', '.join(ROLES)}")
    out = dict(message)  # shallow copy: every field we change is replaced, never edited in place

    tool_calls = message.get("tool_calls")
    if tool_calls is not None and role != "assistant":
        raise ValueError(f"messages[{index}] ({role}) has tool_calls; only assistant messages may carry them")
    if tool_calls is not None:
        if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, (str, bytes)):
            raise ValueError(f"messages[{index}].tool_calls must be a list, got {type(tool_calls).__name__}")
        out["tool_calls"] = [_normalize_tool_call(index, j, call) for j, call in enumerate(tool_calls)]

    content = message.get("content")
    if content is None:
        # OpenAI sends `content: null` on assistant turns that only call tools; the template
        # tests `if message.content`, so None is fine there and nowhere else.
        if not (role == "assistant" and tool_calls):
            raise ValueError(f"messages[{index}] ({role}) has no content; only an assistant message "
                             "with tool_calls may omit it")
    elif isinstance(content, str):
        pass
    elif isinstance(content, Sequence) and not isinstance(content, bytes):
        out["content"] = _join_text_parts(index, role, content)
    elif role == "tool":
        # Some clients hand back the tool's result object itself; the template would print its
        # Python repr (single quotes, True/None), which no model was trained on.
        out["content"] = json.dumps(content, ensure_ascii=False)
    else:
        raise ValueError(f"messages[{index}] ({role}).content must be a string or a list of text parts, "
                         f"got {type(content).__name__}")
    return out


def _join_text_parts(index: int, role: str, parts: Sequence[Any]) -> str:
    """OpenAI content parts -> one string. Joined with "\\n", as vLLM does for text-only models."""
    texts: list[str] = []
    for j, part in enumerate(parts):
        where = f"messages[{index}] ({role}).content[{j}]"
        if isinstance(part, str):  # a bare string part is unambiguous, accept it
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise ValueError(f"{where} must be a {{'type': 'text', 'text': ...}} dict, got {type(part).__name__}")
        kind = part.get("type")
        if kind != "text":
            raise ValueError(f"{where} has type {kind!r}; this model is text-only, so only 'text' parts "
                             "are supported (send images/audio to a multimodal model)")
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where} is a text part without a string 'text' field")
        texts.append(text)
    return "\n".join(texts)


def _normalize_tool_call(index: int, j: int, call: Any) -> dict[str, Any]:
    """One tool call, OpenAI `{"type": "function", "function": {...}}` or flat `{"name", "arguments"}`."""
    where = f"messages[{index}].tool_calls[{j}]"
    if not isinstance(call, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(call).__name__}")
    out = dict(call)
    if "function" in call:
        function = call["function"]
        if not isinstance(function, Mapping):
            raise ValueError(f"{where}.function must be a dict, got {type(function).__name__}")
        out["function"] = _normalize_function(f"{where}.function", function)
    else:
        out = _normalize_function(where, out)
    return out


def _normalize_function(where: str, function: Mapping[str, Any]) -> dict[str, Any]:
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where} needs a non-empty string 'name', got {name!r}")
    out = dict(function)
    out["arguments"] = _parse_arguments(where, function.get("arguments"))
    return out


def _parse_arguments(where: str, arguments: Any) -> dict[str, Any]:
    """Arguments -> dict. A JSON string is decoded once: the Qwen2.5 template applies `tojson`
    to whatever it gets, so a string would be rendered double-encoded ("{\\"k\\": ...}")."""
    if arguments is None:
        return {}  # a call to a function without parameters
    if isinstance(arguments, str):
        if not arguments.strip():
            return {}  # some clients send "" for parameterless calls
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.arguments is not valid JSON ({e.msg} at char {e.pos}): "
                             f"{_preview(arguments)}") from None
    if not isinstance(arguments, Mapping):
        raise ValueError(f"{where}.arguments must be a JSON object (or a string holding one), "
                         f"got {type(arguments).__name__}: {_preview(json.dumps(arguments, ensure_ascii=False))}")
    return dict(arguments)


def _preview(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


__all__ = ["ROLES", "normalize_messages"]
