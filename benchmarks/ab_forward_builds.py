"""A/B of builds of the fused native forward (`qwen25/kernels/forward.c`) in one process, interleaved step by step.

Kernel changes of a few percent drown in a shared host's drift between runs (this project's hosts move 10-30%
between minutes). Here every build runs the same model and the same inputs in the same process, and the builds
take turns at every step (the order rotating), so a slow phase of the host slows all of them alike. Each build
gets its own KV cache; the greedy tokens (decode) or the logits (prefill) of every build are compared at the end,
so a change that alters any bit is reported.

Builds: forward.c compiled from each given kernels directory (a `git worktree` of the base commit and the working
tree, typically) with the flags qwen25 itself uses for the ISA.

    git worktree add /tmp/base HEAD~1
    OMP_WAIT_POLICY=PASSIVE python benchmarks/ab_forward_builds.py /tmp/base/qwen25/kernels qwen25/kernels \\
        --model qwen2.5-coder-1.5b-instruct --rows 8 --steps 60 [--isa avx2] [--prefill 512 --reps 6]

--rows R: R sequences decoded in lock step (R rows per pass: R concurrent streams); --prefill T: a T-token prompt
from an empty cache instead. Prints each build's median ms per pass and its tok/s.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import torch

from qwen25 import LLM
from qwen25.engine.kv_cache import ContiguousKVCache
from qwen25.kernels import build_library
from qwen25.kernels.isa import selected_level
from qwen25.kernels.native import NativeForward
from qwen25.weights.registry import resolve_model


def build(kernels_dir: Path, isa: str) -> Path:
    """forward.c of `kernels_dir` compiled for `isa` (qwen25's own cached build, keyed by the sources)."""
    library = build_library(kernels_dir.resolve() / "forward.c", isa)
    if library is None:
        raise SystemExit(f"{kernels_dir}/forward.c could not be built for {isa}")
    return library


def rotated(n: int, k: int) -> list[int]:
    """0..n-1 starting at k % n: the builds' order at step k, so none always runs first."""
    return [(k + i) % n for i in range(n)]


def decode_steps(llm: LLM, natives: list[NativeForward], rows: int, steps: int) -> tuple[list[list[float]], bool]:
    kv_dtype = llm.engine.runner.cache.keys.dtype
    prompt = torch.tensor([[100 + i] * 8 + list(range(200 + 7 * i, 232 + 7 * i)) for i in range(rows)])
    caches, tokens = [], []
    for native in natives:
        cache = ContiguousKVCache(llm.config, rows, prompt.shape[1] + steps + 8, kv_dtype)
        caches.append(cache)
        tokens.append(native.forward_cache(prompt, cache, cache.native_view(), 1)[:, -1].argmax(-1, keepdim=True))
    times: list[list[float]] = [[] for _ in natives]
    for step in range(steps):
        for v in rotated(len(natives), step):
            t0 = time.perf_counter()
            logits = natives[v].forward_cache(tokens[v], caches[v], caches[v].native_view(), 1)
            times[v].append(time.perf_counter() - t0)
            tokens[v] = logits[:, -1].argmax(-1, keepdim=True)
    return times, all(torch.equal(tokens[0], t) for t in tokens)


def prefill(llm: LLM, natives: list[NativeForward], length: int, reps: int) -> tuple[list[list[float]], bool]:
    kv_dtype = llm.engine.runner.cache.keys.dtype
    prompt = torch.randint(100, 20000, (1, length), generator=torch.Generator().manual_seed(0))
    times: list[list[float]] = [[] for _ in natives]
    outs: list[torch.Tensor | None] = [None] * len(natives)
    for rep in range(reps + 1):  # the first round warms up, untimed
        for v in rotated(len(natives), rep):
            cache = ContiguousKVCache(llm.config, 1, length + 1, kv_dtype)
            t0 = time.perf_counter()
            outs[v] = natives[v].forward_cache(prompt, cache, cache.native_view(), 1)
            if rep:
                times[v].append(time.perf_counter() - t0)
    return times, all(torch.equal(outs[0], o) for o in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernels", nargs="+", type=Path, help="kernels directories (each with forward.c) to compare")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="known model name or a .gguf path")
    parser.add_argument("--isa", default=None, help="avx512 or avx2 (default: the best this CPU runs)")
    parser.add_argument("--rows", type=int, default=8, help="sequences decoded in lock step")
    parser.add_argument("--steps", type=int, default=60, help="decode steps per build")
    parser.add_argument("--prefill", type=int, default=0, help="time a prompt of this many tokens instead")
    parser.add_argument("--reps", type=int, default=6, help="prefill repetitions per build")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    isa = args.isa or selected_level()
    path = resolve_model(args.model, download=False)
    llm = LLM(str(path), engine_kwargs={"enable_prefix_caching": False})
    with torch.inference_mode():
        libs = [build(d, isa) for d in args.kernels]
        natives = [NativeForward(llm.model, ctypes.CDLL(str(lib))) for lib in libs]
        if args.prefill:
            times, same = prefill(llm, natives, args.prefill, args.reps)
            per_pass = args.prefill
        else:
            times, same = decode_steps(llm, natives, args.rows, args.steps)
            per_pass = args.rows
    what = f"prefill {args.prefill}" if args.prefill else f"{args.rows}-row decode steps"
    print(f"{path.name}, {isa}, {args.threads} threads, {what}:")
    for directory, ts in zip(args.kernels, times):
        median = statistics.median(ts)
        print(f"  {str(directory):40s} median {1000 * median:8.2f} ms  {per_pass / median:7.1f} tok/s")
    print("identical results in every build:", same)


if __name__ == "__main__":
    main()
