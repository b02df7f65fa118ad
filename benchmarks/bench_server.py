"""Server benchmarks: grammar-mask cost per token, and end-to-end serving under concurrent streaming clients.

  python benchmarks/bench_server.py mask                 # llguidance mask cost with the real Qwen2.5 tokenizer
  python benchmarks/bench_server.py load --clients 8     # starts `qwen25 serve` on 127.0.0.1, N streaming clients
  python benchmarks/bench_server.py load --url http://127.0.0.1:8000   # an already running server

`mask` needs no model weights beyond the tokenizer: it walks each schema's reference JSON token by token through
`GrammarLogitsProcessor` on random logits, timing the processor call (bitmask + applying it to 151,936 logits).
`load` reports aggregate generated tokens/s, time to first token and per-client tokens/s. All traffic stays on
127.0.0.1 and every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

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
    from qwen25.tokenizer import Tokenizer
    from qwen25.weights.registry import resolve_model

    path = resolve_model(model)
    tokenizer = Tokenizer.from_gguf(path) if str(path).endswith(".gguf") else Tokenizer.from_pretrained_dir(path)
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


def _stream_chat(url: str, model: str, prompt: str, max_tokens: int, result: dict) -> None:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                       "max_tokens": max_tokens, "temperature": 0,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                result["tokens"] = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    result.update(ttft=(first or end) - start, seconds=end - start)


def bench_load(url: str | None, model: str, clients: int, max_tokens: int) -> dict:
    proc = None
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "qwen25.cli", "serve", "--model", model, "--port", str(port),
                                 "--max-concurrency", str(clients), "--log-level", "warning"])
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                    raise RuntimeError("server did not come up") from None
                time.sleep(0.5)
        with urllib.request.urlopen(url + "/v1/models") as r:
            served = json.load(r)["data"][0]["id"]
        prompts = [f"Write a short note about the number {i}." for i in range(clients)]
        results = [{} for _ in prompts]
        threads = [threading.Thread(target=_stream_chat, args=(url, served, p, max_tokens, res))
                   for p, res in zip(prompts, results)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        tokens = sum(r.get("tokens", 0) for r in results)
        return {"clients": clients, "max_tokens": max_tokens, "wall_s": round(wall, 2), "tokens": tokens,
                "aggregate_tok_s": round(tokens / wall, 2),
                "ttft_s_median": round(statistics.median(r["ttft"] for r in results), 2),
                "per_client_tok_s_median": round(statistics.median(r.get("tokens", 0) / r["seconds"]
                                                                    for r in results), 2)}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["mask", "load"])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--url", default=None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads or min(os.cpu_count() or 1, 8))
    if args.what == "mask":
        print(json.dumps(bench_mask(args.model, args.repeats), indent=2))
    else:
        print(json.dumps(bench_load(args.url, args.model, args.clients, args.max_tokens), indent=2))


if __name__ == "__main__":
    main()
