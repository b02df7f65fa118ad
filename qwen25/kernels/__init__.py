"""Native CPU kernels: C sources compiled on first use with the system C compiler, cached, loaded via ctypes.

A kernel library is built once per source version and ISA level into the qwen25 cache (`<cache>/kernels/`), with
that level's `-m` flags; the level is the best the CPU supports, or $QWEN25_ISA (`qwen25.kernels.isa`). A fresh
clone needs only gcc (or cc). When no compiler, no AVX2 or QWEN25_ISA=none, the loaders return None and callers
use their pure-torch fallback. `kernels_line()` says which kernels run here.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

from qwen25.kernels.isa import COMPILE_FLAGS, describe, selected_level
from qwen25.paths import kernels_dir

_HERE = Path(__file__).parent
_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared"]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _with_includes(source: Path, seen: frozenset[Path] = frozenset()) -> bytes:
    """The source's bytes followed by those of its local `#include "..."` files, recursively (for the cache key)."""
    text = source.read_bytes()
    names = re.findall(rb'#include "([^"]+)"', text)
    parts = [_with_includes(source.parent / n.decode(), seen | {source}) for n in names
             if source.parent / n.decode() not in seen]
    return text + b"".join(parts)


def build_library(source: Path, level: str, defines: tuple[str, ...] = ()) -> Path | None:
    """`source` (and its local includes) compiled for `level`, cached by their content; None without a compiler
    (a failed build warns). benchmarks/ab_forward_builds.py builds other trees' sources with it."""
    compiler = _compiler()
    if compiler is None:
        return None
    flags = [*_FLAGS, *COMPILE_FLAGS[level], *(f"-D{d}" for d in defines)]
    digest = hashlib.sha256(_with_includes(source) + " ".join(flags).encode()).hexdigest()[:16]  # an include too
    target = kernels_dir() / f"{source.stem}-{level}-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, str(source), "-o", str(out)], capture_output=True, text=True)
        if result.returncode != 0:
            warnings.warn(f"building {source.name} failed; using the slower PyTorch path:\n{result.stderr[-2000:]}",
                          RuntimeWarning, stacklevel=3)
            return None
        os.replace(out, target)  # atomic: concurrent builders never see a half-written library
    return target


def _level(level: str | None) -> str:
    """`level`, or the selected one; a level the CPU lacks raises ValueError naming the missing features."""
    if level is None:
        return selected_level()
    from qwen25.kernels.isa import missing

    lacking = missing(level)
    if lacking:
        raise ValueError(f"the {level} kernels cannot run on this CPU: it lacks {', '.join(lacking)}")
    return level


@functools.lru_cache(maxsize=16)
def _load_level(source: Path, level: str, defines: tuple[str, ...]) -> ctypes.CDLL | None:
    if level == "none":
        return None
    path = build_library(source, level, defines)
    return None if path is None else ctypes.CDLL(str(path))


def _load(source: Path, defines: tuple[str, ...] = (), level: str | None = None) -> ctypes.CDLL | None:
    return _load_level(source, _level(level), defines)


def kernels_line() -> str:
    """Which kernels run here, for `qwen25 models --paths` and the benchmarks: the CPU, its features, the level
    and whether its build works (no compiler, or a failed build: the PyTorch modules)."""
    line = describe()
    try:
        level = selected_level()
    except ValueError:
        return line
    if level != "none" and load_forward_kernel() is None:
        line += "; the build failed or no C compiler: PyTorch modules run"
    return line


_P, _I = ctypes.c_void_p, ctypes.c_int


def _load_declared(source: Path, functions: dict[str, tuple[list, Any]], level: str | None) -> ctypes.CDLL | None:
    """_load(source) with each function's (argtypes, restype) declared."""
    lib = _load(source, level=level)
    if lib is None:
        return None
    for name, (argtypes, restype) in functions.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
    return lib


def load_forward_kernel(level: str | None = None) -> ctypes.CDLL | None:
    """The fused whole-model forward (`forward.c`) built for `level` (default: the selected one), or None when it
    cannot be built here. Argument types are declared by its caller, `qwen25.kernels.native`, next to the mirrored
    structs."""
    return _load(_HERE / "forward.c", level=level)


def load_ggml_kernels(level: str | None = None) -> ctypes.CDLL | None:
    """The matmuls on ggml weight blocks (`ggml_dot.c`) built for `level` (default: the selected one), or None
    when they cannot be built here."""
    return _load_declared(_HERE / "ggml_dot.c", {"ggml_matmul": ([_I, _P, _I, _I, _P, _I, _P], _I),
                                                  "ggml_dot_supports": ([_I], _I),
                                                  "ggml_dequantize_rows": ([_I, _P, _I, _P, _I, _P], _I)}, level)
