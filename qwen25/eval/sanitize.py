"""Code out of a model reply: fenced-block extraction and the sanitizer (HumanEval, CHAMP program-of-thought).

Sanitizer (our own, in the spirit of evalplus.sanitize): take the code (up to a closing fence), keep the longest
prefix of lines that parses (a completion cut by max_tokens still yields its complete functions), then keep
only the top-level imports, plus the definitions (functions, classes, assignments) reachable by name from the
entry point. Test scaffolding, example calls, prints and `if __name__ == "__main__":` blocks are dropped.
"""

from __future__ import annotations

import ast
import re
from typing import Any

__all__ = ["PYTHON_LANGS", "code_blocks", "defines", "extract_code", "sanitize", "test_names"]

_FENCE = re.compile(r"^```[ \t]*([\w+-]*)[ \t]*$", re.MULTILINE)


def extract_code(text: str, inside_block: bool) -> str:
    """The code in a model reply. inside_block: the reply continues an already opened ```python block
    (the instruct pre-fill), so the code is everything up to the first closing fence. Otherwise the first
    ```python (or bare ```) block if there is one, else the whole text."""
    if inside_block:
        match = _FENCE.search(text)
        return text[: match.start()] if match else text
    blocks = code_blocks(text)
    for lang, body in blocks:
        if lang in PYTHON_LANGS:
            return body
    return blocks[0][1] if blocks else text


PYTHON_LANGS = ("python", "py", "python3")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """Fenced blocks in order as (language, body): a fence line opens a block, the next fence line closes it
    (an unclosed last block runs to the end of the text)."""
    blocks: list[tuple[str, str]] = []
    lang: str | None = None
    body: list[str] = []
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if lang is None:
            if stripped.startswith("```"):
                lang, body = stripped[3:].strip().lower(), []
        elif stripped.startswith("```"):
            blocks.append((lang, "".join(body)))
            lang = None
        else:
            body.append(line)
    if lang is not None:
        blocks.append((lang, "".join(body)))
    return blocks


def _longest_parsable_prefix(code: str) -> tuple[str, ast.Module | None]:
    lines = code.splitlines(keepends=True)
    for end in range(len(lines), 0, -1):
        chunk = "".join(lines[:end])
        try:
            return chunk, ast.parse(chunk)
        except (SyntaxError, ValueError):
            continue
    return "", None


def _best_parsable_chunk(code: str, max_lines: int = 200) -> tuple[str, ast.Module | None]:
    """Fallback: the contiguous run of lines that parses and has the most non-blank lines (evalplus-style)."""
    lines = code.splitlines(keepends=True)[:max_lines]
    best: tuple[int, str, ast.Module | None] = (0, "", None)
    for start in range(len(lines)):
        for end in range(len(lines), start, -1):
            weight = sum(1 for ln in lines[start:end] if ln.strip())
            if weight <= best[0]:
                break
            chunk = "".join(lines[start:end])
            try:
                tree = ast.parse(chunk)
            except (SyntaxError, ValueError):
                continue
            best = (weight, chunk, tree)
            break
    return best[1], best[2]


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    names = []
    for t in targets:
        names += [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]
    return names


def _used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _node_source(lines: list[str], node: ast.stmt) -> str:
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "".join(lines[start - 1: node.end_lineno])


def sanitize(code: str, entry_point: str, test_names: frozenset[str] | set[str] = frozenset()) -> str:
    """Imports + the entry point + every top-level definition it needs (transitively), in source order.

    test_names: names the tests use; those the code defines are kept too (HumanEval/50's tests call the
    prompt's `encode_shift` helper, which the entry point `decode_shift` does not). Returns "" when no part of the code parses; if the entry point is not defined, the imports and all
    top-level definitions are kept (the caller decides whether that is usable)."""
    chunk, tree = _longest_parsable_prefix(code)
    if tree is None or entry_point not in {n for s in tree.body for n in _defined_names(s)}:
        alt_chunk, alt_tree = _best_parsable_chunk(code)
        if alt_tree is not None and (tree is None or entry_point in {n for s in alt_tree.body
                                                                     for n in _defined_names(s)}):
            chunk, tree = alt_chunk, alt_tree
    if tree is None:
        return ""
    lines = chunk.splitlines(keepends=True)
    definitions: dict[str, list[ast.stmt]] = {}
    for stmt in tree.body:
        for name in _defined_names(stmt):
            definitions.setdefault(name, []).append(stmt)
    keep: set[int] = set()
    if entry_point in definitions:
        todo = [entry_point] + sorted(set(test_names) & set(definitions))
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if name in seen or name not in definitions:
                continue
            seen.add(name)
            for stmt in definitions[name]:
                keep.add(id(stmt))
                todo += sorted(_used_names(stmt) - seen)
    else:
        keep = {id(s) for s in tree.body if _defined_names(s) and not isinstance(s, ast.AugAssign)}
    parts = []
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)) or id(stmt) in keep:
            parts.append(_node_source(lines, stmt).rstrip() + "\n")
    return "\n".join(parts)


def defines(code: str, name: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(name in _defined_names(s) for s in tree.body)


def test_names(problem: dict[str, Any]) -> frozenset[str]:
    try:
        return frozenset(_used_names(ast.parse(problem["test"])))
    except SyntaxError:
        return frozenset()
