"""The server and chat packages' layout rules: imports point one way (chat never imports the server; the server
never imports the library face `qwen25.llm` or the CLI), test doubles do not ship, files stay within budget."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qwen25"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def imports_any(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imported_modules(path) if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_chat_does_not_import_server_or_engine() -> None:
    for path in (PACKAGE / "chat").glob("*.py"):
        assert not imports_any(path, ("qwen25.server", "qwen25.engine", "qwen25.llm", "qwen25.cli")), path


def test_server_does_not_import_llm_or_cli() -> None:
    for path in (PACKAGE / "server").glob("*.py"):
        assert not imports_any(path, ("qwen25.llm", "qwen25.cli")), path


def test_test_doubles_do_not_ship() -> None:
    assert importlib.util.find_spec("qwen25.server.testing") is None
    assert importlib.util.find_spec("qwen25.server.tool_parser") is None


def test_file_budgets() -> None:
    sizes = {p: len(p.read_text().splitlines()) for d in ("server", "chat") for p in (PACKAGE / d).glob("*.py")}
    assert sizes[PACKAGE / "server" / "app.py"] < 300
    assert all(n <= 400 for n in sizes.values()), {p.name: n for p, n in sizes.items() if n > 400}
