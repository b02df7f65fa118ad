"""What YaRN costs a prompt that fits the native window: perplexity of one fixed text with no scaling, static
YaRN and dynamic YaRN (Qwen2.5's recommended factor 4 over a 32K native window).

Static YaRN (vLLM's, the Qwen2.5 report's) rescales every RoPE frequency and the attention logits whatever the
length, so a short prompt runs with positions the model was not trained on; dynamic YaRN leaves sequences within
the native window unscaled (`qwen25.model.long_context`). The text: --tokens tokens of a Python standard library
module's source (default argparse.py of the running interpreter, named in the output), one cache-less forward
per setting on qwen25's PyTorch modules (q8 weights from the GGUF, fp32 activations), negative log-likelihood of
every token after the first.

    python benchmarks/bench_yarn_ppl.py [--model qwen2.5-coder-0.5b-instruct] [--tokens 2048] [--factor 4]
                                        [--text PATH] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path
from time import perf_counter

NATIVE_WINDOW = 32768
CHUNK = 256  # logits computed for this many positions at a time (a 2K x 151,936 fp32 matrix is 1.2 GB)


def settings(factor: float) -> dict[str, dict | None]:
    yarn = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": NATIVE_WINDOW}
    return {"none": None, "static YaRN": yarn, "dynamic YaRN": {**yarn, "dynamic": True}}


def perplexity(model, ids: list[int]) -> tuple[float, float]:  # noqa: ANN001 (a Qwen2ForCausalLM)
    """(perplexity, mean NLL in nats) of ids[1:] given the preceding tokens, in one forward pass."""
    import torch

    with torch.inference_mode():
        x = torch.tensor([ids])
        hidden = model.model(x)[0]  # (T, hidden)
        nll = 0.0
        for start in range(0, len(ids) - 1, CHUNK):
            end = min(start + CHUNK, len(ids) - 1)
            logits = model.lm_head(hidden[start:end]).float()
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, start + 1:end + 1], reduction="sum"))
    mean = nll / (len(ids) - 1)
    return math.exp(mean), mean


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="known model name or a .gguf path")
    p.add_argument("--tokens", type=int, default=2048, help="length of the text in tokens (within the window)")
    p.add_argument("--factor", type=float, default=4.0, help="YaRN factor")
    p.add_argument("--text", default=argparse.__file__, help="text file (default: stdlib argparse.py)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if not 2 <= args.tokens <= NATIVE_WINDOW:
        raise SystemExit(f"--tokens must be in [2, {NATIVE_WINDOW}] (within the native window), got {args.tokens}")

    import torch

    torch.set_num_threads(args.threads)
    from qwen25 import LLM
    from qwen25.model.long_context import set_long_context

    llm = LLM(args.model)
    ids = llm.tokenizer.encode(Path(args.text).read_text(encoding="utf-8"))[: args.tokens]
    if len(ids) < args.tokens:
        raise SystemExit(f"{args.text} has only {len(ids)} tokens; pass a longer --text or fewer --tokens")
    print(f"model: {llm.path.name} ({llm.quantization} weights); text: the first {len(ids)} tokens of {args.text} "
          f"(Python {platform.python_version()}); YaRN factor {args.factor} over {NATIVE_WINDOW}")
    print("| RoPE | perplexity | mean NLL (nats) | vs none |\n|---|---|---|---|")
    base = None
    for name, rope_scaling in settings(args.factor).items():
        set_long_context(llm.model, rope_scaling if rope_scaling is not None else {})
        t0 = perf_counter()
        ppl, nll = perplexity(llm.model, ids)
        base = ppl if base is None else base
        print(f"| {name} | {ppl:.4f} | {nll:.5f} | {ppl / base - 1:+.2%} |", flush=True)
        print(f"  ({perf_counter() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
