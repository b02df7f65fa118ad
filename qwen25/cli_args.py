"""Dataclass -> argparse: a run config written once as a typed dataclass becomes a (sub)command's flags.

Each field becomes `--kebab-case` with its type's parsing: `int`, `float`, `str`, `Path`; `X | None`;
`Literal[...]` (choices); `bool` (a `--flag` switch when False by default, `--flag/--no-flag` when True);
`list[X]` (a repeatable flag, or `nargs` from the field's metadata). The help text is the field's attribute
docstring (the string right below it, as litgpt does) or `arg(help=...)`, with the default appended unless
the text names it. A field defined in a class with a `cli_group` attribute lands in that argument group.
Every command also takes `--config FILE` (TOML, JSON, or YAML when PyYAML is installed) whose keys are the
flags' names (`max-tokens` or `max_tokens`); flags given on the command line override the file.

Parsing returns the dataclass: `parse_args(parser, argv)` then `ns.func(ns)` runs `main(Config(...))`.
This module knows nothing about qwen25's commands; `qwen25.cli` and the `cli` modules under it use it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

__all__ = ["add_command", "arg", "config_from_namespace", "load_config_file", "parse_args"]


def arg(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, help: str | None = None,
        short: str | None = None, positional: bool = False, metavar: str | None = None,
        nargs: int | str | None = None) -> Any:
    """A dataclass field with command-line details: a short alias (`-m`), a positional argument, a metavar."""
    meta = {k: v for k, v in dict(help=help, short=short, positional=positional, metavar=metavar,
                                  nargs=nargs).items() if v not in (None, False)}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"cli": meta})


# --- reading a dataclass --------------------------------------------------------------------------------------
@functools.cache
def _attribute_docstrings(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literals right below annotated fields, over the class hierarchy."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _group_title(cls: type, name: str) -> str | None:
    """The `cli_group` of the class that defines field `name` (the most derived one), if it has one."""
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return klass.__dict__.get("cli_group")
    return None


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _convert(tp: Any, value: Any, where: str) -> Any:
    """`value` (from a config file) checked against / converted to the field type `tp`."""
    if value is None:
        return None
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            value = [value]
        (item,) = typing.get_args(tp)[:1] or (str,)
        return [_convert(item, v, where) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp in (int, float, str, Path):
        if isinstance(value, bool) or (tp is int and isinstance(value, float)):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


class _ListAction(argparse.Action):
    """A repeatable flag whose first use on the command line replaces the default (a config file's list)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, [*items, values])


# --- building parsers -----------------------------------------------------------------------------------------
def _add_field(target: Any, f: dataclasses.Field, tp: Any, doc: str | None) -> None:
    meta = dict(f.metadata.get("cli", {}))
    default = _default(f)
    text = (meta.get("help") or doc or "").replace("%", "%%")  # argparse %-formats help strings
    shown = not (any(default is x for x in (None, False, True, dataclasses.MISSING)) or default == [])
    if shown and "default" not in text:  # (argparse itself appends it for --flag/--no-flag)
        text = f"{text} (default: {default})".strip()
    kwargs: dict[str, Any] = {"help": text or None}
    inner = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = list(typing.get_args(inner))
        kwargs.update(choices=choices, type=type(choices[0]))
    elif origin in (list, tuple):
        item = (typing.get_args(inner) or (str,))[0]
        kwargs["type"] = item
        if "nargs" in meta:
            kwargs["nargs"] = meta["nargs"]
        else:
            kwargs["action"] = _ListAction
    elif inner is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if default is True else "store_true"
    else:
        kwargs["type"] = inner
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    if meta.get("positional"):
        if default is not dataclasses.MISSING:
            kwargs["nargs"] = kwargs.get("nargs", "?")
            kwargs["default"] = default
        target.add_argument(f.name, **kwargs)
        return
    flags = [f"--{f.name.replace('_', '-')}"] + ([meta["short"]] if "short" in meta else [])
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    target.add_argument(*flags, dest=f.name, **kwargs)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per init field of dataclass `cls` (groups from `cli_group`), and `--config FILE`."""
    hints = typing.get_type_hints(cls)
    docs = _attribute_docstrings(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        title = _group_title(cls, f.name)
        target = parser if title is None else groups.setdefault(title, parser.add_argument_group(title))
        _add_field(target, f, hints[f.name], docs.get(f.name))
    parser.add_argument("--config", dest="config_file", metavar="FILE", default=None,
                        help="read these options from a TOML/JSON/YAML file whose keys are the flag names; flags "
                             "given here override it")
    parser.set_defaults(_cli_parser=parser, _cli_config=cls)


def add_command(subparsers: Any, name: str, cls: type, main: Callable[[Any], int], *, help: str,
                description: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose flags are `cls`'s fields; running it calls `main(cls(...))`."""
    p = subparsers.add_parser(name, help=help, description=description or help, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, cls)
    p.set_defaults(func=functools.partial(_run, cls, main))
    return p


def config_from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    """The dataclass instance the parsed flags describe (its __post_init__ validates)."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init})


def _run(cls: type, main: Callable[[Any], int], ns: argparse.Namespace) -> int:
    return main(config_from_namespace(cls, ns))


# --- config files -------------------------------------------------------------------------------------------
def load_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping from a .toml, .json or .yaml/.yml file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json", ".yaml", ".yml"):
        raise ValueError(f"--config {path}: unknown format (use .toml, .json, .yaml or .yml)")
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {path}: YAML needs PyYAML (pip install pyyaml); TOML and JSON work "
                             "without it") from None
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as e:  # tomllib/json/yaml parse errors: one readable line
        raise ValueError(f"--config {path}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a table of option = value, got {type(data).__name__}")
    return data


def _file_defaults(cls: type, path: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("cli", {}).get("positional")}
    values = {}
    for key, value in load_config_file(path).items():
        name = str(key).replace("-", "_")
        if name not in known:
            flags = ", ".join(n.replace("_", "-") for n in known)
            raise ValueError(f"--config {path}: unknown option {key!r} (known: {flags})")
        values[name] = _convert(hints[name], value, f"--config {path}: {key}")
    return values


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with the values of a `--config FILE` as defaults that the flags override."""
    ns = parser.parse_args(argv)
    path = getattr(ns, "config_file", None)
    if path:
        sub: argparse.ArgumentParser = ns._cli_parser
        sub.set_defaults(**_file_defaults(ns._cli_config, path))
        ns = parser.parse_args(argv)
    return ns
