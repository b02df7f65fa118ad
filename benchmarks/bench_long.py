"""Long prompts on a CPU: qwen25 next to llama.cpp on the same GGUF, one run, passkey prompts as the workload.

For each length (default 4K, 16K and 32,704 tokens: 32K less room for the answer inside the native window) and each engine, in a fresh process (so peak RSS belongs to that
length): passkey prompts (`qwen25.eval.passkey`, a 5-digit key at each --depths, exactly `length` tokens of
the model's tokenizer, tokenized once here and shared), each prefilled from an empty cache, then greedy decoding.
Reported: prefill tok/s (prompt tokens / time to the first token), decode tok/s at that context (the steps
after the first token), peak RSS, and passkey accuracy (first number of the greedy answer == the key), with
ratios to llama.cpp (each child warms up on a 64-token prompt first). Engines:
  qwen25     `LLM` defaults (q8 weights from the GGUF, the engine's chunked prefill, the fused native forward, the
             KV cache dtype `auto` picks, float16 for these weights, unless --kv-cache-dtype), no prefix caching
  llamacpp   llama-cpp-python (its f16 KV cache), n_ctx = length + decode steps, in ~/.cache/qwen25-ref's Python
Beyond the native window pass --yarn 4 (static YaRN on both, vLLM's/llama.cpp's) and --dca (qwen25 only: Dual
Chunk Attention, which llama.cpp lacks; with --sparse-prefill, sparse over its three parts), or --beyond-window
(qwen25: plain RoPE past the trained positions, what DCA and YaRN are measured against).

--sparse-prefill [on|JSON] adds the engine qwen25-sparse: the same `LLM` with MInference's vertical-slash sparse
prefill (`qwen25.model.sparse_prefill`; in the fused native forward, with full-budget chunks for long prompts),
and the engine qwen25-torch: dense prefill on the PyTorch path (use_native=False). The table adds prefill speed-ups over
qwen25's default dense prefill and over qwen25-torch at the same length, and whether the passkey is still found.

--generate N is another workload: one greedy generation of N tokens after a short prompt (the seeds' claim that
8K-token generations do not slow down or grow in memory), per engine in a fresh process; reported per --window
tokens (default 1024): decode tok/s in that window and RSS at its end.

    python benchmarks/bench_long.py [--lengths 4096,16384,32704] [--depths 0,0.25,0.5,0.75,1] [--threads 2]
                                    [--engines qwen25,llamacpp] [--kv-cache-dtype auto|bf16|int8] [--yarn 4] [--dca]
                                    [--quantization auto|q8|q4|gguf]
    python benchmarks/bench_long.py --lengths 512 --depths 0.5 --decode-steps 8     # a quick check
    python benchmarks/bench_long.py --lengths 32704 --engines qwen25,qwen25-sparse --sparse-prefill on
    python benchmarks/bench_long.py --generate 8192 [--window 1024] [--engines qwen25,llamacpp]
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

ENGINES = ("qwen25", "qwen25-torch", "qwen25-sparse", "llamacpp")
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
    plain_beyond = length + steps + 1 > window and spec.get("beyond_window") and not spec["dca"]
    if length + steps + 1 > window and not plain_beyond:
        raise SystemExit(f"{length} + {steps} decode steps exceed the {window}-token window (pass --yarn 4, or "
                         "--beyond-window for plain RoPE past it)")
    settings: dict[str, Any] = {"enable_prefix_caching": False, "max_model_len": length + steps + 1,
                                "kv_cache_dtype": spec["kv_cache_dtype"]}
    if spec["engine"] == "qwen25-torch":
        settings["use_native"] = False
    rope = ({"rope_type": "yarn", "factor": spec["yarn"], "original_max_position_embeddings": NATIVE_WINDOW}
            if spec["yarn"] else None)
    llm = LLM(spec["model_path"], quantization=spec.get("quantization", "auto"), engine_kwargs=settings,
              rope_scaling=rope,
              dual_chunk_attention_config="on" if spec["dca"] else None,
              sparse_prefill=spec["sparse_prefill"] if spec.get("sparse") else None)
    if plain_beyond:  # positions past the trained window, RoPE unchanged (vLLM: VLLM_ALLOW_LONG_MAX_MODEL_LEN=1)
        config = llm.model.config.replace(max_position_embeddings=length + steps + 1)
        llm.config = llm.checkpoint.config = llm.model.config = llm.model.model.config = config
    engine = llm.engine
    kv_dtype = str(engine.runner.cache.keys.dtype).removeprefix("torch.")
    log(spec["engine"], f"KV cache {spec['kv_cache_dtype']}: {kv_dtype}")
    out: dict[str, Any] = {"rss_load_mb": rss_mb(), "version": f"torch {torch.__version__}", "runs": [],
                           "kv_cache_dtype": kv_dtype}
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    llm.generate([spec["prompts"][0][:WARMUP_TOKENS]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    if spec.get("generate"):
        return {**generate_qwen25(llm, spec), "rss_load_mb": out["rss_load_mb"], "kv_cache_dtype": kv_dtype}
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
        log(spec["engine"], f"{len(ids)} tokens, prompt {i + 1}/{len(spec['prompts'])}: prefill {run['prefill']:.1f} "
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

    if spec.get("generate"):
        llm.eval(spec["prompts"][0])
        windows, tokens = [], [argmax()]
        t0 = perf_counter()
        while len(tokens) < spec["generate"]:
            llm.eval([tokens[-1]])
            tokens.append(argmax())
            if len(tokens) % spec["window"] == 0 or len(tokens) == spec["generate"]:
                t0 = close_window(windows, len(tokens), t0, "llamacpp")
        out["windows"] = windows
        return out

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


def close_window(windows: list[dict], generated: int, t0: float, engine: str) -> float:
    """Record the window of generated tokens ending now (started at t0); returns the next window's start."""
    now = perf_counter()
    start = windows[-1]["end"] if windows else 1  # the first token comes from the prefill, not a decode step
    windows.append({"end": generated, "tok_s": (generated - start) / max(now - t0, 1e-9), "rss_mb": rss_mb()})
    log(engine, f"tokens {start}-{generated}: {windows[-1]['tok_s']:.2f} tok/s, RSS {windows[-1]['rss_mb']:.0f} MB")
    return perf_counter()


def generate_qwen25(llm: Any, spec: dict) -> dict:
    """One greedy generation of spec["generate"] tokens, timed per window of spec["window"] tokens."""
    from qwen25 import SamplingParams

    engine, windows, generated = llm.engine, [], 0
    out: dict[str, Any] = {"rss_load_mb": rss_mb(), "version": "qwen25"}
    engine.add_request("gen", spec["prompts"][0], SamplingParams(temperature=0, max_tokens=spec["generate"],
                                                                 ignore_eos=True))
    t0 = perf_counter()
    while engine.has_unfinished_requests():
        for step in engine.step():
            before, generated = generated, generated + len(step.new_token_ids)
            if before == 0:
                t0 = perf_counter()  # decode windows start after the prefill's first token
            elif generated // spec["window"] > before // spec["window"] or generated >= spec["generate"]:
                t0 = close_window(windows, generated, t0, "qwen25")
    out["windows"] = windows
    return out


def child_main(engine: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    spec["sparse"], spec["engine"] = engine == "qwen25-sparse", engine
    result = (child_llamacpp if engine == "llamacpp" else child_qwen25)(spec)
    result["peak_rss_mb"] = peak_rss_mb()
    Path(out_path).write_text(json.dumps(result))


# --- parent ------------------------------------------------------------------------------------------------------
def generate_table(results: dict[str, dict], window: int) -> list[str]:
    """Markdown rows, one per window of generated tokens: each engine's decode tok/s and RSS at the window's end."""
    engines = list(results)
    head = "| tokens | " + " | ".join(f"{e} tok/s | {e} RSS MB" for e in engines) + " |"
    lines = [head, "|---|" + "---|---|" * len(engines)]
    rows = max(len(r["windows"]) for r in results.values())
    for i in range(rows):
        cells = []
        for e in engines:
            w = results[e]["windows"]
            cells += [f"{w[i]['tok_s']:.2f}", f"{w[i]['rss_mb']:.0f}"] if i < len(w) else ["-", "-"]
        ends = next([w["end"] for w in r["windows"]] for r in results.values() if i < len(r["windows"]))
        lines.append(f"| {ends[i - 1] if i else 1}-{ends[i]} | " + " | ".join(cells) + " |")
    return lines


def thread_env(engine: str, threads: int) -> dict[str, str]:
    if engine == "llamacpp":
        return child_env({}, ["OMP_WAIT_POLICY", "OMP_NUM_THREADS"])
    return child_env({"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}, [])


def table(results: dict[int, dict[str, dict]], keys: dict[int, list[str]]) -> list[str]:
    """Markdown rows, one per (length, engine): medians over the prompts, ratios to llama.cpp's medians."""
    from qwen25.eval.passkey import is_found

    lines = ["| length | engine | prefill tok/s | decode tok/s | peak RSS MB | passkey found | prefill / llama.cpp "
             "| decode / llama.cpp | RSS / llama.cpp | prefill / qwen25 | prefill / qwen25-torch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for length, by_engine in results.items():
        ref = by_engine.get("llamacpp")
        ref_prefill = median(r["prefill"] for r in ref["runs"]) if ref else None
        ref_decode = median(r["decode"] for r in ref["runs"]) if ref else None
        dense = {e: median(r["prefill"] for r in by_engine[e]["runs"]) for e in ("qwen25", "qwen25-torch")
                 if e in by_engine}
        for engine, r in by_engine.items():
            prefill, decode = median(x["prefill"] for x in r["runs"]), median(x["decode"] for x in r["runs"])
            found = sum(is_found(x["answer"], k) for x, k in zip(r["runs"], keys[length]))
            cells = [str(length), engine, f"{prefill:.1f}", f"{decode:.2f}", f"{r['peak_rss_mb']:.0f}",
                     f"{found}/{len(r['runs'])}",
                     f"{prefill / ref_prefill:.2f}x" if ref_prefill else "-",
                     f"{decode / ref_decode:.2f}x" if ref_decode else "-",
                     f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x" if ref else "-",
                     *(f"{prefill / dense[e]:.2f}x" if e in dense and e != engine else "-"
                       for e in ("qwen25", "qwen25-torch"))]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def kv_line(setting: str, runs: list[tuple[str, dict]]) -> str:
    """The --kv-cache-dtype setting and the dtype(s) the qwen25 children stored, e.g. "auto (float16)"."""
    stored = sorted({r["kv_cache_dtype"] for engine, r in runs if "kv_cache_dtype" in r})
    return f"{setting} ({', '.join(stored)})" if stored else setting


def default_engines(args: argparse.Namespace) -> str:
    return "qwen25,qwen25-torch,qwen25-sparse,llamacpp" if args.sparse_prefill else "qwen25,llamacpp"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="known model name or a .gguf path")
    p.add_argument("--lengths", default="4096,16384,32704", help="comma-separated prompt lengths in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated key depths in [0, 1]")
    p.add_argument("--decode-steps", type=int, default=32, help=f"greedy tokens per prompt (>= {ANSWER_TOKENS})")
    p.add_argument("--engines", default=None, help="comma-separated subset of " + ",".join(ENGINES) + " (default: "
                   "qwen25,llamacpp, plus qwen25-torch,qwen25-sparse with --sparse-prefill)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="qwen25's KV cache: auto (float16 for quantized weights), float32, float16, bfloat16, int8")
    p.add_argument("--quantization", default="auto", choices=("auto", "q8", "q4", "gguf"),
                   help="qwen25's weights from the GGUF (auto: the LLM default, the file's own blocks memory-mapped "
                        "like llama.cpp's, i.e. gguf; q8/q4: the older requantized copies)")
    p.add_argument("--yarn", type=float, default=0.0, help="static YaRN factor on both engines (0: off)")
    p.add_argument("--dca", action="store_true", help="qwen25: Dual Chunk Attention (chunk = the native window)")
    p.add_argument("--beyond-window", action="store_true",
                   help="qwen25 without --yarn/--dca: admit lengths past the native window with plain RoPE")
    p.add_argument("--sparse-prefill", nargs="?", const="on", default=None, metavar="on|JSON",
                   help="add the engine qwen25-sparse: vertical-slash sparse prefill with these settings (default "
                        "when given alone: on, MInference's budgets)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="instead of passkey prompts: one greedy generation of N tokens, timed per --window")
    p.add_argument("--window", type=int, default=1024, help="--generate: tokens per reported window")
    p.add_argument("--prompt-tokens", type=int, default=128, help="--generate: prompt length in tokens (>= 96)")
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

    engines = [e for e in (args.engines or default_engines(args)).split(",") if e]
    if unknown := set(engines) - set(ENGINES):
        raise SystemExit(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    if args.decode_steps < ANSWER_TOKENS:
        raise SystemExit(f"--decode-steps must be >= {ANSWER_TOKENS}")
    model_path = resolve_model(args.model)
    if "llamacpp" in engines and not (args.llamacpp_python and Path(args.llamacpp_python).exists()):
        print("llama.cpp skipped: no interpreter with llama-cpp-python (pass --llamacpp-python)", file=sys.stderr)
        engines.remove("llamacpp")
    if "qwen25-sparse" in engines and not args.sparse_prefill:
        raise SystemExit("qwen25-sparse needs --sparse-prefill")
    if args.generate:
        return main_generate(args, engines, model_path)
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
                "dca": args.dca, "sparse_prefill": args.sparse_prefill, "quantization": args.quantization,
                "beyond_window": args.beyond_window}
        results[length] = {}
        for engine in engines:
            python = args.llamacpp_python if engine == "llamacpp" else sys.executable
            result = run_child(python, Path(__file__).resolve(), engine, spec, thread_env(engine, args.threads))
            if result is not None:
                results[length][engine] = result
    print(f"model: {model_path.name} ({model_path.stat().st_size / MB:.1f} MB); machine: {cpu_model()}, "
          f"{cpu_flags()}; {args.threads} threads; depths {depths}; qwen25 weights {args.quantization}; "
          f"qwen25 KV cache {kv_line(args.kv_cache_dtype, [r for by in results.values() for r in by.items()])}"
          + (f"; YaRN x{args.yarn}" if args.yarn else "") + ("; qwen25 DCA" if args.dca else ""))
    print("\n".join(table(results, keys)))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "keys": keys, "results": results}, indent=1))


def main_generate(args: argparse.Namespace, engines: list[str], model_path: Path) -> None:
    """--generate N: each engine in a fresh process generates N greedy tokens after a short text prompt."""
    from qwen25.checkpoint import load_tokenizer
    from qwen25.eval.passkey import passkey_prompt

    if args.generate < 2 * args.window:
        raise SystemExit(f"--generate {args.generate} should span at least two --window {args.window} windows")
    tokenizer = load_tokenizer(model_path)
    prompt = passkey_prompt(tokenizer, max(args.prompt_tokens, 96), 0.5, "12345").ids  # plain filler text
    length = len(prompt)
    spec = {"model_path": str(model_path), "length": length, "prompts": [prompt], "threads": args.threads,
            "decode_steps": args.generate, "kv_cache_dtype": args.kv_cache_dtype, "yarn": args.yarn,
            "dca": args.dca, "sparse_prefill": args.sparse_prefill, "generate": args.generate,
            "quantization": args.quantization,
            "window": args.window}
    results: dict[str, dict] = {}
    for engine in engines:
        python = args.llamacpp_python if engine == "llamacpp" else sys.executable
        result = run_child(python, Path(__file__).resolve(), engine, spec, thread_env(engine, args.threads))
        if result is not None:
            results[engine] = result
    print(f"model: {model_path.name}; machine: {cpu_model()}, {cpu_flags()}; {args.threads} threads; greedy "
          f"generation of {args.generate} tokens after a {length}-token prompt; "
          f"qwen25 KV cache {kv_line(args.kv_cache_dtype, list(results.items()))}")
    if results:
        print("\n".join(generate_table(results, args.window)))
        for engine, r in results.items():
            print(f"{engine}: RSS after load {r['rss_load_mb']:.0f} MB, peak {r['peak_rss_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
