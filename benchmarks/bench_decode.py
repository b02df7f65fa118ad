"""Single-stream CPU speed of qwen25 next to llama.cpp and transformers on the same GGUF, in one run.

For each engine, in its own process and one at a time: load time, prefill tok/s (512-token prompt from an
empty cache), decode tok/s (128 greedy single-token steps, EOS ignored, after a 49-token ChatML prompt), RSS
after load and peak RSS, and the decode's weight-read bandwidth as a share of the machine's read bandwidth,
measured in the same run (see /work/shared/BASELINE.md for the methodology and BENCHMARKS.md for results). Prompt ids are tokenized
once here and shared by every engine. Engines: qwen25 (`LLM` defaults: the GGUF's own blocks, memory-mapped, kernels
of the best ISA the CPU runs), qwen25-avx2 (the same, QWEN25_ISA=avx2: the baseline kernels), qwen25-gguf
(`quantization="gguf"` named explicitly; -gguf-avx2 likewise), qwen25-q8 (`quantization="q8"`: the GGUF
requantized to Q8_0 blocks at load; -q8-avx2 likewise), qwen25-q4
(`quantization="q4"`: Q4_K / Q5_0 layers, Q8_0 table), qwen25-ref (`quantization="none"`: dequantized fp32),
llama.cpp (llama-cpp-python), transformers (fp32, dequantized). The q8 / q4 load times include quantizing.
Two ways to drive an engine:
  generate: its public generate API. prefill = time(generate 1 token); decode = 128 / (time(generate 129)
            - time(generate 1)), i.e. 128 decode steps including the API's per-token overhead.
  forward:  a raw loop: one forward over the prompt, then 128 single-token forwards, argmax after each (qwen25:
            the engine's native forward on a contiguous cache of the engine's KV dtype).

    python benchmarks/bench_decode.py [--model NAME|PATH.gguf] [--skip transformers] [--reps 3] [--procs 1]
                                      [--engines qwen25,qwen25-avx2,qwen25-q4,qwen25-ref,llamacpp,transformers] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

from _bench_common import (MB, child_env, cpu_flags, cpu_model, file_pmd_mb, gguf_weight_bytes, load_average, log,
                           min_median, peak_rss_mb, pool, rss_mb, run_child, setup_torch, torch_weight_bytes)

ENGINES = ("qwen25", "qwen25-avx2", "qwen25-gguf", "qwen25-gguf-avx2", "qwen25-q8", "qwen25-q8-avx2", "qwen25-q4", "qwen25-ref", "llamacpp",
           "transformers")  # qwen25: the default
# the default (the file's own blocks) on the CPU's best kernels; -avx2: QWEN25_ISA=avx2; -q8: requantized; -ref: fp32
MODE_LABELS = {("qwen25", "generate"): "LLM.generate", ("qwen25-q4", "generate"): "LLM.generate",
               ("qwen25-avx2", "generate"): "LLM.generate", ("qwen25-gguf", "generate"): "LLM.generate",
               ("qwen25-gguf-avx2", "generate"): "LLM.generate", ("qwen25-q8", "generate"): "LLM.generate",
               ("qwen25-q8-avx2", "generate"): "LLM.generate",
               ("qwen25-ref", "generate"): "LLM.generate",
               ("llamacpp", "forward"): "eval() loop",
               ("transformers", "generate"): "generate()"}  # others: "forward loop"
# The machine's read bandwidth, measured in the same run (each round, before the engines): torch `sum` over a
# 1 GiB fp32 buffer on the benchmark's threads, median of 7 (BASELINE.md's method; it found 22.6 GB/s on 2 threads
# of the first machine). Each engine's decode GB/s is printed as a share of it.
BANDWIDTH_SCRIPT = """
import statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
x = torch.ones(1 << 28)
x.sum()
times = []
for _ in range(7):
    t = time.perf_counter(); x.sum(); times.append(time.perf_counter() - t)
print(x.numel() * 4 / statistics.median(times) / 1e9)
"""
PREFILL_TOKENS, DECODE_STEPS = 512, 128
CHAT_PROMPT = "Write a Python function that returns the n-th Fibonacci number, computed iteratively, and explain it."
REF_PYTHON = Path.home() / ".cache/qwen25-ref/bin/python"

Stepper = tuple[Callable[[list[int]], int], Callable[[int], int]]  # (prefill from empty cache, one step) -> argmax
Generate = Callable[[list[int], int], list[int]]  # (prompt ids, new tokens) -> greedy token ids


# --- children: one engine per process -------------------------------------------------------------------------
def time_stepper(stepper: Stepper, spec: dict) -> tuple[float, float, list[int]]:
    """(prefill tok/s over the long prompt, decode tok/s over DECODE_STEPS steps, the greedy tokens)."""
    start, step = stepper
    t0 = perf_counter()
    start(spec["prefill_ids"])
    prefill = PREFILL_TOKENS / (perf_counter() - t0)
    tokens = [start(spec["decode_ids"])]
    t0 = perf_counter()
    for _ in range(DECODE_STEPS):
        tokens.append(step(tokens[-1]))
    return prefill, DECODE_STEPS / (perf_counter() - t0), tokens


def time_generate(generate: Generate, spec: dict) -> tuple[float, float, list[int]]:
    t0 = perf_counter()
    generate(spec["prefill_ids"], 1)
    prefill = PREFILL_TOKENS / (perf_counter() - t0)
    t0 = perf_counter()
    generate(spec["decode_ids"], 1)
    t1 = perf_counter()
    tokens = generate(spec["decode_ids"], DECODE_STEPS + 1)
    return prefill, DECODE_STEPS / ((perf_counter() - t1) - (t1 - t0)), tokens


def measure(engine: str, modes: dict[str, Stepper | Generate], spec: dict) -> dict[str, dict]:
    """Warm each mode up once (16-token prompt), then `reps` rounds with the modes interleaved."""
    short = spec["decode_ids"][:16]
    for name, driver in modes.items():
        if name == "generate":
            driver(short, 2)
        else:
            driver[1](driver[0](short))
    results: dict[str, dict] = {name: {"prefill": [], "decode": [], "tokens": []} for name in modes}
    for rep in range(spec["reps"]):
        for name, driver in modes.items():
            timer = time_generate if name == "generate" else time_stepper
            prefill, decode, tokens = timer(driver, spec)
            results[name]["prefill"].append(prefill)
            results[name]["decode"].append(decode)
            results[name]["tokens"] = tokens
            log(engine, f"rep {rep + 1}/{spec['reps']} {name}: prefill {prefill:.1f} tok/s, decode {decode:.2f} tok/s")
    return results


def child_qwen25(spec: dict, quantization: str = "auto", name: str = "qwen25") -> dict:
    torch = setup_torch(spec["threads"])
    import qwen25
    from qwen25 import LLM, SamplingParams
    from qwen25.engine.kv_cache import ContiguousKVCache
    from qwen25.kernels import kernels_line

    t0 = perf_counter()
    # No prefix caching: every repetition must prefill from an empty cache, as llama.cpp's eval loop does.
    llm = LLM(spec["model_path"], dtype="float32", quantization=quantization,
              engine_kwargs={"enable_prefix_caching": False})
    out = {"load_s": perf_counter() - t0, "rss_load_mb": rss_mb(), "version": f"qwen25 {qwen25.__version__}, "
           f"torch {torch.__version__}; {kernels_line()}", "bytes_per_token": torch_weight_bytes(llm.model)}
    state: dict[str, Any] = {}

    native = llm.engine.runner.native_for_pass()  # the fast path the engine runs, on a contiguous cache here
    kv_dtype = llm.engine.runner.cache.keys.dtype  # ... of the engine's KV dtype (float16 by default)

    @torch.inference_mode()
    def forward(ids: list[int]) -> int:
        cache = state["cache"]
        if native is not None:
            return int(native.forward_cache(torch.tensor([ids]), cache, cache.native_view(), 1)[0, -1].argmax())
        return int(llm.model(torch.tensor([ids]), cache=cache, logits_to_keep=1)[0, -1].argmax())

    def start(ids: list[int]) -> int:
        state["cache"] = ContiguousKVCache(llm.config, 1, len(ids) + DECODE_STEPS + 1,
                                           kv_dtype if native is not None else torch.float32)
        return forward(ids)

    def generate(ids: list[int], n: int) -> list[int]:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        return llm.generate([ids], params)[0].outputs[0].token_ids

    out["modes"] = measure(name, {"generate": generate, "forward": (start, lambda t: forward([t]))}, spec)
    out["version"] += f"; the file on 2 MiB pages: {file_pmd_mb():.0f} MB"  # while mapped
    return out


def llamacpp_isa(llama_cpp: Any) -> str:
    """The SIMD features this llama.cpp build compiled in (its system info's `NAME = 1` entries): a
    -march=native build on an AVX-512 machine lists AVX512*, an AVX2-only build does not."""
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    simd = [name for name, on in re.findall(r"([A-Z0-9_]+) = (\d)", info)
            if on == "1" and name.startswith(("AVX", "F16C", "FMA"))]
    return "kernels built for " + (" ".join(simd) or "no AVX")


def child_llamacpp(spec: dict) -> dict:
    import llama_cpp
    import numpy as np

    t0 = perf_counter()
    llm = llama_cpp.Llama(spec["model_path"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          n_ctx=2048, verbose=False)
    out = {"load_s": perf_counter() - t0, "rss_load_mb": rss_mb(),
           "version": f"llama-cpp-python {llama_cpp.__version__}; {llamacpp_isa(llama_cpp)}"}
    n_vocab = llm.n_vocab()

    def step(token: int) -> int:  # eval() keeps only the last position's logits; read them through ctypes
        llm.eval([token])
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    def start(ids: list[int]) -> int:
        llm.reset()  # n_tokens = 0: the next eval() drops the whole KV cache
        llm.eval(ids)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    out["modes"] = measure("llamacpp", {"forward": (start, step)}, spec)
    out["version"] += f"; the file on 2 MiB pages: {file_pmd_mb():.0f} MB"  # while mapped
    return out


def child_transformers(spec: dict) -> dict:
    torch = setup_torch(spec["threads"])
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = Path(spec["model_path"])
    t0 = perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    out = {"load_s": perf_counter() - t0, "rss_load_mb": rss_mb(), "bytes_per_token": torch_weight_bytes(model),
           "version": f"transformers {transformers.__version__}, torch {torch.__version__}"}
    state: dict[str, Any] = {}

    @torch.inference_mode()
    def forward(ids: list[int]) -> int:
        logits = model(input_ids=torch.tensor([ids]), past_key_values=state["cache"], use_cache=True,
                       logits_to_keep=1).logits
        return int(logits[0, -1].argmax())

    def start(ids: list[int]) -> int:
        state["cache"] = DynamicCache(config=model.config)
        return forward(ids)

    @torch.inference_mode()
    def generate(ids: list[int], n: int) -> list[int]:
        x = torch.tensor([ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, temperature=None, top_p=None, top_k=None)
        return y[0, len(ids):].tolist()

    out["modes"] = measure("transformers", {"generate": generate, "forward": (start, lambda t: forward([t]))}, spec)
    return out


def child_main(engine: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    children = {"qwen25": child_qwen25, "qwen25-q4": lambda s: child_qwen25(s, "q4", "qwen25-q4"),
                "qwen25-avx2": lambda s: child_qwen25(s, "auto", "qwen25-avx2"),
                "qwen25-gguf": lambda s: child_qwen25(s, "gguf", "qwen25-gguf"),
                "qwen25-gguf-avx2": lambda s: child_qwen25(s, "gguf", "qwen25-gguf-avx2"),
                "qwen25-q8": lambda s: child_qwen25(s, "q8", "qwen25-q8"),
                "qwen25-q8-avx2": lambda s: child_qwen25(s, "q8", "qwen25-q8-avx2"),
                "qwen25-ref": lambda s: child_qwen25(s, "none", "qwen25-ref"),
                "llamacpp": child_llamacpp, "transformers": child_transformers}
    result = children[engine](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    Path(out_path).write_text(json.dumps(result))


# --- parent: prompts, children in sequence, table -------------------------------------------------------------
def make_prompts(model_path: Path) -> tuple[list[int], list[int]]:
    """(512-token code prompt, short ChatML prompt) tokenized by qwen25's tokenizer from the GGUF."""
    from qwen25.chat import render_chat
    from qwen25.checkpoint import load_tokenizer

    tok = load_tokenizer(model_path)
    code = "".join(f'def scale_{i}(values, factor={i}):\n    """Multiply each value by {i}, add {i * 7 % 13}."""\n'
                   f"    return [v * factor + {i * 7 % 13} for v in values]\n\n" for i in range(64))
    long_ids = tok.encode(code)[:PREFILL_TOKENS]
    if len(long_ids) < PREFILL_TOKENS:
        raise SystemExit(f"long prompt has only {len(long_ids)} tokens")
    chat = render_chat(tok.chat_template, [{"role": "user", "content": CHAT_PROMPT}])
    return long_ids, tok.encode(chat)


def thread_setup(engine: str, threads: int) -> tuple[dict[str, str], str]:
    """(environment for the child, one-line description)."""
    if engine == "llamacpp":
        env = child_env({}, ["OMP_WAIT_POLICY", "OMP_NUM_THREADS"])
        return env, f"n_threads={threads}, n_threads_batch={threads}, OMP env unset (llama.cpp defaults)"
    policy = {"OMP_WAIT_POLICY": "PASSIVE"} if engine.startswith("qwen25") else {}
    if engine.endswith("-avx2"):
        policy["QWEN25_ISA"] = "avx2"
    quiet = {"TQDM_DISABLE": "1"} if engine == "transformers" else {}  # its GGUF conversion bar floods the log
    env = child_env({"OMP_NUM_THREADS": str(threads), **policy, **quiet}, ["OMP_WAIT_POLICY"])
    desc = f"torch threads {threads}, interop 1, OMP_NUM_THREADS={threads}"
    forced = ", QWEN25_ISA=avx2" if engine.endswith("-avx2") else ""
    return env, desc + (", OMP_WAIT_POLICY=PASSIVE" if policy else ", OMP_WAIT_POLICY unset") + forced


def fmt(pair: tuple[float, float], digits: int) -> str:
    return f"{pair[0]:.{digits}f} / **{pair[1]:.{digits}f}**"


def read_bandwidth_gbps(threads: int) -> float | None:
    """The machine's read bandwidth now (GB/s), from a child process (see BANDWIDTH_SCRIPT); None if it failed."""
    env = child_env({"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}, [])
    result = subprocess.run([sys.executable, "-c", BANDWIDTH_SCRIPT, str(threads)], capture_output=True, text=True,
                            env=env, timeout=600)
    try:
        return float(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def agreement(tokens: list[int], reference: list[int] | None) -> int | None:
    """How many greedy tokens, from the first, equal the reference's (None without a reference)."""
    if reference is None:
        return None
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def table(results: dict[str, dict], ceiling_gbps: float | None) -> list[str]:
    """Markdown rows, one per (engine, mode); ratios are medians over llama.cpp's medians. Load: min / median over
    processes; RSS and busy cores: the maximum over processes; n = processes x repetitions per process. Greedy
    agreement: tokens equal from the first, against llama.cpp's eval loop and against qwen25-ref's
    LLM.generate (the dequantized fp32 weights), when those engines ran."""
    ref = results.get("llamacpp", {}).get("modes", {}).get("forward")
    ref_prefill, ref_decode = (min_median(ref["prefill"])[1], min_median(ref["decode"])[1]) if ref else (None, None)
    ref_tokens = ref["tokens"] if ref else None
    fp32 = results.get("qwen25-ref", {}).get("modes", {}).get("generate")  # the dequantized fp32 reference
    fp32_tokens = fp32["tokens"] if fp32 else None
    lines = ["| engine | mode | load s | RSS after load MB | peak RSS MB | prefill 512 tok/s min / med "
             "| decode 128 tok/s min / med | prefill / llama.cpp | decode / llama.cpp | weights/token MB "
             f"| decode GB/s | % of {ceiling_gbps or 0:.1f} GB/s read | greedy = llama.cpp | greedy = fp32 ref "
             "| busy cores: others / steal | n |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for engine, r in results.items():
        for mode, m in r["modes"].items():
            prefill, decode = min_median(m["prefill"]), min_median(m["decode"])
            gbps = r["bytes_per_token"] * decode[1] / 1e9
            same, same32 = (agreement(m["tokens"], other) for other in (ref_tokens, fp32_tokens))
            cells = [engine, MODE_LABELS.get((engine, mode), "forward loop"), fmt(min_median(r["load_s"]), 2),
                     f"{max(r['rss_load_mb']):.0f}", f"{max(r['peak_rss_mb']):.0f}",
                     fmt(prefill, 1), fmt(decode, 2),
                     f"{prefill[1] / ref_prefill:.2f}x" if ref_prefill else "-",
                     f"{decode[1] / ref_decode:.2f}x" if ref_decode else "-",
                     f"{r['bytes_per_token'] / MB:.1f}", f"{gbps:.2f}", f"{100 * gbps / ceiling_gbps:.0f}%" if ceiling_gbps else "-",
                     f"{same}/{len(m['tokens'])}" if same is not None else "-",
                     f"{same32}/{len(m['tokens'])}" if same32 is not None else "-",
                     f"{max(r['other_cpu_cores']):.2f} / {max(r['steal_cores']):.2f}",
                     f"{len(r['load_s'])}x{len(m['decode']) // len(r['load_s'])}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="known model name or a .gguf path")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    p.add_argument("--skip", default="", help="comma-separated engines to leave out (e.g. transformers)")
    p.add_argument("--reps", type=int, default=3, help="in-process repetitions of prefill and decode")
    p.add_argument("--procs", type=int, default=1, help="processes per engine, run round-robin; measurements pooled")
    p.add_argument("--threads", type=int, default=2)
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
    from qwen25.weights.registry import resolve_model

    engines = [e for e in args.engines.split(",") if e and e not in args.skip.split(",")]
    if unknown := set(engines) - set(ENGINES):
        raise SystemExit(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    model_path = resolve_model(args.model)
    if model_path.suffix != ".gguf":
        raise SystemExit(f"{model_path}: this benchmark compares engines on a .gguf file")
    if "llamacpp" in engines and not (args.llamacpp_python and Path(args.llamacpp_python).exists()):
        print("llama.cpp skipped: no interpreter with llama-cpp-python (pass --llamacpp-python)", file=sys.stderr)
        engines.remove("llamacpp")
    long_ids, chat_ids = make_prompts(model_path)
    spec = {"model_path": str(model_path), "prefill_ids": long_ids, "decode_ids": chat_ids, "reps": args.reps,
            "threads": args.threads}
    header = [f"model: {model_path.name} ({model_path.stat().st_size / MB:.1f} MB)",
              f"machine: {cpu_model()}, {cpu_flags()}; prompts: prefill {len(long_ids)} tokens, decode "
              f"{DECODE_STEPS} steps after a {len(chat_ids)}-token ChatML prompt; {args.reps} reps per process"]
    runs: dict[str, list[dict]] = {engine: [] for engine in engines}
    bandwidths: list[float] = []
    for proc in range(args.procs):  # round-robin, so slow drift of the (shared, virtual) machine hits all engines
        gbps = read_bandwidth_gbps(args.threads)
        log("bandwidth", f"read {gbps:.1f} GB/s" if gbps else "measurement failed")
        bandwidths += [gbps] if gbps else []
        for engine in engines:
            env, threads = thread_setup(engine, args.threads)
            python = args.llamacpp_python if engine == "llamacpp" else sys.executable
            log(engine, f"process {proc + 1}/{args.procs} starting ({threads}; load average {load_average()})")
            result = run_child(python, Path(__file__).resolve(), engine, spec, env)
            if result is not None:
                runs[engine].append({"bytes_per_token": gguf_weight_bytes(model_path), **result, "threads": threads})
    results = {engine: pool(rs) for engine, rs in runs.items() if rs}
    for engine in engines:
        r = results.get(engine)
        header.append(f"{engine}: FAILED" if r is None else f"{engine}: {r['version']}; {r['threads']}")
    ceiling = statistics.median(bandwidths) if bandwidths else None
    header.append(f"read bandwidth: {', '.join(f'{b:.1f}' for b in bandwidths) or 'not measured'} GB/s "
                  f"(torch sum over 1 GiB, {args.threads} threads, each round)")
    print("\n".join(header + [""] + table(results, ceiling)))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "spec": spec, "results": results,
                                               "read_bandwidth_gbps": bandwidths}, indent=1))


if __name__ == "__main__":
    main()
