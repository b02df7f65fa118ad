"""JSON reward: 1.0 when the completion holds a JSON value that satisfies a JSON Schema, else 0.0.

The JSON is the first ```json (or bare ```) block of the completion, else the whole text, else the first
value that parses starting at a `{` or `[`. The schema is `example["schema"]` or the one given to the reward.

`validate(instance, schema)` is a small validator for the JSON Schema (draft 2020-12) keywords structured
output uses: type (also a list; integers are numbers, booleans are not), enum, const, properties, required,
additionalProperties, patternProperties, minProperties/maxProperties, items, prefixItems, minItems/maxItems,
uniqueItems, contains, minLength/maxLength (code points), pattern (Python `re.search`), minimum/maximum,
exclusiveMinimum/exclusiveMaximum, multipleOf, allOf/anyOf/oneOf/not, and $ref to "#", "#/$defs/..." or
"#/definitions/...". Annotations (title, description, default, examples, format, $schema, $id, $comment) are
ignored, as 2020-12 does by default. Any other keyword raises ValueError: a schema this validator cannot check
is refused rather than passed silently. (jsonschema is not a product dependency; the tests check this one
against it.)
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from qwen25.eval.sanitize import code_blocks

__all__ = ["JsonSchemaReward", "extract_json", "validate"]

_ANNOTATIONS = {"title", "description", "default", "examples", "format", "$schema", "$id", "$comment",
                "deprecated", "readOnly", "writeOnly", "$defs", "definitions"}
_CHECKED = {"type", "enum", "const", "properties", "required", "additionalProperties", "patternProperties",
            "minProperties", "maxProperties", "items", "prefixItems", "minItems", "maxItems", "uniqueItems",
            "contains", "minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum",
            "exclusiveMaximum", "multipleOf", "allOf", "anyOf", "oneOf", "not", "$ref"}
_MISSING = object()


def _is_type(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    raise ValueError(f"JSON Schema type {name!r} is not a JSON type")


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def _resolve(ref: str, root: dict) -> Any:
    if not ref.startswith("#"):
        raise ValueError(f"$ref {ref!r}: only references inside the schema ('#/...') are supported")
    node: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"$ref {ref!r} does not resolve")
        node = node[part]
    return node


def _errors(value: Any, schema: Any, root: dict, depth: int = 0) -> bool:
    """True when `value` violates `schema`."""
    if depth > 64:
        raise ValueError("schema recursion deeper than 64 levels")
    if schema is True or schema == {}:
        return False
    if schema is False:
        return True
    if not isinstance(schema, dict):
        raise ValueError(f"a schema must be an object or a boolean, got {type(schema).__name__}")
    unknown = set(schema) - _CHECKED - _ANNOTATIONS
    if unknown:
        raise ValueError(f"JSON Schema keyword(s) {sorted(unknown)} are not supported by this validator")
    sub = lambda v, s: _errors(v, s, root, depth + 1)  # noqa: E731
    if "$ref" in schema and sub(value, _resolve(schema["$ref"], root)):
        return True
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            return True
    if "enum" in schema and not any(_equal(value, e) for e in schema["enum"]):
        return True
    if schema.get("const", _MISSING) is not _MISSING and not _equal(value, schema["const"]):
        return True
    if "allOf" in schema and any(sub(value, s) for s in schema["allOf"]):
        return True
    if "anyOf" in schema and all(sub(value, s) for s in schema["anyOf"]):
        return True
    if "oneOf" in schema and sum(not sub(value, s) for s in schema["oneOf"]) != 1:
        return True
    if "not" in schema and not sub(value, schema["not"]):
        return True
    if isinstance(value, str):
        n = len(value)
        if n < schema.get("minLength", 0) or n > schema.get("maxLength", math.inf):
            return True
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", -math.inf) or value > schema.get("maximum", math.inf):
            return True
        if value <= schema.get("exclusiveMinimum", -math.inf) or value >= schema.get("exclusiveMaximum", math.inf):
            return True
        if "multipleOf" in schema:
            q = value / schema["multipleOf"]
            if not (math.isfinite(q) and abs(q - round(q)) < 1e-9):
                return True
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            return True
        if schema.get("uniqueItems") and any(_equal(value[i], value[j]) for i in range(len(value))
                                             for j in range(i)):
            return True
        prefix = schema.get("prefixItems", [])
        if any(sub(v, s) for v, s in zip(value, prefix)):
            return True
        if "items" in schema and any(sub(v, schema["items"]) for v in value[len(prefix):]):
            return True
        if "contains" in schema and all(sub(v, schema["contains"]) for v in value):
            return True
    if isinstance(value, dict):
        if any(k not in value for k in schema.get("required", [])):
            return True
        if not schema.get("minProperties", 0) <= len(value) <= schema.get("maxProperties", math.inf):
            return True
        properties, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
        for key, item in value.items():
            matched = False
            if key in properties:
                matched = True
                if sub(item, properties[key]):
                    return True
            for pattern, s in patterns.items():
                if re.search(pattern, key):
                    matched = True
                    if sub(item, s):
                        return True
            if not matched and "additionalProperties" in schema and sub(item, schema["additionalProperties"]):
                return True
    return False


def validate(instance: Any, schema: Any) -> bool:
    """Whether `instance` satisfies `schema` (ValueError for a schema using unsupported keywords)."""
    return not _errors(instance, schema, schema if isinstance(schema, dict) else {})


def extract_json(text: str) -> Any:
    """The JSON value in a completion (see the module docstring); ValueError when there is none."""
    candidates = [body for lang, body in code_blocks(text) if lang in ("json", "")] + [text]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            return decoder.raw_decode(text, match.start())[0]
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON value in the text")


class JsonSchemaReward:
    """JSON that satisfies a schema (see the module docstring)."""

    def __init__(self, name: str = "json", schema: dict | None = None) -> None:
        self.name, self.schema = name, schema
        if schema is not None:
            _check_keywords(schema)

    def __call__(self, prompts: list[str], completions: list[str], examples: list[dict]) -> list[float]:
        scores = []
        for completion, example in zip(completions, examples, strict=True):
            schema = example.get("schema", self.schema)
            if schema is None:
                raise KeyError("no schema: give the reward one or put 'schema' in the example")
            try:
                value = extract_json(completion)
            except ValueError:
                scores.append(0.0)
                continue
            scores.append(1.0 if validate(value, schema) else 0.0)
        return scores


def _check_keywords(schema: Any) -> None:
    """ValueError now for a keyword the validator would refuse later (walks every sub-schema)."""
    if isinstance(schema, dict):
        unknown = set(schema) - _CHECKED - _ANNOTATIONS
        if unknown:
            raise ValueError(f"JSON Schema keyword(s) {sorted(unknown)} are not supported by this validator")
        for key, value in schema.items():
            if key in ("properties", "patternProperties", "$defs", "definitions"):
                for s in value.values():
                    _check_keywords(s)
            elif key in ("allOf", "anyOf", "oneOf", "prefixItems"):
                for s in value:
                    _check_keywords(s)
            elif key in ("items", "not", "additionalProperties", "contains"):
                _check_keywords(value)
