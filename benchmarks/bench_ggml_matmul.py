"""One weight matrix at a time: the block kernels on the GGUF's own bytes (`qwen25.kernels.ggml_matmul`, the
CPU's best ISA and forced avx2) beside `quantization="q8"`'s layer (the same weight requantized to Q8_0 blocks, best
ISA) and fp32 `F.linear` on the dequantized weight, in one run, as ratios to the Q8_0 copy.

For each weight type in the file (Q4_K, Q6_K, Q5_0, Q8_0 in the 0.5B Q4_K_M), the first matrix of that type is
timed at 1 activation row (decode) and at 8 (a batch step); median of `--reps` calls after one warm-up. Bytes
per call are the weight bytes each path reads: the file's blocks, the Q8_0 blocks, or fp32. The whole-model
comparison with llama.cpp is benchmarks/bench_decode.py.

    python benchmarks/bench_ggml_matmul.py [--model NAME|PATH.gguf] [--threads 2] [--reps 20] [--rows 1,8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from time import perf_counter

import numpy as np
import torch


def median_s(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = perf_counter()
        fn()
        times.append(perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="known model name or .gguf path")
    p.add_argument("--threads", type=int, default=2, help="torch and OpenMP threads")
    p.add_argument("--reps", type=int, default=20, help="timed calls per (path, rows)")
    p.add_argument("--rows", default="1,8", help="comma-separated activation rows")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)

    from qwen25.kernels import isa, kernels_line
    from qwen25.kernels.ggml_matmul import TYPES, ggml_matmul
    from qwen25.weights.block_quant import quantize_q8_0
    from qwen25.weights.gguf import GGUFFile
    from qwen25.weights.registry import resolve_model

    path = resolve_model(args.model)
    g = GGUFFile(path)
    levels = [level for level in ("avx512", "avx2") if not isa.missing(level)]
    print(f"model: {path.name}; threads {args.threads}; {kernels_line()}")
    print("| weight | type | shape | rows | path | ms / call | weight GB/s | speed / Q8_0 copy |")
    print("|---|---|---|---|---|---|---|---|")
    seen: set[int] = set()
    for name, info in g.tensors.items():
        if len(info.shape) != 2 or int(info.ggml_type) not in TYPES or int(info.ggml_type) in seen:
            continue
        seen.add(int(info.ggml_type))
        rows, n = info.shape
        raw = np.ascontiguousarray(np.asarray(g.raw(name)).reshape(-1))
        weight = torch.from_numpy(np.asarray(g.dequantize(name), dtype=np.float32).reshape(rows, n))
        q8 = quantize_q8_0(weight)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, n)
            paths: dict[str, tuple[Callable[[], object], int]] = {
                f"ggml blocks ({level})": ((lambda lv=level: ggml_matmul(x, raw, info.ggml_type, (rows, n), level=lv)),
                                           raw.size) for level in levels}
            with torch.inference_mode():
                paths["Q8_0 copy (q8)"] = (lambda: ggml_matmul(x, q8, 8, (rows, n)), q8.size)
                paths["F.linear fp32"] = (lambda: torch.nn.functional.linear(x, weight), 4 * weight.numel())
                times = {label: median_s(fn, args.reps) for label, (fn, _) in paths.items()}
            for label, (_, nbytes) in paths.items():
                t = times[label]
                print(f"| {name} | {TYPES[int(info.ggml_type)][0]} | {rows}x{n} | {m} | {label} | {t * 1e3:.3f} "
                      f"| {nbytes / t / 1e9:.1f} | {times['Q8_0 copy (q8)'] / t:.2f}x |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
