"""The `qwen25` command: generate, chat, serve, eval, quantize, download, models.

The only place that sets process-wide settings (thread counts, OpenMP wait policy). Every subcommand maps
to a small function; errors a user can fix print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

EXIT_USAGE = 2
EXIT_ERROR = 1

EPILOG = """examples:
  qwen25 chat                                   chat with the default model (downloads it once)
  qwen25 chat --prompt "Write a haiku"          answer one message and exit
  echo "Explain GQA" | qwen25 chat              answer piped text and exit
  qwen25 generate --prompt "def fib(n):" --temperature 0 --max-tokens 64
  qwen25 models                                 list known models and what is cached
  qwen25 download qwen2.5-coder-1.5b-instruct   fetch a model into the cache
  qwen25 quantize qwen2.5-coder-0.5b-instruct --bits 4 && qwen25 chat --quantization q4
                                                int4 layer weights: 60% of the default int8 path's bytes

models: a known name (see `qwen25 models`), a .gguf file, an HF directory, or an HF repo id (needs network).
cache: $QWEN25_HOME, else $XDG_CACHE_HOME/qwen25, else ~/.cache/qwen25."""


def _configure_runtime(threads: int | None) -> None:
    # Spin-waiting OpenMP workers stall for milliseconds whenever another process holds a core (2-core
    # machines): passive waiting is measurably faster there. Must be set before torch starts its pool.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(threads or min(os.cpu_count() or 1, 8))


# --- argument groups -------------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    from qwen25.weights.registry import DEFAULT_MODEL

    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"model name, .gguf file, HF directory or HF repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (float32 is fastest on CPUs without native bf16; default: float32)")
    p.add_argument("--quantization", "-q", default="auto", choices=["auto", "q8", "q4", "none"],
                   help="weights in memory: q8 = int8 (fast CPU path), q4 = int4 (less memory, slightly lower "
                        "quality; see `qwen25 quantize --help`), none = dequantized --dtype (reference); "
                        "auto = q8 for GGUF files, none for HF directories (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, at most 8)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model's own generation settings)")
    g.add_argument("--max-tokens", type=int, default=None, help="maximum new tokens (default: 512)")
    g.add_argument("--temperature", "-t", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p * max prob")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    g.add_argument("--presence-penalty", type=float, default=None, help="in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, default=None, help="in [-2, 2]")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")


def _sampling_params(llm, args: argparse.Namespace):  # noqa: ANN001 - LLM imported lazily
    from dataclasses import replace

    params = llm.get_default_sampling_params()
    overrides = {name: getattr(args, name) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                                         "presence_penalty", "frequency_penalty", "seed", "stop")
                 if getattr(args, name) is not None}
    overrides["max_tokens"] = args.max_tokens if args.max_tokens is not None else 512
    return replace(params, **overrides)  # replace() re-runs validation


def _validate_sampling_args(args: argparse.Namespace) -> None:
    """Check sampling values before the (slow) model load, so a typo fails in milliseconds."""
    from qwen25.sampling_params import SamplingParams

    given = {name: getattr(args, name) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                                     "presence_penalty", "frequency_penalty", "max_tokens")
             if getattr(args, name) is not None}
    SamplingParams(**given)


def _load(args: argparse.Namespace):  # noqa: ANN202
    from qwen25.llm import LLM

    _configure_runtime(args.threads)
    return LLM(args.model, dtype=args.dtype, quantization=args.quantization)


# --- subcommands -----------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    _validate_sampling_args(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llm = _load(args)
    params = _sampling_params(llm, args)
    if args.chat:
        prompt = llm.apply_chat_template([{"role": "user", "content": prompt}])
    if args.echo:
        sys.stdout.write(prompt)
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


CHAT_HELP = """commands: /reset (forget the conversation)  /system TEXT (set the system prompt and reset)
          /exit (quit; Ctrl-D works too)  /help"""


def cmd_chat(args: argparse.Namespace) -> int:
    _validate_sampling_args(args)
    once = args.prompt is not None or not sys.stdin.isatty()
    first = args.prompt if args.prompt is not None else (sys.stdin.read() if once else None)
    if once and not (first or "").strip():
        print("qwen25: error: empty message (give --prompt TEXT or pipe text in)", file=sys.stderr)
        return EXIT_USAGE
    llm = _load(args)
    params = _sampling_params(llm, args)
    system = args.system
    history: list[dict] = []

    def reply(user_text: str) -> None:
        history.append({"role": "user", "content": user_text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        parts: list[str] = []
        for delta in llm.chat_stream(messages, params):
            parts.append(delta.text)
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(parts)})

    if once:
        reply(first.strip())
        return 0
    print(f"qwen25 chat — {args.model}. {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/help":
            print(CHAT_HELP, file=sys.stderr)
        elif text == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
        elif text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history.clear()
            print(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)", file=sys.stderr)
        elif text.startswith("/"):
            print(f"unknown command {text.split()[0]}. {CHAT_HELP}", file=sys.stderr)
        else:
            try:
                reply(text)
            except KeyboardInterrupt:
                print("\n(interrupted)", file=sys.stderr)
                history.pop()


def cmd_download(args: argparse.Namespace) -> int:
    from qwen25.weights.registry import resolve_model

    path = resolve_model(args.name)
    print(path)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from qwen25.weights.registry import DEFAULT_MODEL, KNOWN_MODELS, cache_dir, cached_path, is_cached

    print(f"{'name':32} {'size':>9}  {'cached':6}  description")
    for name, m in KNOWN_MODELS.items():
        mark = "yes" if is_cached(m) else "no"
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:32} {m.size / 1e6:7.0f}MB  {mark:6}  {m.description}{default}")
    print(f"\ncache: {cache_dir()}")
    if args.paths:
        for m in KNOWN_MODELS.values():
            if is_cached(m):
                print(f"  {cached_path(m)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from qwen25.server.app import create_app_from_checkpoint
    except ImportError as e:
        print(f"qwen25: error: serving needs the [serve] extra ({e.name} is missing): pip install 'qwen25[serve]'",
              file=sys.stderr)
        return EXIT_ERROR
    if args.max_concurrency < 1 or args.max_queue < 0:
        print("qwen25: error: --max-concurrency must be >= 1 and --max-queue >= 0", file=sys.stderr)
        return EXIT_USAGE
    llm = _load(args)
    name = args.served_model_name or args.model
    app = create_app_from_checkpoint(llm.checkpoint, served_model_name=name, aliases=[args.model, str(llm.path)],
                                     api_key=args.api_key, max_concurrency=args.max_concurrency,
                                     max_queue=args.max_queue)
    print(f"qwen25 serve: {args.served_model_name or args.model} on http://{args.host}:{args.port} "
          f"(chat page at /, OpenAI API at /v1)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


QUANTIZE_EPILOG = """examples:
  qwen25 quantize qwen2.5-coder-0.5b-instruct --bits 4   int4 weights for the default model, into the cache
  qwen25 chat --quantization q4                           ...which this then memory-maps
  qwen25 quantize ~/models/Qwen2.5-1.5B-Instruct          an HF directory (bf16/fp16/fp32 safetensors) to int8
  qwen25 generate --model ~/models/Qwen2.5-1.5B-Instruct --quantization q8 --prompt "..."
  qwen25 quantize model.gguf --bits 4 --output model-q4.safetensors
  qwen25 chat --model model-q4.safetensors                a --output file loads directly (the source must stay)

formats:
  q8  int8, one fp32 scale per group (default 128 weights): 1.03 bytes/weight; perplexity within 0.2% of fp32
      on Qwen2.5-Coder-0.5B. What `--quantization auto` uses for GGUF files.
  q4  int4 codes two per byte, one fp16 scale and one fp16 offset per group (default 32; 64 and 128 cost 2x
      and 3x the perplexity); v_proj, the last layer, the embedding and lm_head stay int8. Layer weights at
      0.65 bytes each; perplexity 0.4% above fp32 on Qwen2.5-Coder-0.5B. Less memory than q8; on a 2-core
      AVX2 CPU not faster (both kernels are bound by converting weights to fp32).
Without --output the result goes to the repack cache (`repacked/` in the model cache, see `qwen25 models`), where
`--quantization q8|q4` on the same model finds it and memory-maps it; it replaces an earlier entry for the same
model and bits. Loading with --quantization q8|q4 and no entry builds one with the default group."""


def cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from qwen25.weights.quantized import check_settings, quantize_checkpoint
    from qwen25.weights.registry import resolve_model

    group = check_settings(args.bits, args.group_size)  # before any download or load
    output = Path(args.output).expanduser() if args.output else None
    if output is not None and (output.suffix != ".safetensors" or output.is_dir()):
        raise ValueError(f"--output {args.output}: must be a file name ending in .safetensors")
    _configure_runtime(args.threads)
    source = resolve_model(args.source)
    with tqdm(desc=f"quantizing to q{args.bits}", unit="layer", disable=args.no_progress or None) as bar:
        def progress(total: int):  # noqa: ANN202
            bar.reset(total)
            return lambda: bar.update(1)

        result = quantize_checkpoint(source, args.bits, group, output, progress)
    print(f"wrote {result.path}")
    print(f"  q{result.bits}, group {result.group}: {result.file_bytes / 1e6:.1f} MB for {result.weights / 1e6:.1f}M "
          f"weights = {result.bytes_per_weight:.3f} bytes/weight ({8 * result.bytes_per_weight:.2f} bits), "
          f"in {result.seconds:.1f} s")
    print(f"  decoder-layer projections: {result.layer_bytes_per_weight:.3f} bytes/weight; embedding and lm_head: int8")
    model = str(output) if output is not None else f"{args.source} --quantization q{result.bits}"
    print(f"  use it: qwen25 chat --model {model}")
    return 0


# --- entry point -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen25", description="Run Qwen2.5 models: chat, generate, manage models.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="qwen25 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=fn)
        return p

    p = add("generate", cmd_generate, "complete a prompt (raw text, or a single user turn with --chat)")
    p.add_argument("--prompt", "-p", default=None, help="prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user message")
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    _add_model_args(p)
    _add_sampling_args(p)

    p = add("chat", cmd_chat, "chat interactively (streams the reply); with --prompt or piped stdin answer once")
    p.add_argument("--prompt", "-p", default=None, help="answer this one message and exit")
    p.add_argument("--system", "-s", default=None, help="system prompt (default: the template's own)")
    _add_model_args(p)
    _add_sampling_args(p)

    p = add("serve", cmd_serve, "serve the model over an OpenAI-compatible HTTP API, with a chat page at /")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("QWEN25_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $QWEN25_API_KEY; none = open)")
    p.add_argument("--max-concurrency", type=int, default=8, help="requests decoded together (default: 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests allowed to wait beyond that; more get HTTP 429 (default: 64)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: --model)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    p = add("download", cmd_download, "fetch a known model (or resolve a path/repo id) into the cache")
    p.add_argument("name", help="a known model name (see `qwen25 models`)")

    p = add("quantize", cmd_quantize, "quantize a model's weights to int8 or int4 and cache them for fast loading")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = QUANTIZE_EPILOG
    p.add_argument("source", metavar="SRC", help="HF model directory (safetensors), .gguf file or known model name")
    p.add_argument("--bits", "-b", type=int, default=8, metavar="{8,4}", help="weight bits (default: 8)")
    p.add_argument("--group-size", "-g", type=int, default=None, metavar="G",
                   help="weights per scale, a multiple of 32 (default: 128 for 8 bits, 32 for 4 bits)")
    p.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="write this .safetensors file instead of the repack cache entry")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, at most 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = add("models", cmd_models, "list known models, their sizes and whether they are cached")
    p.add_argument("--paths", action="store_true", help="also print the paths of cached files")

    from qwen25.eval.cli import add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError, KeyError, OSError, NotImplementedError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"qwen25: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
