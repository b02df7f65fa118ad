"""Native CPU kernels: C sources compiled on first use with the system C compiler, cached, loaded via ctypes.

A kernel library is built once per source version into the qwen25 cache (`<cache>/kernels/`), so a fresh clone
needs only gcc (or cc) with AVX2 support. When no compiler or no AVX2 is available, `load_q8_kernels()` /
`load_q4_kernels()` return None and callers use their pure-torch fallback.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

from qwen25.paths import kernels_dir

_HERE = Path(__file__).parent
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared"]


def _cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags and " f16c" in flags  # the q4 kernels convert fp16 scales


def _build(source: Path, defines: tuple[str, ...] = ()) -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    flags = [*_FLAGS, *(f"-D{d}" for d in defines)]
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    target = kernels_dir() / f"{source.stem}-{digest}.so"
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


def _load(source: Path, defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    if os.environ.get("QWEN25_NO_NATIVE") or not _cpu_has_avx2():
        return None
    path = _build(source, defines)
    return None if path is None else ctypes.CDLL(str(path))


_P, _I = ctypes.c_void_p, ctypes.c_int


def _load_declared(source: Path, functions: dict[str, tuple[list, Any]]) -> ctypes.CDLL | None:
    """_load(source) with each function's (argtypes, restype) declared."""
    lib = _load(source)
    if lib is None:
        return None
    for name, (argtypes, restype) in functions.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
    return lib


@functools.lru_cache(maxsize=1)
def load_q8_kernels() -> ctypes.CDLL | None:
    """The int8 weight-only matmul library, or None when it cannot be built here."""
    return _load_declared(_HERE / "q8_matmul.c", {"q8_matmul": ([_P, _P, _P, _I, _P, _P, _I, _I, _I], None),
                                                   "q8_dequantize": ([_P, _P, _I, _P, _I, _I], None)})


@functools.lru_cache(maxsize=1)
def load_q4_kernels() -> ctypes.CDLL | None:
    """The int4 weight-only matmul library, or None when it cannot be built here."""
    return _load_declared(_HERE / "q4_matmul.c", {"q4_matmul": ([_P, _P, _P, _P, _I, _P, _P, _I, _I, _I], _I),
                                                   "q4_dequantize": ([_P, _P, _P, _I, _P, _I, _I], None)})


@functools.lru_cache(maxsize=2)
def load_forward_kernel(streaming: bool = False) -> ctypes.CDLL | None:
    """The fused whole-model forward (`forward.c`), or None when it cannot be built here. `streaming`: the build
    for decode-sized passes, whose tiles prefetch the weight rows ahead (see QWEN25_PREFETCH in forward.c).
    Argument types are declared by its caller, `qwen25.kernels.native`, next to the mirrored structs."""
    return _load(_HERE / "forward.c", ("QWEN25_PREFETCH=1",) if streaming else ())
