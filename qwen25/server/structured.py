"""Structured output: grammar-constrained decoding with llguidance, applied as a logits processor.

Owns turning a request's constraint (a JSON schema, "any JSON object", a regex, a list of choices, a Lark
grammar, or "call one of these tools") into an llguidance grammar, validating it (a bad schema is a 400 with
llguidance's reason), and `GrammarLogitsProcessor`, which masks every token the grammar forbids before sampling.
The llguidance tokenizer is built once from our `tokenizers` backend (about 1.5 s) and shared.

Constrained text never contains control tokens: llguidance spells forced text with the tokenizer, which would turn
"<tool_call>" or "<|im_end|>" in a regex, a `const` or a choice into the control token, so the processor masks
every added token the grammar does not name itself (the tool-call grammar names `<tool_call>`) and, where that
leaves nothing, lets the grammar continue byte by byte (the text is the same, the tokens are plain). A constraint
no finite output satisfies (a required recursive `$ref`, a Lark rule that never ends) is refused when validated,
so it is a 400 at request time instead of an empty 200.

Cost per token: one `compute_bitmask` (Rust, typically 0.1-0.5 ms for JSON schemas) plus unpacking the bitmask
and one `torch.where` over the vocabulary (about 0.3 ms for Qwen's 151,936 ids); `benchmarks/bench_server.py`
measures it. JSON is generated with fixed separators (", " and ": ", as Python's json.dumps and the chat
template's tojson write it) and no free whitespace, so a small model cannot wander into endless newlines.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

# Separators as the Qwen2.5 template's `tojson` writes tool calls; no optional whitespace anywhere.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputError(ValueError):
    """A constraint that cannot be compiled (invalid JSON schema, regex or grammar); the message says why."""


def _llg():  # noqa: ANN202 - optional dependency, imported on first use
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - the [serve] extra installs it
        raise StructuredOutputError("structured output needs llguidance: pip install 'qwen25[serve]'") from e
    return llguidance


# --- grammars --------------------------------------------------------------------------------------
def json_schema_grammar(schema: dict[str, Any] | str | bool) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise StructuredOutputError(f"JSON schema is not valid JSON: {e}") from None
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise StructuredOutputError(f"JSON schema must be an object, got {type(schema).__name__}")
    problem = unsatisfiable(schema)
    if problem:
        raise StructuredOutputError(f"JSON schema cannot be satisfied: {problem}")
    try:
        return _llg().LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, RecursionError) as e:
        raise StructuredOutputError(f"invalid JSON schema: {str(e)[:500]}") from None


def unsatisfiable(schema: Any) -> str | None:
    """Why no finite JSON value can satisfy `schema` through its local `$ref`s (a property that is required and
    refers back to its own object, with no way out), or None. A least fixpoint over the subschemas: a schema is
    satisfiable once what it needs is (its required properties, minItems items, one anyOf branch, every allOf
    part, its $ref target); anything else counts as satisfiable, llguidance reports the other contradictions."""
    nodes: list[dict[str, Any]] = []
    stack, seen = [schema], set()
    while stack:
        node = stack.pop()
        if isinstance(node, dict) and id(node) not in seen:
            seen.add(id(node))
            nodes.append(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)

    def resolve(ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            return True  # remote or malformed: not ours to judge
        target: Any = schema
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                return True
        return target

    ok: set[int] = set()

    def good(s: Any) -> bool:
        return s is not False and (not isinstance(s, dict) or id(s) in ok)

    def satisfiable(s: dict[str, Any]) -> bool:
        if "$ref" in s and not good(resolve(s["$ref"])):
            return False
        if not all(good(x) for x in s.get("allOf") or []):
            return False
        for key in ("anyOf", "oneOf"):
            if isinstance(s.get(key), list) and s[key] and not any(good(x) for x in s[key]):
                return False
        types = s.get("type")
        types = [types] if isinstance(types, str) else types if isinstance(types, list) else None
        if types and not set(types) - {"object", "array"}:
            obj = "object" in types and all(good((s.get("properties") or {}).get(name, True))
                                           for name in s.get("required") or [] if isinstance(name, str))
            min_items = s.get("minItems", 0)
            items = s.get("items", True)
            arr = "array" in types and (not isinstance(min_items, int) or min_items <= 0 or good(items))
            return obj or arr
        return True

    for _ in range(len(nodes) + 1):  # each round marks at least one more node, or nothing changes
        grown = {id(n) for n in nodes if id(n) not in ok and satisfiable(n)}
        if not grown:
            break
        ok |= grown
    if good(schema):
        return None
    return "no finite value satisfies it (a required property or item refers back to its own schema)"


def json_object_grammar() -> str:
    return json_schema_grammar({"type": "object"})


def regex_grammar(pattern: str) -> str:
    return _llg().LLMatcher.grammar_from_regex(pattern)  # a bad regex surfaces when validated


def choice_grammar(choices: Sequence[str]) -> str:
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise StructuredOutputError("choice needs a non-empty list of non-empty strings")
    return lark_grammar("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))


def lark_grammar(text: str) -> str:
    return _llg().LLMatcher.grammar_from_lark(text)


def tool_call_grammar(tools: Iterable[dict[str, Any]], name: str | None = None, parallel: bool = True) -> str:
    """Output that is exactly Qwen2.5's tool-call format (SPEC §3.2) for one of `tools` (or the named one).

    `<tool_call>` and `</tool_call>` are single tokens in Qwen's vocabulary and are required as such (spelling them
    with ordinary tokens would be out of distribution); the arguments follow the tool's parameter schema."""
    functions = [t["function"] for t in tools]
    if name is not None:
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise StructuredOutputError(f"tool_choice names function {name!r}, which is not in tools")
    if not functions:
        raise StructuredOutputError("tool_choice 'required' needs at least one tool")
    rules = []
    for i, f in enumerate(functions):
        params = f.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise StructuredOutputError(f"tools[{f['name']}].function.parameters must be a JSON schema object")
        problem = unsatisfiable(params)
        if problem:
            raise StructuredOutputError(f"tools[{f['name']}].function.parameters cannot be satisfied: {problem}")
        params = {**params, "x-guidance": JSON_OPTIONS}
        prefix = json.dumps('{"name": ' + json.dumps(f["name"], ensure_ascii=False) + ', "arguments": ',
                            ensure_ascii=False)
        rules.append(f'fn_{i}: {prefix} %json {json.dumps(params, ensure_ascii=False)} "}}"')
    repeat = ' ("\\n" call)*' if parallel and name is None else ""
    lines = [f"start: call{repeat}", 'call: <tool_call> "\\n" body "\\n" </tool_call>',
             "body: " + " | ".join(f"fn_{i}" for i in range(len(functions))), *rules]
    return lark_grammar("\n".join(lines))


# --- runtime ---------------------------------------------------------------------------------------
TOOL_CALL_TOKENS = ("<tool_call>", "</tool_call>")  # the control tokens tool_call_grammar names


class StructuredOutputs:
    """The llguidance tokenizer for one model plus grammar validation and matcher creation."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(set(eos_token_ids))
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()
        added = getattr(tokenizer, "added_ids", frozenset())
        self.control_ids = frozenset(added)  # never inside constrained text (end-of-sequence only at its end)
        self.byte_ids = _byte_token_ids(tokenizer)  # the fallback spelling of forced control-token text

    @property
    def ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                llg = _llg()
                self._ll_tokenizer = llg.LLTokenizer(self._tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                     eos_token=self.eos_token_ids or None)
            return self._ll_tokenizer

    def validate(self, grammar: str, what: str = "grammar", allow: Sequence[str] = ()) -> None:
        """StructuredOutputError unless llguidance accepts the grammar and some finite output satisfies it (the
        probe consumes the tokens it forces from the start: an endless forced run errors inside llguidance)."""
        llg = _llg()
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            raise StructuredOutputError(f"invalid {what}: {messages[0][:500] if messages else 'unknown error'}")
        matcher = llg.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if not matcher.is_error():
            forced = matcher.compute_ff_tokens()
            own = {self._tokenizer.token_to_id(t) for t in allow}  # control tokens the grammar names itself
            controls = [i for i, t in enumerate(forced) if t in self.control_ids and t not in own]
            # llguidance spells forced "<tool_call>" text as the control token, which it then refuses; the
            # processor spells it in plain bytes instead, so the probe stops there
            matcher.consume_tokens(forced[:controls[0]] if controls else forced)
        if matcher.is_error():
            reason = matcher.get_error().split("\n", 1)[0][:300]
            raise StructuredOutputError(f"{what} cannot be satisfied by any finite output ({reason})")

    def processor(self, grammar: str, allow: Sequence[str] = ()) -> GrammarLogitsProcessor:
        """A fresh processor; `allow`: control tokens the grammar names itself (e.g. TOOL_CALL_TOKENS)."""
        matcher = _llg().LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(f"invalid grammar: {matcher.get_error()}")
        allowed = {self._tokenizer.token_to_id(t) for t in allow}
        banned = sorted(t for t in self.control_ids - allowed if t < self.vocab_size)
        return GrammarLogitsProcessor(matcher, self.vocab_size, self.eos_token_ids, banned, self.byte_ids)


def _byte_token_ids(tokenizer: Any) -> list[int]:
    """The ids of the 256 single-byte tokens a byte-level BPE vocabulary has (those it has, at least)."""
    from qwen25.tokenizer.bpe import BYTE_TO_CHAR

    ids = [tokenizer.token_to_id(BYTE_TO_CHAR[b]) for b in range(256)] if hasattr(tokenizer, "token_to_id") else []
    return [i for i in ids if i is not None]


class GrammarLogitsProcessor:
    """`(output_token_ids, logits) -> logits` with every token the grammar forbids set to -inf.

    Stateful per sequence: it consumes the tokens generated since its last call, then masks. Once the grammar is
    complete only the end-of-sequence tokens stay allowed, so the engine stops on its own. `banned` control
    tokens stay masked even where the grammar would take them; if that leaves nothing, the single-byte tokens
    the grammar accepts are allowed instead (forced text such as "<tool_call>" is then spelled in plain bytes)."""

    def __init__(self, matcher: Any, vocab_size: int, eos_token_ids: Sequence[int], banned: Sequence[int] = (),
                 byte_ids: Sequence[int] = ()) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.banned = torch.tensor(list(banned), dtype=torch.long)
        self.byte_ids = list(byte_ids)
        self.consumed = 0
        self.mask_seconds = 0.0
        self.steps = 0
        self._neg_inf: torch.Tensor | None = None

    @property
    def error(self) -> str:
        return self.matcher.get_error() if self.matcher.is_error() else ""

    def allowed(self, V: int) -> torch.Tensor:
        """The (V,) boolean mask of tokens allowed next."""
        if self.matcher.is_error():
            allowed = torch.zeros(V, dtype=torch.bool)
            allowed[[t for t in self.eos_token_ids if t < V]] = True
            return allowed
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        if bits.shape[0] < V:
            bits = np.concatenate([bits, np.zeros(V - bits.shape[0], dtype=np.uint8)])
        allowed = torch.from_numpy(bits[:V].view(np.bool_))
        if len(self.banned) and bool(allowed[self.banned].any()):
            allowed = allowed.clone()
            allowed[self.banned] = False
            if self.matcher.is_accepting():  # the end-of-sequence tokens: as the end, not as forced text
                allowed[[t for t in self.eos_token_ids if t < V]] = True
            if not bool(allowed.any()):
                plain = [t for t in self.byte_ids if t < V and self.matcher.validate_tokens([t]) == 1]
                allowed[plain or [t for t in self.eos_token_ids if t < V]] = True
        return allowed

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        for token in output_ids[self.consumed:]:
            self.matcher.consume_token(int(token))  # a rejected token puts the matcher in its error state
        self.consumed = len(output_ids)
        V = logits.shape[-1]
        allowed = self.allowed(V)
        if self._neg_inf is None or self._neg_inf.shape[-1] != V or self._neg_inf.dtype != logits.dtype:
            self._neg_inf = torch.full((V,), float("-inf"), dtype=logits.dtype)
        out = torch.where(allowed, logits, self._neg_inf)
        self.mask_seconds += time.perf_counter() - start
        self.steps += 1
        return out


class LogitBiasProcessor:
    """OpenAI `logit_bias`: add a fixed bias to chosen token ids (-100 bans, +100 all but forces)."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., self.ids] += self.values.to(logits.dtype)
        return logits


__all__ = ["TOOL_CALL_TOKENS", "GrammarLogitsProcessor", "LogitBiasProcessor", "StructuredOutputError", "StructuredOutputs",
           "choice_grammar", "json_object_grammar", "json_schema_grammar", "lark_grammar", "regex_grammar",
           "tool_call_grammar", "unsatisfiable"]
