"""The package's import graph, read statically with `ast`: no cycles between modules, no forbidden arrows, and no
source file over the size budget.

What counts as an import: every `import` / `from ... import` statement anywhere in a module, top level or inside
a function (a function-local import is still a dependency; it only hides a cycle until the function runs).
Relative imports are resolved against the importing module's package. `from pkg import name` is an arrow to
`pkg.name` when that is a module, else to `pkg`. Importing `a.b.c` is an arrow to `a.b.c` only: the parents'
`__init__` modules that Python runs on the way are not counted (`qwen25/__init__.py` re-exports the public API,
so every module would otherwise sit in one cycle with it).

Imports under `if TYPE_CHECKING:` never run, so they cannot form an import cycle and are left out of the cycle
check; they still count for the forbidden arrows, because a type annotation naming an upper layer is the same
layering mistake as calling into it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qwen25"
MAX_LINES = 400
LINE_BUDGET_EXEMPT = {"qwen25/kernels/forward.c"}  # the fused native forward: one translation unit by design

# (importer prefix, imported prefixes, why). A prefix matches the module itself and everything under it.
FORBIDDEN = [
    ("qwen25.engine", ("qwen25.llm", "qwen25.server", "qwen25.cli"),
     "the engine is below the faces that use it (LLM, the server, the CLI)"),
    ("qwen25.model", ("qwen25.engine", "qwen25.kernels"),
     "the model holds weights and math only; engines and native kernels are built around it"),
    ("qwen25.tokenizer", ("qwen25.weights",), "the tokenizer is handed GGUF metadata, it does not read files"),
    ("qwen25.kernels", ("qwen25.weights",), "kernels are below the weight loaders (paths live in qwen25.paths)"),
    ("qwen25.weights", ("qwen25.tokenizer", "qwen25.chat", "qwen25.checkpoint", "qwen25.engine", "qwen25.server",
                        "qwen25.llm"),
     "weights/ loads weights and config only; qwen25.checkpoint assembles the rest"),
    ("qwen25", ("qwen25.cli",), "nothing imports the command line (its settings come from qwen25.runtime)"),
]


@dataclass(frozen=True)
class Arrow:
    source: str  # importing module
    target: str  # imported module
    file: str  # repository-relative path of the importing file
    line: int
    statement: str  # the import as written
    type_checking: bool  # inside `if TYPE_CHECKING:`

    def __str__(self) -> str:
        tag = " (TYPE_CHECKING)" if self.type_checking else ""
        return f"{self.file}:{self.line}: `{self.statement}`{tag}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it sits under `if TYPE_CHECKING:` (its else branch runs)."""
    def visit(node: ast.AST, guarded: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, guarded
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, True)
            for child in node.orelse:
                yield from visit(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            yield from visit(child, guarded)

    yield from visit(tree, False)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module `name` refers to (the longest known prefix), or None outside the package."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def arrows(modules: dict[str, Path] | None = None) -> list[Arrow]:
    modules = modules or package_modules()
    found: list[Arrow] = []
    for source, path in modules.items():
        rel = str(path.relative_to(ROOT))
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        for node, guarded in _imports(tree):
            text = ast.unparse(node)
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in dict.fromkeys(targets):
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != source:
                    found.append(Arrow(source, resolved, rel, node.lineno, text, guarded))
    return found


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def forbidden_arrows(found: list[Arrow]) -> list[tuple[Arrow, str]]:
    bad = []
    for arrow in found:
        for importer, imported, why in FORBIDDEN:
            if _under(arrow.source, importer) and any(_under(arrow.target, t) for t in imported):
                bad.append((arrow, why))
                break
    return bad


def cycles(found: list[Arrow]) -> list[list[Arrow]]:
    """One concrete cycle per strongly connected component of the run-time graph (Tarjan's algorithm)."""
    graph: dict[str, dict[str, Arrow]] = {}
    for arrow in found:
        if not arrow.type_checking:
            graph.setdefault(arrow.source, {}).setdefault(arrow.target, arrow)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # recursion depth is bounded by the package's module count
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    result = []
    for component in components:
        members, start = set(component), component[0]
        # breadth-first from start back to itself inside the component: the shortest cycle through it
        parent: dict[str, Arrow] = {}
        frontier, seen = [start], {start}
        while frontier and start not in parent:
            nxt = []
            for v in frontier:
                for w, arrow in sorted(graph.get(v, {}).items()):
                    if w in members and w == start and start not in parent:
                        parent[start] = arrow
                    elif w in members and w not in seen:
                        seen.add(w)
                        parent[w] = arrow
                        nxt.append(w)
            frontier = nxt
        path, v = [], start
        while True:
            arrow = parent[v]
            path.append(arrow)
            v = arrow.source
            if v == start:
                break
        result.append(path[::-1])
    return result


# --- the tests ------------------------------------------------------------------------------------------------
def test_the_reader_sees_local_relative_and_type_checking_imports(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The graph reader itself, on a throwaway package: a function-local import and a relative import count
    for cycles, a TYPE_CHECKING import does not (but is still an arrow)."""
    pkg = tmp_path / "qwen25"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "sub" / "b.py").write_text("from qwen25.sub.a import f\nfrom typing import TYPE_CHECKING\n"
                                      "if TYPE_CHECKING:\n    from qwen25 import c\n")
    (pkg / "c.py").write_text("from .sub import b\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    modules = {module_name(p): p for p in sorted(pkg.rglob("*.py"))}
    found = arrows(modules)
    assert {(a.source, a.target, a.type_checking) for a in found} == {
        ("qwen25.sub.a", "qwen25.sub.b", False), ("qwen25.sub.b", "qwen25.sub.a", False),
        ("qwen25.sub.b", "qwen25.c", True), ("qwen25.c", "qwen25.sub.b", False)}
    (cycle,) = cycles(found)
    assert {a.source for a in cycle} == {"qwen25.sub.a", "qwen25.sub.b"}


def test_no_import_cycles() -> None:
    found = cycles(arrows())
    report = "\n\n".join("cycle " + " -> ".join([c[0].source] + [a.target for a in c]) + ":\n"
                         + "\n".join(f"  {a}" for a in c) for c in found)
    assert not found, f"{len(found)} import cycle(s) between qwen25 modules:\n\n{report}"


def test_no_forbidden_arrows() -> None:
    bad = forbidden_arrows(arrows())
    report = "\n".join(f"  {arrow} imports {arrow.target}: {why}" for arrow, why in bad)
    assert not bad, f"{len(bad)} forbidden import(s):\n{report}"


def test_every_package_file_is_within_the_line_budget() -> None:
    sizes = {}
    for path in sorted(PACKAGE.rglob("*")):
        rel = str(path.relative_to(ROOT))
        if not path.is_file() or "__pycache__" in path.parts or rel in LINE_BUDGET_EXEMPT:
            continue
        try:
            sizes[rel] = path.read_text(encoding="utf-8").count("\n")
        except UnicodeDecodeError:
            continue  # a built binary (e.g. a compiled kernel), not source
    over = {rel: n for rel, n in sizes.items() if n > MAX_LINES}
    assert sizes and not over, "split by responsibility: " + ", ".join(f"{r} ({n} lines)" for r, n in over.items())
