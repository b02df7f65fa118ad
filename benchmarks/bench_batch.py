"""Many-requests throughput: qwen25's continuous-batching engine next to llama.cpp's server with N parallel slots.

The question: with N requests in flight at once (different prompts, greedy, EOS ignored, max_tokens each), how
many output tokens per second does each engine deliver in aggregate, and how much is that above its own
single-stream speed? Targets of the performance issue (N=8, 128 tokens, 2 threads): qwen25's aggregate tok/s
>= 3x qwen25's single stream, and >= `llama-server -np 8` on the same GGUF.

Both engines get the same token ids: N different chat prompts (bench_server.PROMPTS) rendered with the GGUF's
own chat template and tokenized once here with qwen25's tokenizer. One engine at a time, never both at once:
  qwen25       a child process (OMP_WAIT_POLICY=PASSIVE, 2 torch threads) loads `qwen25.LLM(gguf)` (the default
               path: the file's GGUF blocks) with an engine of max_num_seqs=N and prefix caching OFF, then calls
               `LLM.generate` with one prompt (single stream) and with all N prompts in one call (the engine
               batches them).
  llamaserver  llama.cpp's own `llama-server -m GGUF -t 2 -tb 2 -np N -c N*slot` (default environment: no OMP_*
               variables) on 127.0.0.1; N streaming POST /completion requests with the token ids as `prompt`,
               sent at once from N client threads (`n_predict`, `ignore_eos`, `temperature` 0, `top_k` 1,
               `cache_prompt` false, `return_tokens`). Build the binary with benchmarks/build_llama_server.sh.
Each engine: one untimed warm-up (a single request and a batch of N, 4 tokens each), then `--reps` rounds of
(single request, batch of N). Reported, median over rounds:
  single tok/s     max_tokens / wall time of one request (its prefill included)
  aggregate tok/s  all N requests' output tokens / wall time from submitting the first to the last finishing
  speedup          aggregate / single of the same engine
  TTFT             per request in the batch: submit -> first output token (qwen25: timestamped in the engine's
                   step() loop; llama-server: first streamed token)
plus load time (constructor / server start until /health answers), RSS after load and peak RSS (qwen25: the
child's ru_maxrss; llama-server: VmHWM), and "other cores": the average number of cores kept busy by processes
other than the benchmark meanwhile (near 0 = a clean measurement). Greedy outputs are compared (informative,
not asserted): on a quantized model, batching changes the float summation order, so long greedy runs may part.

    python benchmarks/bench_batch.py [--model NAME|PATH.gguf] [--requests 8] [--max-tokens 128] [--reps 3]
                                     [--engines qwen25,llamaserver] [--llama-server PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _bench_common import (MB, child_env, cpu_flags, cpu_model, load_average, log, peak_rss_mb, rss_mb, run_child,
                           setup_torch)

ENGINES = ("qwen25", "llamaserver")
LABELS = {"qwen25": "qwen25 (LLM.generate, GGUF blocks)", "llamaserver": "llama.cpp llama-server"}
BUILD_DIR = Path.home() / ".cache/qwen25-ref-build/llama-server-build"
DEFAULT_SERVER = BUILD_DIR / "bin/llama-server"
WARMUP_TOKENS = 4
SERVER_START_TIMEOUT_S = 300.0  # loading a GGUF takes seconds; bounded anyway
REQUEST_TIMEOUT_S = 900.0  # per socket operation of one request (a slow token would exceed this only if hung)


# --- prompts ----------------------------------------------------------------------------------------------------
def chat_prompts(n: int) -> list[str]:
    """`n` different user messages: bench_server.PROMPTS, numbered variants once those run out."""
    from bench_server import PROMPTS

    return [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" (Variant {i // len(PROMPTS) + 1}.)")
            for i in range(n)]


def make_prompts(model_path: Path, n: int) -> list[list[int]]:
    """The `n` chat prompts rendered with the GGUF's chat template, as qwen25 token ids."""
    from qwen25.chat import render_chat
    from qwen25.checkpoint import load_tokenizer

    tok = load_tokenizer(model_path)
    return [tok.encode(render_chat(tok.chat_template, [{"role": "user", "content": p}])) for p in chat_prompts(n)]


# --- qwen25: a child process --------------------------------------------------------------------------------------
def instrument_first_tokens(engine: Any) -> dict[str, float]:
    """Wrap `engine.step` (on this instance only) to timestamp each request's first output token; returns the dict
    request_id -> perf_counter() that it fills. Costs one dict lookup per output."""
    first: dict[str, float] = {}
    step = engine.step

    def timed_step() -> list[Any]:
        outputs = step()
        now = time.perf_counter()
        for out in outputs:
            if out.new_token_ids and out.request_id not in first:
                first[out.request_id] = now
        return outputs

    engine.step = timed_step
    return first


def child_qwen25(spec: dict) -> dict:
    """Load, warm up, then `reps` rounds of (one request, all requests in one LLM.generate call)."""
    torch = setup_torch(spec["threads"])
    import qwen25
    from qwen25 import LLM, SamplingParams
    from qwen25.kernels import kernels_line

    prompts, n = spec["prompts"], len(spec["prompts"])
    t0 = time.perf_counter()
    # Prefix caching off: every request prefills its whole prompt, as llama-server does with cache_prompt=false
    # (the prompts share the chat template's system-prompt head, which the cache would otherwise reuse).
    llm = LLM(spec["model_path"], dtype="float32", engine_kwargs={"enable_prefix_caching": False,
                                                                   "max_num_seqs": max(n, 1)})
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "rss_load_mb": rss_mb(),
                           "version": f"qwen25 {qwen25.__version__} ({llm.quantization}), torch {torch.__version__}; "
                                      f"{kernels_line()}"}
    first = instrument_first_tokens(llm.engine)

    def run(batch: list[list[int]], max_tokens: int) -> dict:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        first.clear()
        start = time.perf_counter()
        results = llm.generate(batch, params)
        wall = time.perf_counter() - start
        tokens = [r.outputs[0].token_ids for r in results]
        ttft = [t - start for _, t in sorted(first.items(), key=lambda kv: int(kv[0].split("-")[2]))]
        return {"wall_s": wall, "n_tokens": [len(t) for t in tokens], "tokens": tokens, "ttft_s": ttft}

    run(prompts[:1], WARMUP_TOKENS)
    run(prompts, WARMUP_TOKENS)
    out["rounds"] = []
    for rep in range(spec["reps"]):
        single, batch = run(prompts[:1], spec["max_tokens"]), run(prompts, spec["max_tokens"])
        out["rounds"].append({"single": single, "batch": batch})
        log("qwen25", f"round {rep + 1}/{spec['reps']}: {summary(single, batch)}")
    return out


def child_main(engine: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = {"qwen25": child_qwen25}[engine](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    Path(out_path).write_text(json.dumps(result))


# --- llama-server: a server process driven over HTTP ----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slot_context(prompts: list[list[int]], max_tokens: int) -> int:
    """Context per slot: the longest prompt + max_tokens (+ warm-up slack), rounded up to 256 tokens."""
    need = max(len(p) for p in prompts) + max(max_tokens, WARMUP_TOKENS) + 16
    return -(-need // 256) * 256


def start_server(binary: Path, model_path: Path, port: int, slots: int, ctx: int, threads: int,
                 extra: list[str]) -> tuple[subprocess.Popen, Path, list[str]]:
    """Start llama-server on 127.0.0.1:port with llama.cpp's default environment; its log goes to a file."""
    cmd = [str(binary), "-m", str(model_path), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-tb", str(threads), "-np", str(slots), "-c", str(ctx), *extra]
    log_path = Path(f"/tmp/bench_batch_llamaserver_{port}.log")
    env = child_env({}, ["OMP_WAIT_POLICY", "OMP_NUM_THREADS"])
    log("llamaserver", f"{shlex.join(cmd)}  (log: {log_path})")
    with open(log_path, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT), log_path, cmd


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = SERVER_START_TIMEOUT_S) -> None:
    """Poll GET /health until it answers 200 (503 while the model loads)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with code {proc.returncode} before becoming healthy")
        if time.monotonic() > deadline:
            raise RuntimeError(f"llama-server at {url} not healthy after {timeout:.0f} s")
        time.sleep(0.25)


def proc_status_mb(pid: int, field: str) -> float:
    """A VmRSS / VmHWM line of /proc/PID/status, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / MB
    return float("nan")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy since boot (user, nice, system, irq, softirq)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, open("/proc/stat").readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def stream_completion(url: str, ids: list[int], max_tokens: int, t_submit: float) -> dict:
    """One streaming POST /completion; returns the streamed token ids, end time, TTFT and the server's counters.

    The count of output tokens is the final chunk's `tokens_predicted`: the server does not stream a token that
    leaves the text with an incomplete UTF-8 character (one chunk per complete piece, carrying only the last
    token's id), so the streamed ids can be fewer; `ids_complete` says whether they are all there."""
    body = {"prompt": ids, "n_predict": max_tokens, "ignore_eos": True, "temperature": 0, "top_k": 1,
            "cache_prompt": False, "stream": True}
    req = urllib.request.Request(url + "/completion", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    tokens: list[int] = []
    first, final = None, {}
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":  # also skips ":" keep-alive pings
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"llama-server: {chunk['error']}")
            if chunk.get("tokens"):
                first = first or time.perf_counter()
                tokens += chunk["tokens"]
            if chunk.get("stop"):
                final = chunk
    end = time.perf_counter()
    if not final:
        raise RuntimeError("llama-server's stream ended without a final chunk")
    predicted = final["tokens_predicted"]
    return {"tokens": tokens, "n_tokens": predicted, "ids_complete": len(tokens) == predicted, "end": end,
            "ttft_s": (first or end) - t_submit, "timings": final.get("timings", {})}


def server_batch(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    """All prompts at once, one client thread per request; wall = first submit -> last response."""
    barrier = threading.Barrier(len(prompts))

    def one(ids: list[int]) -> dict:
        barrier.wait(timeout=60)
        return stream_completion(url, ids, max_tokens, time.perf_counter())

    with ThreadPoolExecutor(len(prompts)) as ex:
        start = time.perf_counter()
        futures = [ex.submit(one, ids) for ids in prompts]
        results = [f.result(timeout=REQUEST_TIMEOUT_S) for f in futures]
    wall = max(r["end"] for r in results) - start
    return {"wall_s": wall, "n_tokens": [r["n_tokens"] for r in results], "tokens": [r["tokens"] for r in results],
            "ids_complete": [r["ids_complete"] for r in results], "ttft_s": [r["ttft_s"] for r in results],
            "server_predicted_tok_s": [r["timings"].get("predicted_per_second") for r in results]}


def run_llamaserver(spec: dict, binary: Path, extra: list[str]) -> dict:
    """Start the server, warm up, `reps` rounds of (one request, all requests), stop it."""
    prompts, n = spec["prompts"], len(spec["prompts"])
    per_slot = slot_context(prompts, spec["max_tokens"])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    busy0, own0, t0 = machine_busy_s(), sum(os.times()[:2]), time.perf_counter()
    proc, log_path, cmd = start_server(binary, Path(spec["model_path"]), port, n, n * per_slot, spec["threads"],
                                       extra)
    try:
        wait_healthy(url, proc)
        out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "rss_load_mb": proc_status_mb(proc.pid, "VmRSS"),
                               "version": "llama.cpp " + " ".join((version.stdout + version.stderr).split()),
                               "command": shlex.join(cmd), "log": str(log_path), "ctx_per_slot": per_slot}
        server_batch(url, prompts[:1], WARMUP_TOKENS)
        server_batch(url, prompts, WARMUP_TOKENS)
        out["rounds"] = []
        for rep in range(spec["reps"]):
            single = server_batch(url, prompts[:1], spec["max_tokens"])
            batch = server_batch(url, prompts, spec["max_tokens"])
            out["rounds"].append({"single": single, "batch": batch})
            log("llamaserver", f"round {rep + 1}/{spec['reps']}: {summary(single, batch)}")
        out["peak_rss_mb"] = proc_status_mb(proc.pid, "VmHWM")
        wall, server_cpu = time.perf_counter() - t0, proc_cpu_s(proc.pid)
        others = machine_busy_s() - busy0 - server_cpu - (sum(os.times()[:2]) - own0)
        out["other_cpu_cores"] = max(others, 0.0) / wall
        return out
    finally:
        stop_server(proc)


# --- parent: measurements -> table ------------------------------------------------------------------------------
def tok_per_s(run: dict) -> float:
    return sum(run["n_tokens"]) / run["wall_s"]


def summary(single: dict, batch: dict) -> str:
    return (f"single {tok_per_s(single):.2f} tok/s, {len(batch['tokens'])} requests {tok_per_s(batch):.2f} tok/s "
            f"aggregate ({sum(batch['n_tokens'])} tokens in {batch['wall_s']:.1f} s)")


def figures(result: dict) -> dict:
    """Medians over rounds: single tok/s, aggregate tok/s, TTFT p50/max (pooled over the batch requests)."""
    rounds = result["rounds"]
    single = statistics.median(tok_per_s(r["single"]) for r in rounds)
    agg = statistics.median(tok_per_s(r["batch"]) for r in rounds)
    ttfts = [t for r in rounds for t in r["batch"]["ttft_s"]]
    return {"single_tok_s": single, "aggregate_tok_s": agg, "speedup": agg / single,
            "single_all": [tok_per_s(r["single"]) for r in rounds],
            "aggregate_all": [tok_per_s(r["batch"]) for r in rounds],
            "ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan"),
            "ttft_max_s": max(ttfts) if ttfts else float("nan")}


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(results: dict[str, dict]) -> list[str]:
    """Greedy agreement in the last round (informative): single vs batched within each engine, and how many batch
    outputs are identical between engines. llama-server's streamed ids can lack a token that ended mid-way through
    a UTF-8 character (see stream_completion); such sequences are compared up to the gap and counted apart."""
    lines = []
    last = {e: r["rounds"][-1] for e, r in results.items()}
    for e, r in last.items():
        same = r["single"]["tokens"][0] == r["batch"]["tokens"][0]
        lines.append(f"{e}: prompt 0 alone vs in the batch: {'identical' if same else 'DIFFERENT'} greedy tokens")
    if {"qwen25", "llamaserver"} <= last.keys():
        a, b = last["qwen25"]["batch"]["tokens"], last["llamaserver"]["batch"]["tokens"]
        complete = last["llamaserver"]["batch"]["ids_complete"]
        prefix = [common_prefix(s, t) for s, t in zip(a, b)]
        same = sum(s == t for s, t, ok in zip(a, b, complete) if ok)
        gaps = len(a) - sum(complete)
        lines.append(f"qwen25 vs llama.cpp, batch: {same}/{len(a)} token sequences identical"
                     + (f" ({gaps} not comparable in full: ids missing from llama-server's stream)" if gaps else "")
                     + f"; common greedy prefix per request: {prefix}")
    return lines


def table(results: dict[str, dict], n: int) -> list[str]:
    figs = {e: figures(r) for e, r in results.items()}
    lines = [f"| engine | load s | RSS after load MB | peak RSS MB | single-stream tok/s | {n}-concurrent aggregate "
             "tok/s | batch speedup (agg/single) | batch TTFT p50 / max s | other cores |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e, r in results.items():
        f = figs[e]
        lines.append(f"| {LABELS[e]} | {r['load_s']:.2f} | {r['rss_load_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{f['single_tok_s']:.2f} | {f['aggregate_tok_s']:.2f} | {f['speedup']:.2f}x | "
                     f"{f['ttft_p50_s']:.2f} / {f['ttft_max_s']:.2f} | {r['other_cpu_cores']:.2f} |")
    if {"qwen25", "llamaserver"} <= figs.keys():
        q, ref = figs["qwen25"], figs["llamaserver"]
        lines.append(f"| **qwen25 / llama.cpp** | | | | {q['single_tok_s'] / ref['single_tok_s']:.2f}x | "
                     f"**{q['aggregate_tok_s'] / ref['aggregate_tok_s']:.2f}x** | | "
                     f"{q['ttft_p50_s'] / ref['ttft_p50_s']:.2f}x / {q['ttft_max_s'] / ref['ttft_max_s']:.2f}x | |")
    if "qwen25" in figs:
        q = figs["qwen25"]
        goal = [f"targets: qwen25 aggregate >= 3x its single stream: {q['speedup']:.2f}x "
                f"({'met' if q['speedup'] >= 3 else 'not met'})"]
        if "llamaserver" in figs:
            ratio = q["aggregate_tok_s"] / figs["llamaserver"]["aggregate_tok_s"]
            goal.append(f"aggregate >= llama-server -np {n}: {ratio:.2f}x ({'met' if ratio >= 1 else 'not met'})")
        lines += ["", "; ".join(goal)]
    return lines


# --- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                   help="known model name (qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct) or a .gguf path")
    p.add_argument("--requests", type=int, default=8, help="concurrent requests = llama-server slots (-np)")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (EOS ignored)")
    p.add_argument("--threads", type=int, default=2, help="compute threads for each engine")
    p.add_argument("--reps", type=int, default=3, help="rounds of (single, batch) per engine; medians reported")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    p.add_argument("--llama-server", default=str(DEFAULT_SERVER),
                   help="llama-server binary (default: the one benchmarks/build_llama_server.sh builds)")
    p.add_argument("--llama-args", default="", help="extra llama-server arguments, e.g. '--cache-ram 0'")
    p.add_argument("--json", help="also write all measurements (token ids included) to this file")
    p.add_argument("--child", choices=["qwen25"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.spec, args.out)
    from bench_decode import thread_setup
    from qwen25.weights.registry import resolve_model

    engines = [e for e in args.engines.split(",") if e]
    if unknown := set(engines) - set(ENGINES):
        raise SystemExit(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    if args.requests < 1 or args.max_tokens < 1 or args.reps < 1:
        raise SystemExit("--requests, --max-tokens and --reps must be >= 1")
    binary = Path(args.llama_server)
    if "llamaserver" in engines and not binary.is_file():
        raise SystemExit(f"{binary}: no llama-server binary; run benchmarks/build_llama_server.sh or pass "
                         "--llama-server PATH (or --engines qwen25)")
    model_path = resolve_model(args.model)
    if model_path.suffix != ".gguf":
        raise SystemExit(f"{model_path}: this benchmark compares engines on a .gguf file")
    prompts = make_prompts(model_path, args.requests)
    spec = {"model_path": str(model_path), "prompts": prompts, "max_tokens": args.max_tokens, "reps": args.reps,
            "threads": args.threads}
    lengths = sorted(len(p) for p in prompts)
    header = [f"model: {model_path.name} ({model_path.stat().st_size / MB:.1f} MB)",
              f"machine: {cpu_model()}, {cpu_flags()}; load average before: {load_average()}",
              f"{args.requests} requests x {args.max_tokens} greedy tokens (EOS ignored), chat prompts of "
              f"{lengths[0]}-{lengths[-1]} tokens; {args.threads} threads; {args.reps} rounds, medians"]
    results: dict[str, dict] = {}
    for engine in engines:
        log(engine, f"starting (load average {load_average()})")
        if engine == "qwen25":
            env, threads = thread_setup("qwen25", args.threads)
            result = run_child(sys.executable, Path(__file__).resolve(), engine, spec, env)
            if result is not None:
                results[engine] = {**result, "threads": threads}
        else:
            try:
                result = run_llamaserver(spec, binary, shlex.split(args.llama_args))
                results[engine] = {**result, "threads": f"-t {args.threads} -tb {args.threads}, OMP env unset"}
            except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
                log(engine, f"FAILED: {type(exc).__name__}: {exc}")
    for engine in engines:
        r = results.get(engine)
        header.append(f"{engine}: FAILED" if r is None else f"{engine}: {r['version']}; {r['threads']}"
                      + (f"; {r['command']}" if "command" in r else ""))
    header.append(f"load average after: {load_average()}")
    lines = header + [""] + (table(results, args.requests) + [""] + agreement(results) if results else [])
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "spec": spec, "results": results,
                                               "figures": {e: figures(r) for e, r in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
