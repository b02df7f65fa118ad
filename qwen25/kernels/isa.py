"""Which instruction set the native kernels are built for: the CPU's features, read at run time, and the choice.

The C kernels are compiled once per ISA level (separate shared objects with different `-m` flags, see
`qwen25.kernels`), and the best level the CPU supports is loaded:

  avx512  AVX-512 F/BW/VL + VNNI: the int8 dot products use `vpdpbusd` (four u8 x s8 products per 32-bit lane,
          accumulated in one instruction, instead of maddubs + madd + add)
  avx2    AVX2 + FMA + F16C: the baseline every kernel is written for
  none    no native kernels: the pure-PyTorch modules (no compiler, no AVX2, or a non-x86 CPU)

AVX-512 BF16 is detected and reported but not used: no kernel here multiplies bf16 values. `QWEN25_ISA` forces
a level (`avx2` on an AVX-512 machine tests the baseline there; `none` the PyTorch path); forcing a level the
CPU lacks is an error naming the missing features. The integer sums are exact on every level and the float steps
are the same, so a model's logits are the same bits whichever level runs (tests/test_isa.py).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

LEVELS = ("avx512", "avx2", "none")  # best first
REQUIRED: dict[str, tuple[str, ...]] = {  # /proc/cpuinfo flag names
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
    "avx2": ("avx2", "fma", "f16c"),  # f16c: the 4-bit kernels convert fp16 scales
    "none": (),
}
COMPILE_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "none": (),
}
REPORTED = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_int8")
ENV = "QWEN25_ISA"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    """/proc/cpuinfo, read once (the matmul modules ask for their library on every call)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (Linux /proc/cpuinfo: the kernel hides features whose
    register state the OS does not save, so a flag listed here is usable). Empty where unknown."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` says."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def missing(level: str, flags: frozenset[str] | None = None) -> list[str]:
    """The features `level` needs that the CPU lacks (empty: it can run here)."""
    if level not in REQUIRED:
        raise ValueError(f"unknown ISA level {level!r}: choose one of {', '.join(LEVELS)}")
    flags = cpu_flags() if flags is None else flags
    if level != "none" and platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return ["an x86-64 CPU"]
    return [f for f in REQUIRED[level] if f not in flags]


def best_level(flags: frozenset[str] | None = None) -> str:
    """The highest level the CPU supports."""
    return next(level for level in LEVELS if not missing(level, flags))


def selected_level(flags: frozenset[str] | None = None) -> str:
    """The level to build and load: $QWEN25_ISA if set (auto: the best), else the best the CPU supports.
    QWEN25_NO_NATIVE=1 (older spelling) means `none`. Raises ValueError for a level the CPU cannot run."""
    forced = os.environ.get(ENV, "").strip().lower()
    if os.environ.get("QWEN25_NO_NATIVE") and forced in ("", "auto"):
        return "none"
    if forced in ("", "auto"):
        return best_level(flags)
    lacking = missing(forced, flags)
    if lacking:
        raise ValueError(f"{ENV}={forced}: this CPU lacks {', '.join(lacking)}; "
                         f"it supports {best_level(flags)} (unset {ENV} to pick it)")
    return forced


def describe(flags: frozenset[str] | None = None) -> str:
    """One line for `qwen25 models --paths` and the benchmarks: CPU, its features, and the kernels that run."""
    flags = cpu_flags() if flags is None else flags
    have = " ".join(f for f in REPORTED if f in flags) or "none of AVX2/AVX-512"
    try:
        level = selected_level(flags)
    except ValueError as error:
        return f"cpu: {cpu_model()} ({have}); kernels: {error}"
    forced = os.environ.get(ENV, "").strip().lower()
    why = f"forced by {ENV}={forced}" if forced not in ("", "auto") else "best this CPU runs"
    if level == "none":
        what = "none (PyTorch modules)"
    else:
        what = f"{level} ({' '.join(COMPILE_FLAGS[level])})"
    return f"cpu: {cpu_model()} ({have}); kernels: {what}, {why}"
