"""Fidelity of the fast paths: perplexity on a fixed code text for qwen25's default path (the GGUF's own blocks,
8-bit activation blocks, the fused native forward on the engine's KV cache), the same with an fp32 cache, the
dequantized fp32 reference (`quantization="none"`, PyTorch, no cache) and llama.cpp on the same GGUF, in one run,
each as a ratio to the reference.

Text: four 1,024-token windows of PyTorch's own source (fixed by the pinned torch version: torch/nn/modules/conv.py
with its docstring, activation.py, torch/functional.py, module.py; the windows tests/test_quantize.py uses),
tokenized once by qwen25's tokenizer; every token after a window's first is scored (4,092 tokens). qwen25's fast
paths prefill each window in chunks of --chunk tokens (the way the engine prefills a prompt), llama.cpp evaluates
each window in one `eval` with all logits kept (n_batch 1,024).

    python benchmarks/bench_ppl.py [--model NAME|PATH.gguf] [--engines qwen25,qwen25-kv32,qwen25-ref,llamacpp]
                                   [--chunk 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from time import perf_counter
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import add_child_args, child_env, cpu_model, log, run_as_child, run_child, setup_torch  # noqa: E402

ENGINES = ("qwen25", "qwen25-kv32", "qwen25-ref", "llamacpp")
REFERENCE = "qwen25-ref"
WINDOW = 1024
REF_PYTHON = Path.home() / ".cache" / "qwen25-ref" / "bin" / "python"


def code_windows(model_path: str) -> list[list[int]]:
    """The four windows' token ids (qwen25's tokenizer, no special tokens)."""
    import torch.functional
    import torch.nn.modules.activation
    import torch.nn.modules.conv
    import torch.nn.modules.module

    from qwen25.checkpoint import load_tokenizer

    tok = load_tokenizer(Path(model_path))
    sources = [(torch.nn.modules.conv.__doc__ or "") + Path(torch.nn.modules.conv.__file__).read_text()[:9000],
               Path(torch.nn.modules.activation.__file__).read_text()[20000:],
               Path(torch.functional.__file__).read_text()[5000:],
               Path(torch.nn.modules.module.__file__).read_text()[30000:]]
    return [tok.encode(text)[:WINDOW] for text in sources]


def nll_of(logits: Any, ids: list[int]) -> float:
    """Summed negative log-likelihood (nats) of ids[1:] under logits (T, vocab) for positions 0..T-2."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)[:-1]
    top = x.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(x - top).sum(axis=1)) + top[:, 0]
    return float((log_z - x[np.arange(len(ids) - 1), ids[1:]]).sum())


def child_qwen25(spec: dict, quantization: str, kv_dtype: str | None) -> dict:
    torch = setup_torch(spec["threads"])
    from qwen25 import LLM
    from qwen25.engine.kv_cache import ContiguousKVCache

    llm = LLM(spec["model_path"], quantization=quantization)
    t0, nll = perf_counter(), 0.0
    with torch.inference_mode():
        if quantization == "none":  # the reference: one cache-less PyTorch forward per window
            for ids in spec["windows"]:
                nll += nll_of(llm.model(torch.tensor([ids]))[0], ids)
            path = "PyTorch, fp32 weights and activations, no cache"
        else:
            native = llm.engine.runner.native_for_pass()
            if native is None:
                raise SystemExit("the native forward did not build here; nothing to measure")
            dtype = getattr(torch, kv_dtype) if kv_dtype else llm.engine.runner.cache.keys.dtype
            for ids in spec["windows"]:
                cache = ContiguousKVCache(llm.config, 1, len(ids), dtype)
                parts = torch.tensor([ids]).split(spec["chunk"], dim=1)
                logits = torch.cat([native.forward_cache(p, cache, cache.native_view(), p.shape[1]) for p in parts], 1)
                nll += nll_of(logits[0], ids)
            path = f"fused native forward, {str(dtype).removeprefix('torch.')} KV cache, chunks of {spec['chunk']}"
    return {"nll": nll, "seconds": perf_counter() - t0, "path": path}


def child_llamacpp(spec: dict) -> dict:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(spec["model_path"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          n_ctx=WINDOW, n_batch=WINDOW, logits_all=True, verbose=False)
    t0, nll = perf_counter(), 0.0
    for ids in spec["windows"]:
        llm.reset()
        llm.eval(ids)
        nll += nll_of(np.asarray(llm.scores[:len(ids)]), ids)
    return {"nll": nll, "seconds": perf_counter() - t0, "path": f"llama-cpp-python {llama_cpp.__version__}, "
            "eval with logits_all, f16 KV cache"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="known model name or a .gguf path")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk of qwen25's fast paths (tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llamacpp-python", default=str(REF_PYTHON) if REF_PYTHON.exists() else None,
                   help="python of a venv with llama-cpp-python (default ~/.cache/qwen25-ref)")
    add_child_args(p)
    args = p.parse_args(argv)
    if args.child:
        return run_as_child(args, {"qwen25": lambda s: child_qwen25(s, "auto", None),
                                   "qwen25-kv32": lambda s: child_qwen25(s, "auto", "float32"),
                                   "qwen25-ref": lambda s: child_qwen25(s, "none", None), "llamacpp": child_llamacpp})
    engines = [e for e in args.engines.split(",") if e]
    if not engines or set(engines) - set(ENGINES):
        p.error(f"--engines: choose from {', '.join(ENGINES)}")
    from qwen25.weights.registry import resolve_model

    model_path = str(resolve_model(args.model))
    windows = code_windows(model_path)
    spec = {"model_path": model_path, "windows": windows, "chunk": args.chunk, "threads": args.threads}
    results: dict[str, dict | None] = {}
    for engine in engines:
        log(engine, "scoring 4 windows")
        if engine == "llamacpp":
            if not args.llamacpp_python:
                log(engine, "skipped: no llama-cpp-python venv (--llamacpp-python)")
                continue
            python, env = args.llamacpp_python, child_env({}, ["OMP_WAIT_POLICY", "OMP_NUM_THREADS"])
        else:
            python = sys.executable
            env = child_env({"OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}, [])
        results[engine] = run_child(python, Path(__file__).resolve(), engine, spec, env)
    scored = sum(len(w) - 1 for w in windows)
    ref = results.get(REFERENCE)
    print(f"model: {Path(model_path).name}; text: 4 windows of torch {__import__('torch').__version__}'s source, "
          f"{scored} tokens scored; cpu: {cpu_model()}; {args.threads} threads\n")
    print("| engine | path | perplexity | vs fp32 reference | seconds |")
    print("|---|---|---|---|---|")
    for engine, r in results.items():
        if r is None:
            continue
        ppl = math.exp(r["nll"] / scored)
        ratio = f"{math.exp((r['nll'] - ref['nll']) / scored):.4f}x" if ref else "-"
        print(f"| {engine} | {r['path']} | {ppl:.4f} | {ratio} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
