"""Server benchmarks: qwen25 vs llama-cpp-python under concurrent streaming clients; grammar-mask cost per token.

  python benchmarks/bench_server.py [compare] [--concurrency 1,4,8 --rounds 3 --max-tokens 64 --json out.json]
  python benchmarks/bench_server.py mask                 # llguidance mask cost with the real Qwen2.5 tokenizer
  python benchmarks/bench_server.py load --clients 8     # qwen25 only (or --url an already running server)

`compare` (the default) serves the same GGUF with `qwen25 serve` (OMP_WAIT_POLICY=PASSIVE, --max-concurrency = the
highest level), then with llama-cpp-python's OpenAI server from the reference venv (--n_threads 2 --n_ctx 4096
--interrupt_requests False); never both at once. After one unmeasured warm-up request, each level c runs `rounds`
batches of c simultaneous streaming chat requests (distinct fixed prompts, temperature 0, max_tokens). Reported:
TTFT p50/p95 over all requests of a level (request sent -> first content delta) and aggregate output tok/s (batch
tokens / batch wall time, median over rounds). Output tokens: the usage chunk (stream_options.include_usage) when
sent (qwen25); llama-cpp-python 0.3.36 sends none, so there max_tokens if finish_reason is "length", else the
number of content deltas (one per token, except where it holds back text that could start a stop string).

llama-cpp-python's server runs ONE request at a time (an asyncio lock around its single Llama object). With its
default --interrupt_requests True, a request arriving while another streams ends that stream early (clients see
the connection closed mid-body), so we pass False: requests queue FIFO and run to completion one after another.
Between requests it reuses the KV cache of the longest common prompt prefix (the chat-template head).

`mask` needs no weights beyond the tokenizer: it walks each schema's reference JSON token by token through
`GrammarLogitsProcessor` on random logits, timing the processor call (bitmask + applying it to 151,936 logits).
All traffic stays on 127.0.0.1; every loop and wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REF_PYTHON = Path.home() / ".cache/qwen25-ref/bin/python"
ENGINES = ("qwen25", "llamacpp")
PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is the difference between a list and a tuple in Python?",
    "Write a SQL query that returns the five most recent orders.",
    "Explain what a race condition is in one paragraph.",
    "Write a bash one-liner that counts the lines of all .py files.",
    "How do I read a JSON file in JavaScript with Node.js?",
    "Write a C function that computes the GCD of two integers.",
    "What does the `yield` keyword do in Python?",
]

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SCHEMAS: list[tuple[dict, dict]] = [
    ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
      "required": ["name", "age"]}, {"name": "Ada Lovelace", "age": 36}),
    ({"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
                                       "days": {"type": "array", "items": {"type": "integer"}, "maxItems": 7}},
      "required": ["city", "unit"]}, {"city": "Paris", "unit": "celsius", "days": [1, 2, 3]}),
    ({"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
     {"items": [{"sku": "ABC-1234", "qty": 2}, {"sku": "XYZ-0001", "qty": 10}]}),
]


def bench_mask(model: str, repeats: int) -> dict:
    import torch

    from qwen25.server.structured import StructuredOutputs, json_schema_grammar
    from qwen25.checkpoint import load_tokenizer
    from qwen25.weights.registry import resolve_model

    path = resolve_model(model)
    tokenizer = load_tokenizer(path)
    vocab = tokenizer.vocab_size  # a GGUF's vocabulary is padded to the model's logit width (151,936)
    t0 = time.perf_counter()
    so = StructuredOutputs(tokenizer, vocab, sorted(tokenizer.stop_token_ids))
    _ = so.ll_tokenizer
    init_s = time.perf_counter() - t0
    per_token: list[float] = []
    compile_ms: list[float] = []
    g = torch.Generator().manual_seed(0)
    for schema, example in SCHEMAS:
        ids = tokenizer.encode(json.dumps(example, ensure_ascii=False)) + [min(tokenizer.stop_token_ids)]
        for _ in range(repeats):
            t = time.perf_counter()
            proc = so.processor(json_schema_grammar(schema))
            compile_ms.append((time.perf_counter() - t) * 1e3)
            for k in range(len(ids)):
                logits = torch.randn(vocab, generator=g)
                t = time.perf_counter()
                out = proc(ids[:k], logits)
                per_token.append(time.perf_counter() - t)
                assert out[ids[k]] > float("-inf"), f"reference token {k} masked out: grammar/tokenizer mismatch"
    per_token.sort()
    return {"model": model, "vocab": vocab,
            "llg_tokenizer_init_s": round(init_s, 2), "tokens": len(per_token),
            "mask_ms_median": round(statistics.median(per_token) * 1e3, 3),
            "mask_ms_p90": round(per_token[int(len(per_token) * 0.9)] * 1e3, 3),
            "mask_ms_max": round(per_token[-1] * 1e3, 3),
            "grammar_compile_ms_median": round(statistics.median(compile_ms), 2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(engine: str, model: str, port: int, max_concurrency: int, llama_args: str) -> subprocess.Popen:
    """Start one server on 127.0.0.1:port; its output goes to /tmp/bench_server_ENGINE_PORT.log."""
    from qwen25.weights.registry import resolve_model

    path = str(resolve_model(model))
    env = dict(os.environ)
    if engine == "qwen25":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        cmd = [sys.executable, "-m", "qwen25.cli", "serve", "--model", path, "--host", "127.0.0.1", "--port",
               str(port), "--max-concurrency", str(max_concurrency), "--log-level", "warning"]
    else:
        env.pop("OMP_WAIT_POLICY", None)  # llama.cpp runs with its own defaults
        cmd = [str(REF_PYTHON), "-m", "llama_cpp.server", "--model", path, "--host", "127.0.0.1", "--port",
               str(port), "--n_threads", "2", "--n_threads_batch", "2", "--n_ctx", "4096",
               "--interrupt_requests", "False", "--verbose", "False", *shlex.split(llama_args)]
    log = f"/tmp/bench_server_{engine}_{port}.log"
    print(f"[{engine}] {shlex.join(cmd)}  (log: {log})", file=sys.stderr, flush=True)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _wait_ready(url: str, probe: str, proc: subprocess.Popen | None, timeout: float = 600) -> str:
    """Poll `probe` (qwen25: /health) until the server answers 200; return the served model id."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + probe, timeout=5):
                pass
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                return json.load(r)["data"][0]["id"]
        except OSError:
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise RuntimeError(f"server at {url} did not come up") from None
            time.sleep(0.5)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "unknown CPU")


def _busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds this machine spent busy since boot: user+nice+system+irq+softirq, seconds stolen by the host)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, open("/proc/stat").readline().split()[1:9])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), steal / os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


async def _stream_chat(client: Any, url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, usage, finish, text = None, None, None, []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                usage = (chunk.get("usage") or {}).get("completion_tokens", usage)
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        first = first or time.perf_counter()
                        text.append(choice["delta"]["content"])
                    finish = choice.get("finish_reason") or finish
    source = "usage" if usage is not None else "finish=length" if finish == "length" else "deltas"
    tokens = {"usage": usage, "finish=length": max_tokens, "deltas": len(text)}[source]
    return {"ttft": (first or time.perf_counter()) - start, "tokens": tokens, "source": source, "finish": finish,
            "deltas": len(text), "text": "".join(text)}


async def _batch(url: str, model: str, prompts: list[str], max_tokens: int) -> tuple[float, list[dict[str, Any]]]:
    """All prompts at once, one streaming request each; (wall seconds, per-request results)."""
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(_stream_chat(client, url, model, p, max_tokens) for p in prompts))
    return time.perf_counter() - start, list(results)


def _pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation, q in [0, 100]."""
    v, k = sorted(values), (len(values) - 1) * q / 100
    return v[int(k)] + (v[min(int(k) + 1, len(v) - 1)] - v[int(k)]) * (k - int(k))


def run_levels(url: str, model: str, levels: list[int], rounds: int, max_tokens: int,
               server_pid: int | None) -> list[dict[str, Any]]:
    cpu = (lambda: _proc_cpu_s(server_pid)) if server_pid else (lambda: 0.0)
    out = []
    for c in levels:
        reqs, rates, server_cores, other, steal = [], [], [], [], []
        for r in range(rounds):
            prompts = [PROMPTS[(r * c + i) % len(PROMPTS)] for i in range(c)]
            busy, own, srv = _busy_cpu_seconds(), sum(os.times()[:2]), cpu()
            wall, results = asyncio.run(_batch(url, model, prompts, max_tokens))
            srv = cpu() - srv
            busy2 = _busy_cpu_seconds()
            other.append(max(busy2[0] - busy[0] - srv - (sum(os.times()[:2]) - own), 0.0) / wall)
            steal.append((busy2[1] - busy[1]) / wall)
            server_cores.append(srv / wall)
            rates.append(sum(x["tokens"] for x in results) / wall)
            reqs += [{**x, "round": r, "prompt": p} for x, p in zip(results, prompts)]
        ttfts = [x["ttft"] for x in reqs]
        row = {"concurrency": c, "rounds": rounds, "requests": len(reqs), "tokens": sum(x["tokens"] for x in reqs),
               "ttft_p50_s": round(_pct(ttfts, 50), 3), "ttft_p95_s": round(_pct(ttfts, 95), 3),
               "agg_tok_s": round(statistics.median(rates), 2), "agg_tok_s_rounds": [round(x, 2) for x in rates],
               "token_count": sorted({x["source"] for x in reqs}),
               "server_cores": round(statistics.median(server_cores), 2), "other_cores_max": round(max(other), 2),
               "steal_cores_max": round(max(steal), 2),
               "requests_detail": reqs}
        print(f"  c={c}: TTFT p50 {row['ttft_p50_s']:.2f}s p95 {row['ttft_p95_s']:.2f}s, {row['agg_tok_s']} tok/s "
              f"({row['tokens']} tokens), server {row['server_cores']} cores, others <= {row['other_cores_max']}, "
              f"steal <= {row['steal_cores_max']}",
              file=sys.stderr, flush=True)
        out.append(row)
    return out


def bench_engine(engine: str, model: str, levels: list[int], rounds: int, max_tokens: int,
                 llama_args: str = "", url: str | None = None) -> dict[str, Any]:
    """Start `engine`'s server (unless `url` is given), warm it up, run every level, stop it."""
    proc = None
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _start(engine, model, port, max(levels), llama_args)
    try:
        t0 = time.perf_counter()
        served = _wait_ready(url, "/health" if engine == "qwen25" else "/v1/models", proc)
        ready_s = time.perf_counter() - t0
        asyncio.run(_batch(url, served, [PROMPTS[0]], 8))  # warm-up, not measured
        time.sleep(2)  # let background start-up work (qwen25's llguidance tokenizer) finish
        load = load_average()
        print(f"[{engine}] ready in {ready_s:.1f}s; load average {load}", file=sys.stderr, flush=True)
        rows = run_levels(url, served, levels, rounds, max_tokens, proc.pid if proc else None)
        return {"engine": engine, "url": url, "ready_s": round(ready_s, 1), "load_before": load, "levels": rows}
    finally:
        if proc is not None:
            _stop(proc)


def wait_idle(max_wait_s: float, quiet_s: float = 60, threshold: float = 0.5) -> str:
    """Wait until the 1-minute load average stays below `threshold` for `quiet_s` (give up after `max_wait_s`)."""
    deadline, quiet_since = time.monotonic() + max_wait_s, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet_s:
        time.sleep(5)
        quiet_since = quiet_since if os.getloadavg()[0] < threshold else time.monotonic()
    idle = max_wait_s > 0 and time.monotonic() - quiet_since >= quiet_s
    state = "idle" if idle else f"NOT idle after {max_wait_s:.0f} s of waiting" if max_wait_s else "no idle wait"
    return f"{state} (load average {load_average()})"


def compare(args: argparse.Namespace) -> dict[str, Any]:
    levels = [int(x) for x in args.concurrency.split(",")]
    machine = wait_idle(args.wait_idle)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cpus; {machine}", file=sys.stderr, flush=True)
    results = {}
    for e in args.engines.split(","):
        try:
            results[e] = bench_engine(e, args.model, levels, args.rounds, args.max_tokens, args.llama_args)
        except Exception as exc:  # noqa: BLE001 - keep the other engine's results
            print(f"[{e}] FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            results[e] = {"engine": e, "error": f"{type(exc).__name__}: {exc}", "levels": []}
    report = {"model": args.model, "max_tokens": args.max_tokens, "rounds": args.rounds, "machine": machine,
              "load_after": load_average(), "engines": results}
    print_table(report)
    return report


def print_table(report: dict[str, Any]) -> None:
    engines = report["engines"]
    rows = {(e, r["concurrency"]): r for e, res in engines.items() for r in res["levels"]}
    print(f"\nmodel {report['model']}, max_tokens {report['max_tokens']}, {report['rounds']} rounds per level; "
          f"{report['machine']}; after: {report['load_after']}")
    print("| engine | clients | TTFT p50 s | TTFT p95 s | aggregate tok/s | tokens | qwen25/llama.cpp: tok/s, "
          "TTFT p50 |")
    print("|---|---|---|---|---|---|---|")
    for (e, c), r in sorted(rows.items(), key=lambda kv: (kv[0][1], ENGINES.index(kv[0][0]))):
        ref = rows.get(("llamacpp", c))
        ratio = (f"{r['agg_tok_s'] / ref['agg_tok_s']:.2f}x, {r['ttft_p50_s'] / ref['ttft_p50_s']:.2f}x"
                 if e == "qwen25" and ref and ref["agg_tok_s"] and ref["ttft_p50_s"] else "")
        name = "qwen25" if e == "qwen25" else "llama-cpp-python"
        print(f"| {name} | {c} | {r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | {r['agg_tok_s']:.1f} | "
              f"{r['tokens']} | {ratio} |")
    for e, res in engines.items():
        if "error" in res:
            print(f"{e}: FAILED ({res['error']})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="compare", choices=["compare", "mask", "load"])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--concurrency", default="1,4,8", help="compare: comma-separated client counts")
    p.add_argument("--rounds", type=int, default=3, help="compare: batches per concurrency level")
    p.add_argument("--engines", default="qwen25,llamacpp", help="compare: which servers, in this order")
    p.add_argument("--llama-args", default="", help="compare: extra llama_cpp.server arguments")
    p.add_argument("--wait-idle", type=float, default=0, help="compare: wait up to this many s for an idle machine")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--repeats", type=int, default=3, help="mask: passes over each schema")
    p.add_argument("--url", default=None, help="load: an already running server")
    p.add_argument("--clients", type=int, default=8, help="load: concurrent clients")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    if args.what == "compare":
        out = compare(args)
    elif args.what == "mask":
        import torch

        torch.set_num_threads(min(os.cpu_count() or 1, 8))
        out = bench_mask(args.model, args.repeats)
    else:
        out = bench_engine("qwen25", args.model, [args.clients], 1, args.max_tokens, url=args.url)
    if args.what != "compare":
        print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
