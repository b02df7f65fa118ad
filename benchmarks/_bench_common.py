"""Process-level helpers shared by the benchmark scripts: memory, timing statistics, machine facts, child runs.

Standard library only at import time: the benchmark children run under other interpreters (the llama-cpp-python
venv), which import this file from the script's directory without qwen25 installed; torch is imported on demand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MB = 1e6  # every size is reported in decimal megabytes (10^6 bytes)


def rss_mb() -> float:
    """Current resident set size of this process (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError("no VmRSS in /proc/self/status")


def file_pmd_mb() -> float:
    """File bytes this process maps by 2 MiB pages (FilePmdMapped; see qwen25.weights.huge_pages)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("FilePmdMapped:"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return 0.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def min_median(values: list[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)


def cpu_model() -> str:
    """`lscpu`'s model name (falls back to /proc/cpuinfo, then platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    """Which of the SIMD extensions that matter here the CPU has."""
    text = Path("/proc/cpuinfo").read_text()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"]
    return ", ".join(f for f in wanted if f in flags) or "none of AVX2/AVX-512"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def log(engine: str, message: str) -> None:
    print(f"[{engine}] {message}", file=sys.stderr, flush=True)


def setup_torch(threads: int) -> Any:
    """Import torch with `threads` intra-op threads and one inter-op thread; returns the module."""
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    return torch


def torch_weight_bytes(model: Any) -> int:
    """Bytes of weights read per decoded token by an HF-layout causal LM (`model.embed_tokens`, `lm_head`): every
    parameter and buffer (q8 models keep their weights as buffers) but the input embedding's, which is gathered by
    row, plus lm_head's even when it shares them with the embedding."""
    def tensors(module: Any) -> list[Any]:
        return list(module.parameters()) + list(module.buffers())

    embed_ptrs = {t.data_ptr() for t in tensors(model.model.embed_tokens)}
    seen: set[int] = set()
    total = 0
    for t in tensors(model.lm_head) + tensors(model):
        if t.data_ptr() in seen or (t.data_ptr() in embed_ptrs and not any(t is h for h in tensors(model.lm_head))):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for module in model.modules():  # GGUF-block layers read the file's bytes (a numpy `raw`), not tensors
        raw = getattr(module, "raw", None)
        if raw is not None and module is not model.model.embed_tokens and raw.ctypes.data not in seen:
            seen.add(raw.ctypes.data)
            total += raw.nbytes
    return total


def child_env(set_vars: dict[str, str], unset: list[str]) -> dict[str, str]:
    """This process's environment with `set_vars` set and `unset` removed."""
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(set_vars)
    return env


def _cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot. Busy = user, nice, system, irq, softirq; steal =
    time the hypervisor gave our virtual CPUs to someone else."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(python: str, script: Path, engine: str, spec: dict[str, Any], env: dict[str, str]) -> dict | None:
    """Run `python script --child engine` with `spec` as JSON; return its JSON result (None if it failed).

    The child's stderr (progress lines, errors) goes straight to ours. Contention checks added to the result:
    `other_cpu_cores`, the average number of cores kept busy by anything but the child while it ran, and
    `steal_cores`, the average number of cores the hypervisor took away meanwhile."""
    with tempfile.TemporaryDirectory(prefix="qwen25-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [python, str(script), "--child", engine, "--spec", str(spec_path), "--out", str(out_path)]
        (busy, steal), own, t0 = _cpu_seconds(), _children_cpu_seconds(), time.monotonic()
        code = subprocess.run(cmd, env=env, stdout=sys.stderr).returncode
        wall = time.monotonic() - t0
        busy_after, steal_after = _cpu_seconds()
        others = (busy_after - busy) - (_children_cpu_seconds() - own)
        if code != 0 or not out_path.exists():
            print(f"[{engine}] child process failed (exit code {code}); see its output above", file=sys.stderr)
            return None
        return {**json.loads(out_path.read_text()), "other_cpu_cores": max(others, 0.0) / wall,
                "steal_cores": (steal_after - steal) / wall}


def add_child_args(parser: argparse.ArgumentParser) -> None:
    """The hidden flags with which `run_child` starts a script's child side (`run_as_child`)."""
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)


def run_as_child(args: argparse.Namespace, runs: dict[str, Any]) -> int:
    """The child side of `run_child`: `runs[args.child]` (a function of the spec) on the JSON spec in --spec, its
    JSON result written to --out; returns the exit status."""
    spec = json.loads(Path(args.spec).read_text())
    Path(args.out).write_text(json.dumps(runs[args.child](spec)))
    return 0


def parse_engines(parser: argparse.ArgumentParser, text: str, known: tuple[str, ...]) -> list[str]:
    """The comma-separated --engines value as a list; a usage error (exit 2) unless every name is in `known`."""
    engines = [e for e in text.split(",") if e]
    if not engines or set(engines) - set(known):
        parser.error(f"--engines: choose from {', '.join(known)}")
    return engines


def run_engines(script: Path, engines: list[str], spec: dict[str, Any], threads: int,
                what: str) -> dict[str, dict | None]:
    """Each engine's side of `script` in its own child process (`run_child`, this interpreter, OMP_NUM_THREADS
    `threads` and passive OpenMP waiting), one after the other: {engine: result, or None if it failed}."""
    env = child_env({"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}, [])
    results = {}
    for engine in engines:
        log(engine, f"running {what}")
        results[engine] = run_child(sys.executable, script, engine, spec, env)
    return results


def pool(runs: list[dict]) -> dict:
    """One engine's processes merged: per-process figures as lists, per-rep measurements pooled."""
    first = runs[0]
    merged = {**first, **{k: [r[k] for r in runs] for k in ("load_s", "rss_load_mb", "peak_rss_mb", "other_cpu_cores",
                                                             "steal_cores")}}
    merged["modes"] = {mode: {"prefill": [x for r in runs for x in r["modes"][mode]["prefill"]],
                              "decode": [x for r in runs for x in r["modes"][mode]["decode"]],
                              "tokens": m["tokens"]} for mode, m in first["modes"].items()}
    return merged


def gguf_weight_bytes(model_path: Path) -> int:
    """Bytes of GGUF tensors read per decoded token: all of them but token_embd (looked up, not read whole)."""
    from qwen25.weights.gguf import GGUFFile

    with GGUFFile(model_path, expect_arch=None) as g:
        return sum(t.nbytes for name, t in g.tensors.items() if name != "token_embd.weight")
