"""Speculative decoding vs plain greedy decoding on the real Qwen2.5-Coder GGUFs, in one run.

  python benchmarks/bench_speculative.py                                   # 0.5B: plain vs prompt lookup
  python benchmarks/bench_speculative.py --model qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct
  python benchmarks/bench_speculative.py --server                          # the same through `qwen25 serve`'s app

With --server every mode is served by the OpenAI app (`create_app_from_checkpoint`, uvicorn on a loopback port,
the server's defaults for anything not sent) and the prompts go over HTTP as chat
requests with temperature 0 and --repetition-penalty (default 1.0, as in the LLM mode); tokens/s counts the
completion tokens the server reports.

For each prompt (chat-formatted coding requests, two of which quote code the answer repeats) and each mode
(plain greedy on the engine; n-gram prompt lookup; a draft model if --draft is given), generate --max-tokens
greedy tokens and report tokens/s, the acceptance rate (accepted / drafted), tokens per target pass, and
whether the tokens equal plain greedy decoding (they must). One process, modes run one after another;
OMP_WAIT_POLICY=PASSIVE, --threads torch threads. The machine is noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CODE = '''def merge_sorted(a, b):
    result = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            result.append(a[i])
            i += 1
        else:
            result.append(b[j])
            j += 1
    result.extend(a[i:])
    result.extend(b[j:])
    return result
'''
PROMPTS = {
    "add type hints": "Add type hints and a docstring to this function:\n\n" + CODE,
    "rename a variable": "Rename the variable result to merged in this code and show the whole function:\n\n" + CODE,
    "write from scratch": "Write a Python function that checks whether a number is prime.",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="target model (name or path)")
    p.add_argument("--draft", default=None, help="draft model for the draft-model mode (same tokenizer)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens (default 4)")
    p.add_argument("--lookup-max", type=int, default=3, help="prompt_lookup_max (default 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--server", action="store_true", help="measure through the HTTP server instead of LLM.chat")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="sent with every request (default 1.0; the GGUF's server default is 1.05)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from qwen25 import SamplingParams

    torch.set_num_threads(args.threads)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, repetition_penalty=args.repetition_penalty)
    modes: dict[str, dict | None] = {"plain": None,
                                     "ngram": {"method": "ngram", "num_speculative_tokens": args.k,
                                               "prompt_lookup_max": args.lookup_max}}
    if args.draft:
        modes["draft"] = {"model": args.draft, "num_speculative_tokens": args.k}
    results: dict[str, dict] = {}
    reference: dict[str, list[int]] = {}
    run = run_server if args.server else run_llm
    for mode, config in modes.items():
        for name, row in run(args, config, params).items():
            output = row.pop("output")
            row["identical"] = output == reference.setdefault(name, output)
            results.setdefault(name, {})[mode] = row
            print(f"[{mode}] {name}: {row}", file=sys.stderr, flush=True)
    print(f"\n{'through the HTTP server' if args.server else 'LLM.chat'}: model {args.model}, draft {args.draft or '-'}, k={args.k}, {args.max_tokens} tokens, "
          f"repetition_penalty {args.repetition_penalty}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    head = "| prompt | " + " | ".join(f"{m} tok/s" for m in modes) + " | " + " | ".join(
        f"{m} speed-up / accept / tok per pass" for m in modes if m != "plain") + " | identical |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, row in results.items():
        plain = row["plain"]["tok_s"]
        cells = [f"{row[m]['tok_s']:.1f}" for m in modes]
        cells += [f"{row[m]['tok_s'] / plain:.2f}x / {row[m]['acceptance']:.2f} / {row[m]['tokens_per_pass']:.2f}"
                  for m in modes if m != "plain"]
        same = all(row[m]["identical"] for m in modes)
        print(f"| {name} | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


def run_llm(args: argparse.Namespace, config: dict | None, params) -> dict[str, dict]:  # noqa: ANN001
    from qwen25 import LLM, SamplingParams

    llm = LLM(args.model, speculative_config=config)
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    rows = {}
    for name, text in PROMPTS.items():
        before = dict(vars(llm.speculative_stats)) if config is not None else None
        start = time.perf_counter()
        out = llm.chat([{"role": "user", "content": text}], params)[0].outputs[0]
        seconds = time.perf_counter() - start
        row = {"tokens": len(out.token_ids), "seconds": round(seconds, 2),
               "tok_s": round(len(out.token_ids) / seconds, 2), "output": out.token_ids}
        if before is not None:
            after = vars(llm.speculative_stats)
            drafted, accepted, passes, emitted = (after[k] - before[k] for k in
                                                  ("drafted", "accepted", "target_passes", "emitted"))
            row.update(acceptance=round(accepted / max(drafted, 1), 3), tokens_per_pass=round(emitted / max(passes, 1), 2))
        rows[name] = row
    return rows


def run_server(args: argparse.Namespace, config: dict | None, params) -> dict[str, dict]:  # noqa: ANN001
    import socket
    import threading

    import httpx
    import uvicorn

    from qwen25.checkpoint import load
    from qwen25.server.app import create_app_from_checkpoint
    from qwen25.weights.registry import resolve_model

    path = resolve_model(args.model)
    checkpoint = load(path, quantization="q8" if path.is_file() else None)
    settings = {"speculative_config": config} if config is not None else {}
    app = create_app_from_checkpoint(checkpoint, served_model_name="m", **settings)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def chat(text: str, max_tokens: int) -> dict:
        body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                "temperature": 0, "repetition_penalty": args.repetition_penalty}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()

    def spec_counters() -> tuple[float, float]:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("qwen25_engine_spec")}
        return values.get("qwen25_engine_spec_drafted_tokens", 0.0), values.get("qwen25_engine_spec_accepted_tokens", 0.0)

    try:
        chat("Hi", 4)  # warm-up
        rows = {}
        for name, text in PROMPTS.items():
            drafted0, accepted0 = spec_counters()
            start = time.perf_counter()
            reply = chat(text, params.max_tokens)
            seconds = time.perf_counter() - start
            drafted, accepted = (b - a for a, b in zip((drafted0, accepted0), spec_counters()))
            tokens = reply["usage"]["completion_tokens"]
            row = {"tokens": tokens, "seconds": round(seconds, 2), "tok_s": round(tokens / seconds, 2),
                   "output": reply["choices"][0]["message"]["content"]}
            if config is not None:
                passes = max(tokens - accepted, 1)  # each pass emits its accepted drafts plus one token
                row.update(acceptance=round(accepted / max(drafted, 1), 3), tokens_per_pass=round(tokens / passes, 2))
            rows[name] = row
        return rows
    finally:
        server.should_exit = True
        thread.join(timeout=30)


if __name__ == "__main__":
    main()
