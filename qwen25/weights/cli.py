"""`qwen25 models`, `qwen25 download` and `qwen25 quantize`: the commands that manage checkpoints on disk.

Each is a config dataclass (its fields are the flags, see `qwen25.cli_args`) and a `main_*(cfg)` that
prints for a person and returns the exit status. `qwen25.cli` registers them.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen25.cli_args import arg

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


@dataclass
class ModelsConfig:
    """List known models, their sizes and whether they are cached."""

    paths: bool = False
    """also print the paths of cached files, and the CPU's features and the native kernels that run on it"""


@dataclass
class DownloadConfig:
    """Fetch a known model (or resolve a path/repo id) into the cache."""

    name: str = arg(positional=True)
    """a known model name (see `qwen25 models`)"""


@dataclass
class QuantizeConfig:
    """Quantize a model's weights to int8 or int4 and cache them for fast loading."""

    source: str = arg(positional=True, metavar="SRC")
    """HF model directory (safetensors), .gguf file or known model name"""
    bits: int = arg(8, short="-b", metavar="{8,4}")
    """weight bits (default: 8)"""
    group_size: int | None = arg(None, short="-g", metavar="G")
    """weights per scale, a multiple of 32 (default: 128 for 8 bits, 32 for 4 bits)"""
    output: str | None = arg(None, short="-o", metavar="FILE")
    """write this .safetensors file instead of the repack cache entry"""
    threads: int | None = None
    """torch threads (default: all cores, at most 8)"""
    no_progress: bool = False
    """no progress bar"""


def main_models(cfg: ModelsConfig) -> int:
    from qwen25.weights.registry import DEFAULT_MODEL, KNOWN_MODELS, cache_dir, cached_path, is_cached

    print(f"{'name':32} {'size':>9}  {'cached':6}  description")
    for name, m in KNOWN_MODELS.items():
        mark = "yes" if is_cached(m) else "no"
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:32} {m.size / 1e6:7.0f}MB  {mark:6}  {m.description}{default}")
    print(f"\ncache: {cache_dir()}")
    if cfg.paths:
        from qwen25.kernels import kernels_line

        for m in KNOWN_MODELS.values():
            if is_cached(m):
                print(f"  {cached_path(m)}")
        print(kernels_line())
    return 0


def main_download(cfg: DownloadConfig) -> int:
    from qwen25.weights.registry import resolve_model

    print(resolve_model(cfg.name))
    return 0


def main_quantize(cfg: QuantizeConfig) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from qwen25.runtime import configure_runtime
    from qwen25.weights.quantized import check_settings, quantize_checkpoint
    from qwen25.weights.registry import resolve_model

    group = check_settings(cfg.bits, cfg.group_size)  # before any download or load
    output = Path(cfg.output).expanduser() if cfg.output else None
    if output is not None and (output.suffix != ".safetensors" or output.is_dir()):
        raise ValueError(f"--output {cfg.output}: must be a file name ending in .safetensors")
    configure_runtime(cfg.threads)
    source = resolve_model(cfg.source)
    with tqdm(desc=f"quantizing to q{cfg.bits}", unit="layer", disable=cfg.no_progress or None) as bar:
        def progress(total: int):  # noqa: ANN202
            bar.reset(total)
            return lambda: bar.update(1)

        result = quantize_checkpoint(source, cfg.bits, group, output, progress)
    print(f"wrote {result.path}")
    print(f"  q{result.bits}, group {result.group}: {result.file_bytes / 1e6:.1f} MB for {result.weights / 1e6:.1f}M "
          f"weights = {result.bytes_per_weight:.3f} bytes/weight ({8 * result.bytes_per_weight:.2f} bits), "
          f"in {result.seconds:.1f} s")
    print(f"  decoder-layer projections: {result.layer_bytes_per_weight:.3f} bytes/weight; embedding and lm_head: int8")
    model = str(output) if output is not None else f"{cfg.source} --quantization q{result.bits}"
    print(f"  use it: qwen25 chat --model {model}")
    return 0
