"""Tool-call parsing: Qwen2.5's Hermes-style `<tool_call>{json}</tool_call>` output -> OpenAI tool calls.

Pure text in, events out (no HTTP, no engine): the server uses it, and so can anything else that reads a Qwen
reply (LLM.chat, eval, SFT data checks).

One incremental parser serves both paths: streaming feeds it each text delta, non-streaming feeds the whole
text at once, so a streamed reply reassembles to exactly the non-streamed one. The policy (SPEC §3.3, §7.1-2):

- A call is `<tool_call>`, one JSON object `{"name": str, "arguments": object}`, `</tool_call>`. Several calls per
  message are fine. The final call may be unterminated (the model stopped or ran out of tokens), as vLLM allows.
- `arguments` is passed through as the exact JSON text the model wrote (so streamed fragments concatenate to the
  final string). A JSON *string* holding the object (double- or triple-encoded, SPEC §7.1) is decoded and
  re-serialised; `parameters` is accepted for `arguments`; a missing or null value gives "{}".
- Streaming announces a call (id + name) as soon as its name is complete, then streams the argument text as it
  arrives; argument text that is not a plain object (a double-encoded string) is held until the call ends.
- A block that is not valid JSON, or has no name, stays in the content as text; a call already announced while
  streaming cannot be taken back, so it keeps the arguments streamed so far.
- Only offered functions are called: when `tool_names` is given, a block naming any other function stays in the
  content as text, tags included (a model talked into "calling" a function the client never offered, e.g. by a
  forged tool description or a user message, does not produce a `tool_calls` entry the client might act on).
  Streaming decides on the name before announcing anything, so both paths agree. Without `tool_names` (a caller
  that does not know the tools) every well-formed block is a call.
- Qwen2.5-Coder often answers with bare JSON or one ```json fenced block instead of tags (SPEC §7.2): when tools
  are offered, a reply that is *entirely* such JSON (one object or several, or a list of objects) and names only
  offered tools becomes tool calls; anything else stays content. Such replies are held back while streaming
  until they can be decided (at the end), so content that starts like JSON arrives in one piece.
- Whitespace between or after calls is not content; content that is only whitespace is reported as None.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field

START, END = "<tool_call>", "</tool_call>"
_NAME_RE = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS_KEY_RE = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_ANY_ARGS_KEY_RE = re.compile(r'"(?:arguments|parameters)"\s*:\s*')
_FENCE_RE = re.compile(r"^```[ \t]*(?:json|JSON|json5)?[ \t]*\n(.*?)\n?[ \t]*```$", re.DOTALL)
_MAX_DECODE_DEPTH = 3


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallDelta:
    """A streaming fragment of call `index`: id and name come once (first), arguments in pieces."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str


@dataclass
class _Call:
    index: int
    id: str
    name: str | None = None        # set once announced
    sent: str = ""                 # argument text streamed so far
    args_start: int | None = None  # offset of the arguments value in the call body
    scan_pos: int = 0              # JSON scanner state over the arguments object
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    args_end: int | None = None
    refused: bool = False          # names a function that was not offered: the block is content
    lead: str = ""                 # whitespace before the tag, restored if the block turns out to be content


@dataclass
class ToolCallParser:
    """Feed text with `feed`, end with `finish`; both return a list of str (content) and ToolCallDelta items."""

    tool_names: Collection[str] = ()
    allow_bare_json: bool = True
    calls: list[_Call] = field(default_factory=list)
    _buf: str = ""
    _in_call: bool = False
    _ws: str = ""              # whitespace held in content mode
    _held: str | None = None   # content held while it may be a bare-JSON call (None: not holding)
    _decided: bool = False     # the bare-JSON question is settled
    _finished: bool = False

    def __post_init__(self) -> None:
        if not (self.allow_bare_json and self.tool_names):
            self._decided = True

    # --- public API ----------------------------------------------------------------------------------
    def feed(self, text: str) -> list[str | ToolCallDelta]:
        out: list[str | ToolCallDelta] = []
        self._buf += text
        while True:
            if not self._in_call:
                i = self._buf.find(START)
                if i >= 0:
                    self._content(self._buf[:i], out)
                    self._buf = self._buf[i + len(START):]
                    self._start_call(out)
                    continue
                keep = _partial_suffix(self._buf, START)
                self._content(self._buf[: len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep:]
                return out
            j = self._buf.find(END)
            if j >= 0:
                body, self._buf = self._buf[:j], self._buf[j + len(END):]
                self._end_call(body, out)
                continue
            keep = _partial_suffix(self._buf, END)
            self._progress_call(self._buf[: len(self._buf) - keep], out)
            return out

    def finish(self) -> list[str | ToolCallDelta]:
        """End of the model's output: close an unterminated call, decide held content."""
        if self._finished:
            return []
        self._finished = True
        out: list[str | ToolCallDelta] = []
        if self._in_call:
            body, self._buf = self._buf, ""
            self._end_call(body, out)
        elif self._buf:
            rest, self._buf = self._buf, ""
            self._content(rest, out)
        if self._held is not None:
            held, self._held = self._held, None
            self._decided = True
            parsed = parse_bare_json_calls(held, self.tool_names)
            if parsed is not None:
                for call in parsed:
                    index = len(self.calls)
                    self.calls.append(_Call(index, call.id, call.name, call.arguments))
                    out.append(ToolCallDelta(index, call.id, call.name, call.arguments))
            else:
                out.append(held)
        if self._ws and not self.calls:
            out.append(self._ws)
        self._ws = ""
        return out

    # --- content -------------------------------------------------------------------------------------
    def _content(self, text: str, out: list[str | ToolCallDelta]) -> None:
        if not text:
            return
        if not self._decided:
            held = (self._held or "") + text
            start = held.lstrip()
            if not start or _may_be_bare_json(start):
                self._held = held
                return
            self._held, self._decided = None, True
            text = held
        body = text.rstrip()  # trailing whitespace waits: it is content only if more content follows
        if not body:
            self._ws += text
            return
        out.append(self._ws + body)
        self._ws = text[len(body):]

    # --- calls ---------------------------------------------------------------------------------------
    def _offered(self, name: str) -> bool:
        return not self.tool_names or name in self.tool_names

    def _start_call(self, out: list[str | ToolCallDelta]) -> None:
        if self._held is not None:  # text held as possible bare JSON turned out to precede a tagged call
            held, self._held = self._held, None
            if held.strip():
                out.append(self._ws + held)
            self._ws = ""
        self._decided = True
        lead, self._ws = self._ws, ""  # whitespace right before a tag is not content (unless the tag is not a call)
        self._in_call = True
        self.calls.append(_Call(len(self.calls), new_call_id(), lead=lead))

    def _progress_call(self, body: str, out: list[str | ToolCallDelta]) -> None:
        call = self.calls[-1]
        if call.refused:
            return
        if call.name is None:
            m = _NAME_RE.match(body)
            if m is None:
                return
            try:
                name = json.loads(f'"{m.group(1)}"')
            except json.JSONDecodeError:
                return
            if not self._offered(name):
                call.refused = True
                return
            call.name = name
            out.append(ToolCallDelta(call.index, call.id, name, ""))
        if call.args_start is None:
            k = _ARGS_KEY_RE.match(body, _NAME_RE.match(body).end())  # type: ignore[union-attr]
            if k is None or k.end() == len(body):  # the value has not begun (more whitespace may come)
                return
            call.args_start = call.scan_pos = k.end()
        if call.args_end is None:
            if body[call.args_start] != "{":
                return  # double-encoded or odd: decided when the call ends
            self._scan(call, body)
        end = call.args_end if call.args_end is not None else len(body)
        text = body[call.args_start:end]
        if len(text) > len(call.sent):
            out.append(ToolCallDelta(call.index, arguments=text[len(call.sent):]))
            call.sent = text

    @staticmethod
    def _scan(call: _Call, body: str) -> None:
        """Advance a tiny JSON scanner over the arguments object to find where it closes."""
        i = call.scan_pos
        while i < len(body):
            c = body[i]
            if call.in_string:
                if call.escaped:
                    call.escaped = False
                elif c == "\\":
                    call.escaped = True
                elif c == '"':
                    call.in_string = False
            elif c == '"':
                call.in_string = True
            elif c in "{[":
                call.depth += 1
            elif c in "}]":
                call.depth -= 1
                if call.depth == 0:
                    call.args_end = i + 1
                    break
            i += 1
        call.scan_pos = i

    def _end_call(self, body: str, out: list[str | ToolCallDelta]) -> None:
        self._in_call = False
        call = self.calls[-1]
        parsed = parse_call_body(body)
        if call.name is None:
            if call.refused or parsed is None or not self._offered(parsed[0]):
                # not a call after all (or not of an offered function): the block is content, tags included
                self.calls.pop()
                self._ws = call.lead
                self._content(START + body + (END if not self._finished else ""), out)
                return
            call.name = parsed[0]
            out.append(ToolCallDelta(call.index, call.id, call.name, ""))
        arguments = parsed[1] if parsed is not None and parsed[0] == call.name else None
        if arguments is None:
            arguments = call.sent or "{}"
        if arguments.startswith(call.sent):
            rest = arguments[len(call.sent):]
        else:  # cannot happen for well-formed calls: the streamed text is a prefix of the raw arguments
            rest = ""
        if rest:
            out.append(ToolCallDelta(call.index, arguments=rest))
            call.sent += rest


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (held back until decided)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _may_be_bare_json(start: str) -> bool:
    if start[0] in "{[":
        return True
    if not start.startswith("`"):
        return False
    if not "```".startswith(start[:3]):
        return False
    first_line, newline, _ = start.partition("\n")
    lang = first_line[3:].strip().lower()
    return not newline or lang in ("", "json", "json5")


def _decode_nested(value: object) -> object:
    """Undo up to three levels of JSON-in-a-string encoding."""
    for _ in range(_MAX_DECODE_DEPTH):
        if not isinstance(value, str):
            break
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            break
    return value


def parse_call_body(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) from the inside of one `<tool_call>` block, or None if it is not a call."""
    text = body.strip()
    try:
        first, end = json.JSONDecoder().raw_decode(text)  # tolerates trailing junk (a cut-off closing tag)
    except json.JSONDecodeError:
        return None
    obj = _decode_nested(first)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    return obj["name"], _arguments_text(obj, text[:end] if isinstance(first, dict) else None)


def _arguments_text(obj: dict, raw: str | None) -> str:
    key = "arguments" if "arguments" in obj else "parameters"
    value = obj.get(key)
    decoded = _decode_nested(value)
    if decoded is None:
        return "{}"
    if isinstance(value, dict) and raw is not None:
        # The model's own text for the object, so streaming (which sends it as written) agrees.
        for m in _ANY_ARGS_KEY_RE.finditer(raw):
            try:
                sub, end = json.JSONDecoder().raw_decode(raw, m.end())
            except json.JSONDecodeError:
                continue
            if sub == value:
                return raw[m.end():end]
    return json.dumps(decoded, ensure_ascii=False)


def parse_bare_json_calls(text: str, tool_names: Collection[str]) -> list[ParsedCall] | None:
    """Calls from a reply that is entirely JSON (optionally one ```json fence) naming offered tools, else None."""
    text = text.strip()
    fence = _FENCE_RE.match(text)
    if fence:
        text = fence.group(1).strip()
    values: list[object] = []
    decoder = json.JSONDecoder()
    i = 0
    while i < len(text):
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
    items: list[object] = []
    for value in values:
        items.extend(value if isinstance(value, list) else [value])
    calls: list[ParsedCall] = []
    for item in items:
        item = _decode_nested(item)
        if isinstance(item, dict) and isinstance(item.get("function"), dict):
            item = item["function"]  # an OpenAI-shaped {"type": "function", "function": {...}}
        if not isinstance(item, dict) or item.get("name") not in tool_names:
            return None
        arguments = _decode_nested(item.get("arguments", item.get("parameters")))
        if arguments is not None and not isinstance(arguments, dict):
            return None
        calls.append(ParsedCall(new_call_id(), item["name"], json.dumps(arguments or {}, ensure_ascii=False)))
    return calls or None


def parse_tool_calls(text: str, tool_names: Collection[str] = (),
                     allow_bare_json: bool = True) -> tuple[str | None, list[ParsedCall]]:
    """Non-streaming: (content or None, calls) for a complete model reply."""
    parser = ToolCallParser(tool_names, allow_bare_json)
    return collect(parser.feed(text) + parser.finish())


def collect(events: list[str | ToolCallDelta]) -> tuple[str | None, list[ParsedCall]]:
    """Fold parser events into (content or None, calls)."""
    content: list[str] = []
    calls: dict[int, ParsedCall] = {}
    for e in events:
        if isinstance(e, str):
            content.append(e)
        elif e.index not in calls:
            calls[e.index] = ParsedCall(e.id or new_call_id(), e.name or "", e.arguments)
        else:
            calls[e.index].arguments += e.arguments
    text = "".join(content)
    return (text if text.strip() else None), [calls[k] for k in sorted(calls)]


__all__ = ["ParsedCall", "ToolCallDelta", "ToolCallParser", "collect", "parse_bare_json_calls",
           "parse_call_body", "parse_tool_calls"]
