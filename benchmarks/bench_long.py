"""Long prompts on a CPU: qwen25 next to llama.cpp on the same GGUF, one run, passkey prompts as the workload.

For each length (default 4K, 16K and 32,704 tokens: 32K less room for the answer inside the native window) and each engine, in a fresh process (so peak RSS belongs to that
length): passkey prompts (`qwen25.eval.passkey`, a 5-digit key at each --depths, exactly `length` tokens of
the model's tokenizer, tokenized once here and shared), each prefilled from an empty cache, then greedy decoding.
Reported: prefill tok/s (prompt tokens / time to the first token), decode tok/s at that context (the steps
after the first token), peak RSS, and passkey accuracy (first number of the greedy answer == the key), with
ratios to llama.cpp (each child warms up on a 64-token prompt first). Engines:
  qwen25     `LLM` defaults (q8 weights from the GGUF, the engine's chunked prefill, fp32 KV cache unless
             --kv-cache-dtype), no prefix caching
  llamacpp   llama-cpp-python (its f16 KV cache), n_ctx = length + decode steps, in ~/.cache/qwen25-ref's Python
Beyond the native window pass --yarn 4 (static YaRN on both, vLLM's/llama.cpp's) and --dca (qwen25 only: Dual
Chunk Attention, which llama.cpp lacks).

    python benchmarks/bench_long.py [--lengths 4096,16384,32704] [--depths 0,0.25,0.5,0.75,1] [--threads 2]
                                    [--engines qwen25,llamacpp] [--kv-cache-dtype auto|bf16|int8] [--yarn 4] [--dca]
    python benchmarks/bench_long.py --lengths 512 --depths 0.5 --decode-steps 8     # a quick check
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median
from time import perf_counter
from typing import Any

from _bench_common import MB, child_env, cpu_flags, cpu_model, log, peak_rss_mb, rss_mb, run_child, setup_torch

ENGINES = ("qwen25", "llamacpp")
NATIVE_WINDOW = 32768  # Qwen2.5's original_max_position_embeddings
ANSWER_TOKENS = 8
WARMUP_TOKENS = 64  # each child first runs a short prompt and a few decode steps, untimed  # the passkey answer is read from the first tokens of the greedy continuation
REF_PYTHON = Path.home() / ".cache/qwen25-ref/bin/python"


# --- children: one engine and one length per process -----------------------------------------------------------
def child_qwen25(spec: dict) -> dict:
    torch = setup_torch(spec["threads"])
    from qwen25 import LLM, SamplingParams

    length, steps = spec["length"], spec["decode_steps"]
    window = int(NATIVE_WINDOW * spec["yarn"]) if spec["yarn"] else NATIVE_WINDOW
    if length + steps + 1 > window:
        raise SystemExit(f"{length} + {steps} decode steps exceed the {window}-token window (pass --yarn 4)")
    settings: dict[str, Any] = {"enable_prefix_caching": False, "max_model_len": length + steps + 1,
                                "kv_cache_dtype": spec["kv_cache_dtype"]}
    rope = ({"rope_type": "yarn", "factor": spec["yarn"], "original_max_position_embeddings": NATIVE_WINDOW}
            if spec["yarn"] else None)
    llm = LLM(spec["model_path"], engine_kwargs=settings, rope_scaling=rope,
              dual_chunk_attention_config="on" if spec["dca"] else None)
    engine = llm.engine
    out: dict[str, Any] = {"rss_load_mb": rss_mb(), "version": f"torch {torch.__version__}", "runs": []}
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    llm.generate([spec["prompts"][0][:WARMUP_TOKENS]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    for i, ids in enumerate(spec["prompts"]):
        engine.add_request(f"p{i}", ids, params)
        tokens: list[int] = []
        t0 = perf_counter()
        t_first = None
        while engine.has_unfinished_requests():
            for step in engine.step():
                tokens += step.new_token_ids
                if t_first is None and tokens:
                    t_first = perf_counter()
        t_end = perf_counter()
        assert t_first is not None
        run = {"prefill": len(ids) / (t_first - t0), "decode": (len(tokens) - 1) / max(t_end - t_first, 1e-9),
               "answer": llm.tokenizer.decode(tokens[:ANSWER_TOKENS])}
        out["runs"].append(run)
        log("qwen25", f"{len(ids)} tokens, prompt {i + 1}/{len(spec['prompts'])}: prefill {run['prefill']:.1f} "
                      f"tok/s, decode {run['decode']:.2f} tok/s, answer {run['answer']!r}")
    return out


def child_llamacpp(spec: dict) -> dict:
    import llama_cpp
    import numpy as np

    length, steps = spec["length"], spec["decode_steps"]
    extra: dict[str, Any] = {}
    if spec["yarn"]:
        extra = {"rope_scaling_type": llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN, "rope_freq_scale": 1 / spec["yarn"],
                 "yarn_orig_ctx": NATIVE_WINDOW}
    llm = llama_cpp.Llama(spec["model_path"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          n_ctx=length + steps + 16, verbose=False, **extra)
    out: dict[str, Any] = {"rss_load_mb": rss_mb(), "version": f"llama-cpp-python {llama_cpp.__version__}",
                           "runs": []}
    n_vocab = llm.n_vocab()

    def argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    llm.eval(spec["prompts"][0][:WARMUP_TOKENS])  # warm-up: first-call allocations (the qwen25 child warms up too)
    for _ in range(4):
        llm.eval([argmax()])
    for i, ids in enumerate(spec["prompts"]):
        llm.reset()
        t0 = perf_counter()
        llm.eval(ids)
        tokens = [argmax()]
        t_first = perf_counter()
        for _ in range(steps - 1):
            llm.eval([tokens[-1]])
            tokens.append(argmax())
        t_end = perf_counter()
        answer = llm.detokenize(tokens[:ANSWER_TOKENS]).decode("utf-8", "replace")
        run = {"prefill": len(ids) / (t_first - t0), "decode": (len(tokens) - 1) / max(t_end - t_first, 1e-9),
               "answer": answer}
        out["runs"].append(run)
        log("llamacpp", f"{len(ids)} tokens, prompt {i + 1}/{len(spec['prompts'])}: prefill {run['prefill']:.1f} "
                        f"tok/s, decode {run['decode']:.2f} tok/s, answer {answer!r}")
    return out


def child_main(engine: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = {"qwen25": child_qwen25, "llamacpp": child_llamacpp}[engine](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    Path(out_path).write_text(json.dumps(result))


# --- parent ------------------------------------------------------------------------------------------------------
def thread_env(engine: str, threads: int) -> dict[str, str]:
    if engine == "llamacpp":
        return child_env({}, ["OMP_WAIT_POLICY", "OMP_NUM_THREADS"])
    return child_env({"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}, [])


def table(results: dict[int, dict[str, dict]], keys: dict[int, list[str]]) -> list[str]:
    """Markdown rows, one per (length, engine): medians over the prompts, ratios to llama.cpp's medians."""
    from qwen25.eval.passkey import is_found

    lines = ["| length | engine | prefill tok/s | decode tok/s | peak RSS MB | passkey found | prefill / llama.cpp "
             "| decode / llama.cpp | RSS / llama.cpp |", "|---|---|---|---|---|---|---|---|---|"]
    for length, by_engine in results.items():
        ref = by_engine.get("llamacpp")
        ref_prefill = median(r["prefill"] for r in ref["runs"]) if ref else None
        ref_decode = median(r["decode"] for r in ref["runs"]) if ref else None
        for engine, r in by_engine.items():
            prefill, decode = median(x["prefill"] for x in r["runs"]), median(x["decode"] for x in r["runs"])
            found = sum(is_found(x["answer"], k) for x, k in zip(r["runs"], keys[length]))
            cells = [str(length), engine, f"{prefill:.1f}", f"{decode:.2f}", f"{r['peak_rss_mb']:.0f}",
                     f"{found}/{len(r['runs'])}",
                     f"{prefill / ref_prefill:.2f}x" if ref_prefill else "-",
                     f"{decode / ref_decode:.2f}x" if ref_decode else "-",
                     f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x" if ref else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="known model name or a .gguf path")
    p.add_argument("--lengths", default="4096,16384,32704", help="comma-separated prompt lengths in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated key depths in [0, 1]")
    p.add_argument("--decode-steps", type=int, default=32, help=f"greedy tokens per prompt (>= {ANSWER_TOKENS})")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-dtype", default="auto", help="qwen25's KV cache (auto = fp32, float16, bf16, int8)")
    p.add_argument("--yarn", type=float, default=0.0, help="static YaRN factor on both engines (0: off)")
    p.add_argument("--dca", action="store_true", help="qwen25: Dual Chunk Attention (chunk = the native window)")
    p.add_argument("--llamacpp-python", default=str(REF_PYTHON) if REF_PYTHON.exists() else None,
                   help="interpreter with llama-cpp-python (default ~/.cache/qwen25-ref/bin/python)")
    p.add_argument("--json", help="also write all measurements to this file")
    p.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.spec, args.out)
    from qwen25.checkpoint import load_tokenizer
    from qwen25.eval.passkey import passkey_keys, passkey_prompt
    from qwen25.weights.registry import resolve_model

    engines = [e for e in args.engines.split(",") if e]
    if unknown := set(engines) - set(ENGINES):
        raise SystemExit(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    if args.decode_steps < ANSWER_TOKENS:
        raise SystemExit(f"--decode-steps must be >= {ANSWER_TOKENS}")
    model_path = resolve_model(args.model)
    if "llamacpp" in engines and not (args.llamacpp_python and Path(args.llamacpp_python).exists()):
        print("llama.cpp skipped: no interpreter with llama-cpp-python (pass --llamacpp-python)", file=sys.stderr)
        engines.remove("llamacpp")
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    tokenizer = load_tokenizer(model_path)
    results: dict[int, dict[str, dict]] = {}
    keys: dict[int, list[str]] = {}
    for n, length in enumerate(lengths):
        keys[length] = passkey_keys(len(depths), seed=n)
        prompts = [passkey_prompt(tokenizer, length, d, k).ids for d, k in zip(depths, keys[length])]
        spec = {"model_path": str(model_path), "length": length, "prompts": prompts, "threads": args.threads,
                "decode_steps": args.decode_steps, "kv_cache_dtype": args.kv_cache_dtype, "yarn": args.yarn,
                "dca": args.dca}
        results[length] = {}
        for engine in engines:
            python = args.llamacpp_python if engine == "llamacpp" else sys.executable
            result = run_child(python, Path(__file__).resolve(), engine, spec, thread_env(engine, args.threads))
            if result is not None:
                results[length][engine] = result
    print(f"model: {model_path.name} ({model_path.stat().st_size / MB:.1f} MB); machine: {cpu_model()}, "
          f"{cpu_flags()}; {args.threads} threads; depths {depths}; qwen25 KV cache {args.kv_cache_dtype}"
          + (f"; YaRN x{args.yarn}" if args.yarn else "") + ("; qwen25 DCA" if args.dca else ""))
    print("\n".join(table(results, keys)))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "keys": keys, "results": results}, indent=1))


if __name__ == "__main__":
    main()
