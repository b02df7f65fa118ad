"""The `qwen25` command: generate, chat, serve, eval, quantize, download, models.

Every subcommand is a config dataclass whose fields are its flags (`qwen25.cli_args`) and a `main(cfg)`:
generate, chat and serve live here; models, download and quantize in `qwen25.weights.cli`; eval in
`qwen25.eval.cli`. Process-wide settings come from `qwen25.runtime`, called by each command before it loads
a model, and put back when `main` returns. Errors a user can fix print one line and exit non-zero, never a
traceback: a bad flag, file or input (stdin or a text flag that is not UTF-8) names what is wrong; anything
unexpected is one line too, with the traceback behind QWEN25_DEBUG=1. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from qwen25.cli_args import add_command, arg, parse_args
from qwen25.cli_input import check_text, one_line, read_stdin
from qwen25.context_args import ContextArgs
from qwen25.data.cli import add_data_parser
from qwen25.eval.cli import add_eval_parser
from qwen25.export_cli import add_export_parser
from qwen25.runtime import restored_runtime
from qwen25.server.serve_args import ServeLimitsArgs, is_loopback, serve_api_key
from qwen25.quantize_cli import add_quantize_parser
from qwen25.train.cli import add_train_parser
from qwen25.weights import cli as weights_cli
from qwen25.weights.registry import DEFAULT_MODEL

EXIT_USAGE = 2
EXIT_ERROR = 1

EPILOG = """examples:
  qwen25 chat                                   chat with the default model (downloads it once)
  qwen25 chat --prompt "Write a haiku"          answer one message and exit
  echo "Explain GQA" | qwen25 chat              answer piped text and exit
  qwen25 generate --prompt "def fib(n):" --temperature 0 --max-tokens 64
  qwen25 models                                 list known models and what is cached
  qwen25 download qwen2.5-coder-1.5b-instruct   fetch a model into the cache
  qwen25 quantize ~/models/Qwen2.5-1.5B-Instruct -o q8.gguf   an HF directory as a Q8_0 GGUF (llama.cpp too)
  qwen25 serve --config serve.toml --port 9000  options from a file (keys are the flag names), flags win

models: a known name (see `qwen25 models`), a .gguf file, an HF directory, or an HF repo id (needs network).
cache: $QWEN25_HOME, else $XDG_CACHE_HOME/qwen25, else ~/.cache/qwen25."""

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "stop")


# --- option groups ---------------------------------------------------------------------------------
@dataclass
class ModelArgs(ContextArgs):
    model: str = arg(DEFAULT_MODEL, short="-m")
    """model name, .gguf file, HF directory or HF repo id"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """compute dtype (float32 is fastest on CPUs without native bf16; default: float32)"""
    quantization: Literal["auto", "gguf", "q8", "q4", "none"] = arg("auto", short="-q")
    """weights in memory: gguf = a GGUF file's own blocks (memory-mapped, no requantization), q8 = Q8_0 blocks
    quantized at load, q4 = Q4_K/Q5_0 blocks (less memory, slightly lower quality; see `qwen25 quantize --help`),
    none = dequantized --dtype (reference); auto = gguf for GGUF files, q8 for them with --lora, none for HF
    directories (default: auto). gguf follows llama.cpp's greedy text token for token"""
    threads: int | None = None
    """torch threads (default: all cores, at most 8)"""
    lora: str | None = arg(None, metavar="ADAPTER_DIR")
    """a LoRA adapter directory (peft format) for --model: merged into the weights at load, then quantized
    as --quantization says"""

    allow_special_tokens_in_content: bool = False
    """let control-token spellings (<|im_start|>, <tool_call>, ...) inside chat messages, tools and tool results
    act as control tokens, as transformers and vLLM do (default: they are plain text, so a message cannot forge a
    system turn or a tool call)"""

    def load(self) -> Any:
        """The `LLM`, after the process-wide runtime settings. A file the loader trips over is a one-line
        ValueError naming the model, whatever the loader raised."""
        from qwen25.llm import LLM
        from qwen25.runtime import configure_runtime

        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        self.check_context_flags()  # a bad JSON is a usage error before the (slow) load
        configure_runtime(self.threads)
        try:
            return LLM(self.model, dtype=self.dtype, quantization=self.quantization, lora=self.lora,
                       allow_special_tokens_in_content=self.allow_special_tokens_in_content,
                       engine_kwargs=self.engine_settings(), **self.long_context())
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.model}: a file of the model is not UTF-8 text ({e.reason} at byte {e.start})") \
                from None
        except (OSError, ValueError, KeyError, NotImplementedError, MemoryError):
            raise  # these already say what is wrong (main prints them)
        except Exception as e:  # a malformed file tripping the loader (a wrong type in a JSON config, ...)
            raise ValueError(f"{self.model}: cannot load: {type(e).__name__}: {e}") from e


@dataclass
class SamplingArgs:
    cli_group = "sampling (defaults: the model's own generation settings)"

    max_tokens: int | None = None
    """maximum new tokens (default: 512)"""
    temperature: float | None = arg(None, short="-t")
    """0 = greedy"""
    top_p: float | None = None
    """nucleus sampling mass in (0, 1]"""
    top_k: int | None = None
    """keep the k most likely tokens (0 = off)"""
    min_p: float | None = None
    """drop tokens below min_p * max prob"""
    repetition_penalty: float | None = None
    """> 1 discourages repeats"""
    presence_penalty: float | None = None
    """in [-2, 2]"""
    frequency_penalty: float | None = None
    """in [-2, 2]"""
    seed: int | None = None
    """random seed for reproducible sampling"""
    stop: list[str] | None = arg(None, metavar="TEXT")
    """stop string (repeatable)"""

    def check_sampling(self) -> None:
        """Check sampling values before the (slow) model load, so a typo fails in milliseconds."""
        from qwen25.sampling_params import SamplingParams

        given = {name: getattr(self, name) for name in (*SAMPLING_FIELDS[:-2], "max_tokens")}
        for name, value in given.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"--seed must fit in 64 bits, got {self.seed}")
        for stop in self.stop or []:
            check_text("--stop", stop)
        SamplingParams(**{k: v for k, v in given.items() if v is not None})

    def sampling_params(self, llm: Any) -> Any:
        """The model's defaults with the given flags on top (replace() re-runs validation)."""
        from dataclasses import replace

        overrides = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        overrides["max_tokens"] = self.max_tokens if self.max_tokens is not None else 512
        return replace(llm.get_default_sampling_params(), **overrides)


# --- generate / chat -------------------------------------------------------------------------------
@dataclass
class GenerateConfig(SamplingArgs, ModelArgs):
    prompt: str | None = arg(None, short="-p")
    """prompt text (default: read stdin)"""
    chat: bool = False
    """wrap the prompt in the chat template as a user message"""
    echo: bool = False
    """print the prompt before the completion"""


def cmd_generate(cfg: GenerateConfig) -> int:
    cfg.check_sampling()
    prompt = check_text("--prompt", cfg.prompt) if cfg.prompt is not None else read_stdin()
    llm = cfg.load()
    params = cfg.sampling_params(llm)
    if cfg.chat:  # the text is a user message: control-token spellings in it stay text (chat_prompt)
        prompt = llm.chat_prompt([{"role": "user", "content": prompt}])
    if cfg.echo:
        sys.stdout.write(prompt if isinstance(prompt, str) else prompt.text)
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


CHAT_HELP = """commands: /reset (forget the conversation)  /system TEXT (set the system prompt and reset)
          /exit (quit; Ctrl-D works too)  /help"""


@dataclass
class ChatConfig(SamplingArgs, ModelArgs):
    prompt: str | None = arg(None, short="-p")
    """answer this one message and exit"""
    system: str | None = arg(None, short="-s")
    """system prompt (default: the template's own)"""


def cmd_chat(cfg: ChatConfig) -> int:
    cfg.check_sampling()
    once = cfg.prompt is not None or not sys.stdin.isatty()
    first = check_text("--prompt", cfg.prompt) if cfg.prompt is not None else (read_stdin() if once else None)
    if cfg.system is not None:
        check_text("--system", cfg.system)
    if once and not (first or "").strip():
        print("qwen25: error: empty message (give --prompt TEXT or pipe text in)", file=sys.stderr)
        return EXIT_USAGE
    llm = cfg.load()
    params = cfg.sampling_params(llm)
    system = cfg.system
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
    print(f"qwen25 chat — {cfg.model}. {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = check_text("that line", input(">>> "))
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        except ValueError as e:  # not UTF-8 (strict or surrogate-escaped stdin): say so and carry on
            print(f"qwen25: {e if not isinstance(e, UnicodeDecodeError) else 'that line is not UTF-8 text'}; "
                  "ignored", file=sys.stderr)
            continue
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
            except ValueError as e:  # e.g. the conversation outgrew the context: keep the session
                print(f"qwen25: error: {one_line(e)}", file=sys.stderr)
                history.pop()


# --- serve -----------------------------------------------------------------------------------------
@dataclass
class ServeConfig(ServeLimitsArgs, ModelArgs):
    host: str = "127.0.0.1"
    """bind address (default: 127.0.0.1, this machine only; anything else without a key prints a warning)"""
    port: int = 8000
    """port"""
    api_key: str | None = arg(default_factory=lambda: os.environ.get("QWEN25_API_KEY"))
    """require 'Authorization: Bearer KEY' on /v1 and /docs (default: $QWEN25_API_KEY; unset = open; an empty
    key is an error)"""
    no_api_key: bool = False
    """serve without a key even if --api-key or $QWEN25_API_KEY is empty (say so explicitly)"""
    no_docs: bool = False
    """do not serve /docs, /redoc and /openapi.json"""
    max_concurrency: int = 8
    """requests decoded together"""
    max_queue: int = 64
    """requests allowed to wait beyond that; more get HTTP 429 (default: 64)"""
    served_model_name: str | None = None
    """model id clients use (default: --model)"""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """uvicorn's log level"""
    speculative: Literal["ngram"] | None = None
    """speculative decoding for greedy requests: shorthand for --speculative-config '{"method": "ngram"}'"""
    speculative_config: str | None = arg(None, metavar="JSON")
    """speculative decoding settings as a JSON object with vLLM's keys, e.g. '{"method": "ngram",
    "num_speculative_tokens": 4}' or '{"model": DRAFT, "num_speculative_tokens": 4}' (default: off)"""

    def speculative_settings(self) -> dict[str, Any] | None:
        """The speculative_config dict the flags describe, or None when speculative decoding is off."""
        if self.speculative_config is None:
            return None if self.speculative is None else {"method": self.speculative}
        try:
            settings = json.loads(self.speculative_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--speculative-config is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(settings, dict):
            raise ValueError(f"--speculative-config must be a JSON object, got {self.speculative_config}")
        if self.speculative is not None and settings.setdefault("method", self.speculative) != self.speculative:
            raise ValueError(f"--speculative {self.speculative} contradicts --speculative-config's method "
                             f"{settings['method']!r}")
        return settings


def cmd_serve(cfg: ServeConfig) -> int:
    try:
        import uvicorn

        from qwen25.server.app import create_app_from_checkpoint
    except ImportError as e:
        print(f"qwen25: error: serving needs the [serve] extra ({e.name} is missing): pip install 'qwen25[serve]'",
              file=sys.stderr)
        return EXIT_ERROR
    if cfg.max_concurrency < 1 or cfg.max_queue < 0:
        print("qwen25: error: --max-concurrency must be >= 1 and --max-queue >= 0", file=sys.stderr)
        return EXIT_USAGE
    api_key = serve_api_key(cfg.api_key, cfg.no_api_key)
    limits = cfg.limits()
    speculative = cfg.speculative_settings()  # before the (slow) load
    llm = cfg.load()
    name = cfg.served_model_name or cfg.model
    extra = {} if speculative is None else {"speculative_config": speculative}  # only when asked for
    extra.update(cfg.engine_settings())
    if cfg.allow_special_tokens_in_content:
        extra["allow_special_tokens_in_content"] = True
    app = create_app_from_checkpoint(llm.checkpoint, served_model_name=name, aliases=[cfg.model, str(llm.path)],
                                     api_key=api_key, max_concurrency=cfg.max_concurrency,
                                     max_queue=cfg.max_queue, limits=limits, docs=not cfg.no_docs, **extra)
    print(f"qwen25 serve: {name} on http://{cfg.host}:{cfg.port} (chat page at /, OpenAI API at /v1)",
          file=sys.stderr)
    if api_key is None and not is_loopback(cfg.host):
        print(f"qwen25 serve: WARNING: listening on {cfg.host} with NO API KEY: anyone who can reach this port "
              "can use the model. Set QWEN25_API_KEY (or --api-key), or bind 127.0.0.1.", file=sys.stderr)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
    return 0


# --- entry point -----------------------------------------------------------------------------------
class OneLineErrors(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`qwen25 generate: error: ... (see --help)`), not a usage block;
    subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        if len(message) > 300:  # an echoed 5000-digit value, say
            message = message[:300] + "..."
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="qwen25", description="Run Qwen2.5 models: chat, generate, manage models.",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="qwen25 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_command(sub, "generate", GenerateConfig, cmd_generate,
                help="complete a prompt (raw text, or a single user turn with --chat)")
    add_command(sub, "chat", ChatConfig, cmd_chat,
                help="chat interactively (streams the reply); with --prompt or piped stdin answer once")
    add_command(sub, "serve", ServeConfig, cmd_serve,
                help="serve the model over an OpenAI-compatible HTTP API, with a chat page at /")
    add_command(sub, "download", weights_cli.DownloadConfig, weights_cli.main_download,
                help="fetch a known model (or resolve a path/repo id) into the cache")
    add_quantize_parser(sub)
    add_command(sub, "models", weights_cli.ModelsConfig, weights_cli.main_models,
                help="list known models, their sizes and whether they are cached")
    add_eval_parser(sub)
    add_data_parser(sub)
    add_train_parser(sub)
    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `qwen25` command; returns its exit status. The process-wide settings a command makes
    (`qwen25.runtime.configure_runtime`) are undone on return, so in-process callers keep their own."""
    parser = build_parser()
    try:
        args = parse_args(parser, argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        with restored_runtime():
            return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        with contextlib.suppress(OSError, ValueError):  # no "Exception ignored" from the final flush either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except (FileNotFoundError, ValueError, KeyError, OSError, NotImplementedError) as e:
        print(f"qwen25: error: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug, or input nothing above anticipated: one line, the traceback on request
        if os.environ.get("QWEN25_DEBUG"):
            raise
        print(f"qwen25: error: {type(e).__name__}: {one_line(e)} (QWEN25_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
