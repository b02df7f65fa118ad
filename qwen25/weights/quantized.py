"""Build the fast inference model: q8 (int8) or q4 (int4) group-wise weights with fused projections, streamed
from a checkpoint (GGUF file or HF safetensors directory) tensor by tensor and cached on disk, so the next
load is a memory map.

Owns the fused, quantized state-dict layout (`...self_attn.qkv_proj.*`, `...mlp.gate_up_proj.*`), the repack
cache and `quantize_checkpoint` (what `qwen25 quantize` runs). The modules live in `qwen25.kernels.quant`;
parsing in `weights.gguf` / `weights.safetensors`.

The q4 choices were measured by perplexity on Qwen2.5-Coder-0.5B-Instruct against its dequantized fp32 weights
(1,023-token windows of PyTorch source; ratios to fp32, q8 = 1.001):
- quantizer (one window, layer projections only): asymmetric least-squares fit 1.027; plain min/max rounding
  1.043; symmetric absmax 1.067; the fit weighted by calibration activations (imatrix-style) 1.025, no gain
  worth a calibration pass;
- groups of 32 / 64 / 128: 1.027 / 1.048 / 1.077 at 0.625 / 0.56 / 0.53 bytes per weight: 32 is best per byte;
- one kind of projection in int4 at a time: v_proj 1.012, up 1.010, gate 1.005, the others within the noise
  (~0.4%), so v_proj (0.8% of the weights) stays int8; the last layer in int8 too takes four windows from
  1.011 to 1.006 (the last two: 1.004); lm_head in int4 costs another 0.9%, so the tables stay int8.
The shipped layout (`LAYOUTS`, `INT8_LAST_LAYERS`): 1.0043 on four code windows, 1.011 on the first alone, with
the layer projections at 0.645 bytes per weight against q8's 1.03 (tests/test_quantize.py pins the figure).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qwen25.config import ModelConfig
from qwen25.kernels.quant import Q4_GROUP, ConcatLinear, Q4Linear, Q8Embedding, Q8Linear, quantize_q4, quantize_q8
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.paths import repack_dir
from qwen25.weights.errors import CheckpointError

BITS = (8, 4)
DEFAULT_GROUPS = {8: 128, 4: Q4_GROUP}  # q8: 128 has the perplexity of 32-wide groups, 8% fewer bytes (measured)
# The format of each projection in a model quantized to `bits`, and how many of the last decoder layers stay
# all-int8. q4 keeps v_proj (0.8% of the weights, but as int4 it alone costs ~1.2% perplexity) and the last layer
# (1/24 of the layers on the 0.5B; another ~0.5%) in int8. The embedding and lm_head are always int8 (lm_head in
# int4 costs ~0.9%). See the module docstring for the measurements.
LAYOUTS = {8: dict(q_proj=8, k_proj=8, v_proj=8, o_proj=8, gate_proj=8, up_proj=8, down_proj=8),
           4: dict(q_proj=4, k_proj=4, v_proj=8, o_proj=4, gate_proj=4, up_proj=4, down_proj=4)}
INT8_LAST_LAYERS = {8: 0, 4: 1}
TABLE_GROUP = DEFAULT_GROUPS[8]  # embedding / lm_head: int8 with this group
# Cache-key tags. The q8 tag keeps v1's trailing group so caches written before q4 existed stay valid; the group
# a file holds is read from its tensor shapes, never from the key.
FORMAT_TAGS = {8: "q8-fused-v1|128", 4: "q4-fused-v1"}
ROW_CHUNK = 16384  # rows of the embedding / lm_head quantized at a time: bounds the fp32 transient to ~60 MB

GetTensor = Callable[[str], torch.Tensor]  # HF tensor name -> fp32 tensor
GetRows = Callable[[str, int, int], torch.Tensor]  # HF name, row range -> fp32 rows


def _group_for(K: int, group: int) -> int:
    """The requested group if it divides K, else the largest multiple of 32 that does."""
    if group > 0 and K % group == 0:
        return group
    fits = [g for g in range(32, min(group, K) + 1, 32) if K % g == 0]
    if not fits:
        raise ValueError(f"cannot quantize rows of {K} weights: group sizes must be multiples of 32 dividing the "
                         "row length")
    return max(fits)


def check_settings(bits: int, group: int | None) -> int:
    """Validate a (bits, group) request; returns the group to use."""
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    group = DEFAULT_GROUPS[bits] if group is None else group
    if group < 32 or group % 32:
        raise ValueError(f"group size must be a positive multiple of 32, got {group}")
    return group


def progress_steps(config: ModelConfig) -> int:
    """How many times `quantized_state_dict` calls its progress callback."""
    return config.num_hidden_layers + (1 if config.tie_word_embeddings else 2)


def quantized_state_dict(config: ModelConfig, get: GetTensor, get_rows: GetRows, bits: int = 8,
                         group: int | None = None,
                         progress: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """The fused quantized state dict, built one tensor at a time (big tables in row chunks). Each kind of
    tensor gets the format LAYOUTS[bits] gives it (the last INT8_LAST_LAYERS[bits] layers: int8); `group` applies
    to the tensors stored at `bits`, the others use their format's default. `progress()` is called after each
    table and each layer."""
    group = check_settings(bits, group)
    out: dict[str, torch.Tensor] = {}
    tick = progress or (lambda: None)

    def quantize(b: int, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        g = _group_for(weight.shape[1], group if b == bits else DEFAULT_GROUPS[b])
        if b == 4:
            return dict(zip(("weight_p", "scales", "mins"), quantize_q4(weight, g)))
        return dict(zip(("weight_q", "scales"), quantize_q8(weight, g)))

    def put_linear(prefix: str, parts: list[tuple[str, torch.Tensor, torch.Tensor | None]],
                   layout: dict[str, int]) -> None:
        """A fused projection from (kind, weight, bias) row blocks: one module per run of equal formats."""
        runs: list[list[tuple[str, torch.Tensor, torch.Tensor | None]]] = []
        for part in parts:
            if runs and layout[runs[-1][0][0]] == layout[part[0]]:
                runs[-1].append(part)
            else:
                runs.append([part])
        for i, run in enumerate(runs):
            name = prefix if len(runs) == 1 else f"{prefix}.parts.{i}"
            weight = torch.cat([w for _, w, _ in run])
            out.update({f"{name}.{k}": v for k, v in quantize(layout[run[0][0]], weight).items()})
            if run[0][2] is not None:
                out[f"{name}.bias"] = torch.cat([b for _, _, b in run]).float().contiguous()

    def put_table(prefix: str, name: str) -> None:
        g = _group_for(config.hidden_size, TABLE_GROUP)
        rows = [quantize_q8(get_rows(name, r, min(r + ROW_CHUNK, config.vocab_size)), g)
                for r in range(0, config.vocab_size, ROW_CHUNK)]
        out[f"{prefix}.weight_q"] = torch.cat([q for q, _ in rows])
        out[f"{prefix}.scales"] = torch.cat([s for _, s in rows])
        tick()

    put_table("lm_head", "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight")
    if config.tie_word_embeddings:
        out.update(_tied_aliases(out))
    else:
        put_table("model.embed_tokens", "model.embed_tokens.weight")
    out["model.norm.weight"] = get("model.norm.weight").float()
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        layout = LAYOUTS[8] if i >= config.num_hidden_layers - INT8_LAST_LAYERS[bits] else LAYOUTS[bits]
        put_linear(a + "qkv_proj", [(f"{x}_proj", get(a + f"{x}_proj.weight"), get(a + f"{x}_proj.bias"))
                                    for x in "qkv"], layout)
        put_linear(a + "o_proj", [("o_proj", get(a + "o_proj.weight"), None)], layout)
        m = p + "mlp."
        put_linear(m + "gate_up_proj", [(f"{x}_proj", get(m + f"{x}_proj.weight"), None) for x in ("gate", "up")],
                   layout)
        put_linear(m + "down_proj", [("down_proj", get(m + "down_proj.weight"), None)], layout)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[p + norm + ".weight"] = get(p + norm + ".weight").float()
        tick()
    return out


def _tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The embedding's entries of a tied model: lm_head's tensors (cache files store them once)."""
    return {f"model.embed_tokens.{k}": state[f"lm_head.{k}"] for k in ("weight_q", "scales")}


def _linear_like(state: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """An empty Q4Linear / Q8Linear / ConcatLinear shaped like the tensors under `prefix` (format, group and bias
    from the keys and shapes)."""
    if f"{prefix}.parts.0.scales" in state:
        count = 1 + max(int(k[len(prefix) + 7:].split(".")[0]) for k in state if k.startswith(f"{prefix}.parts."))
        return ConcatLinear([_linear_like(state, f"{prefix}.parts.{i}") for i in range(count)])
    bias = f"{prefix}.bias" in state
    if f"{prefix}.weight_p" in state:
        N, half = state[f"{prefix}.weight_p"].shape
        return Q4Linear(2 * half, N, bias, 2 * half // state[f"{prefix}.scales"].shape[1])
    N, K = state[f"{prefix}.weight_q"].shape
    return Q8Linear(K, N, bias, K // state[f"{prefix}.scales"].shape[1])


def model_from_quantized_state_dict(config: ModelConfig, state: dict[str, torch.Tensor]) -> Qwen2ForCausalLM:
    """Assign a quantized state dict (from `quantized_state_dict` or a cache file) to a meta-built model."""
    if config.tie_word_embeddings:
        state = {**state, **_tied_aliases(state)}
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
        for i, layer in enumerate(model.model.layers):
            attn, mlp, p = layer.self_attn, layer.mlp, f"model.layers.{i}."
            attn.qkv_proj = _linear_like(state, p + "self_attn.qkv_proj")
            attn.o_proj = _linear_like(state, p + "self_attn.o_proj")
            del attn.q_proj, attn.k_proj, attn.v_proj
            mlp.gate_up_proj = _linear_like(state, p + "mlp.gate_up_proj")
            mlp.down_proj = _linear_like(state, p + "mlp.down_proj")
            del mlp.gate_proj, mlp.up_proj
        model.lm_head = _linear_like(state, "lm_head")
        table = state["model.embed_tokens.weight_q"].shape[1] // state["model.embed_tokens.scales"].shape[1]
        model.model.embed_tokens = Q8Embedding(config.vocab_size, config.hidden_size, table)
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings:  # one set of tensors, not two equal copies
        model.model.embed_tokens.weight_q = model.lm_head.weight_q
        model.model.embed_tokens.scales = model.lm_head.scales
    model.model.reset_rope()
    return model.eval().requires_grad_(False)


def quantize_loaded_model(model: Qwen2ForCausalLM, bits: int = 8, group: int | None = None) -> Qwen2ForCausalLM:
    """The fast model from an already loaded float model (tests, tools): nothing is cached."""
    params = dict(model.named_parameters(remove_duplicate=False))

    def get(name: str) -> torch.Tensor:
        return params[name].detach().float()

    def get_rows(name: str, start: int, stop: int) -> torch.Tensor:
        return params[name].detach()[start:stop].float()

    return model_from_quantized_state_dict(model.config, quantized_state_dict(model.config, get, get_rows, bits, group))


# --- sources: GGUF file or HF directory ---------------------------------------------------------------------------
def gguf_tensors(gguf) -> tuple[GetTensor, GetRows]:  # noqa: ANN001 - GGUFFile
    """Dequantizing getters over a GGUF file, by HF tensor name."""
    from qwen25.weights.gguf import hf_tensor_name

    by_hf = {hf_tensor_name(name, gguf.path): name for name in gguf.tensors}

    def get(name: str) -> torch.Tensor:
        return torch.from_numpy(gguf.dequantize(_need(by_hf, name, gguf.path)))

    def get_rows(name: str, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(gguf.dequantize_rows(_need(by_hf, name, gguf.path), start, stop))

    return get, get_rows


def safetensors_tensors(config: ModelConfig, path: Path) -> tuple[GetTensor, GetRows]:
    """fp32 getters over an HF checkpoint's memory-mapped safetensors (bf16/fp16/fp32): one tensor in fp32 at a
    time. Shapes are checked against the config."""
    from qwen25.weights.safetensors import load_safetensors

    tensors = load_safetensors(path)  # mapped views in the file's dtype: nothing converted yet
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Qwen2ForCausalLM(config).state_dict().items()}

    def checked(name: str) -> torch.Tensor:
        t = _need(tensors, name, path)
        if tuple(t.shape) != expected.get(name, tuple(t.shape)):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, config implies {expected[name]}")
        return t

    return (lambda name: checked(name).float(),
            lambda name, start, stop: checked(name)[start:stop].float())


def _need(mapping: dict, name: str, source: Path):  # noqa: ANN202
    if name not in mapping:
        raise CheckpointError(f"{source}: checkpoint lacks tensor {name}")
    return mapping[name]


def open_source(source: Path) -> tuple[ModelConfig, GetTensor, GetRows]:
    """The config and fp32 tensor getters of a .gguf file or an HF directory."""
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise CheckpointError(f"{source}: no config.json (not an HF model directory)")
        config = ModelConfig.from_json_file(source / "config.json")
        return config, *safetensors_tensors(config, source)
    from qwen25.weights.gguf import GGUFFile, config_from_gguf

    gguf = GGUFFile(source)
    return config_from_gguf(gguf), *gguf_tensors(gguf)


# --- the repack cache -------------------------------------------------------------------------------------------
def _fingerprint(source: Path) -> str:
    """Path, sizes and mtimes: a changed checkpoint gets a new cache entry. A directory counts its config and
    weight files."""
    if source.is_file():
        stat = source.stat()
        return f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    files = sorted(p for p in source.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    return f"{source.resolve()}|" + ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def repack_cache_path(source: Path, bits: int = 8) -> Path:
    """Where the quantized weights of `source` (a .gguf file or an HF directory) are cached for `bits`."""
    key = f"{_fingerprint(source)}|{FORMAT_TAGS[bits]}"
    stem = source.stem if source.is_file() else source.name
    return repack_dir() / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def load_quantized(source: Path, config: ModelConfig, bits: int = 8, gguf=None,  # noqa: ANN001 - GGUFFile
                   use_cache: bool = True) -> Qwen2ForCausalLM:
    """The fast model for a checkpoint (`gguf`: its open GGUFFile; None for an HF directory): memory-mapped from
    the repack cache when present (whatever group it was written with), else built with the default group and
    cached."""
    from qwen25.weights.safetensors import load_safetensors, save_safetensors

    cache = repack_cache_path(source, bits)
    if use_cache and cache.is_file():
        try:
            return model_from_quantized_state_dict(config, load_safetensors(cache))
        except (ValueError, RuntimeError, KeyError):
            cache.unlink(missing_ok=True)  # stale or damaged: rebuild below
    get, get_rows = gguf_tensors(gguf) if gguf is not None else safetensors_tensors(config, source)
    state = quantized_state_dict(config, get, get_rows, bits)
    if use_cache:
        try:
            _save_atomic(state, cache, save_safetensors, config, _metadata(source, bits))
        except OSError:
            pass  # a read-only cache only costs the next load its speed
    return model_from_quantized_state_dict(config, state)


def _metadata(source: Path, bits: int) -> dict[str, str]:
    return {"format": FORMAT_TAGS[bits].split("|")[0], "bits": str(bits), "source": str(source.resolve())}


def read_quantized_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a file written by `qwen25 quantize` (format, bits, source, group)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            meta = json.loads(f.read(min(n, 100_000_000))).get("__metadata__") or {}
    except (struct.error, ValueError, AttributeError):
        meta = {}
    if meta.get("format") not in {tag.split("|")[0] for tag in FORMAT_TAGS.values()} or "source" not in meta:
        raise CheckpointError(f"{path}: not a file written by `qwen25 quantize` (no qwen25 quantization metadata)")
    return meta


def _save_atomic(state: dict[str, torch.Tensor], path: Path, save: Callable, config: ModelConfig,
                 metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tied = config.tie_word_embeddings
    unique = {k: v for k, v in state.items() if not (tied and k.startswith("model.embed_tokens."))}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save(unique, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- `qwen25 quantize` ------------------------------------------------------------------------------------------
@dataclass
class QuantizeResult:
    path: Path
    bits: int
    group: int
    file_bytes: int
    weights: int  # parameters of the checkpoint (a tied table counted once)
    layer_bytes: int  # of the decoder layers' projections (what a q4 layout shrinks; tables stay int8)
    layer_weights: int
    seconds: float

    @property
    def bytes_per_weight(self) -> float:
        return self.file_bytes / self.weights

    @property
    def layer_bytes_per_weight(self) -> float:
        return self.layer_bytes / self.layer_weights


def quantize_checkpoint(source: Path, bits: int = 8, group: int | None = None, output: Path | None = None,
                        progress: Callable[[int], Callable[[], None]] | None = None) -> QuantizeResult:
    """Quantize `source` (a .gguf file or an HF directory) and write the result to `output`, by default the
    repack cache entry that `qwen25.checkpoint.load(source, quantization=f"q{bits}")` reads.

    progress: given the number of steps, returns the per-step callback (e.g. a progress bar's update)."""
    from qwen25.weights.safetensors import save_safetensors

    group = check_settings(bits, group)
    start = time.perf_counter()
    source = Path(source)
    config, get, get_rows = open_source(source)
    tick = progress(progress_steps(config)) if progress is not None else None
    state = quantized_state_dict(config, get, get_rows, bits, group, tick)
    path = Path(output) if output is not None else repack_cache_path(source, bits)
    _save_atomic(state, path, save_safetensors, config, dict(_metadata(source, bits), group=str(group)))
    with torch.device("meta"):
        params = dict(Qwen2ForCausalLM(config).named_parameters())  # tied: counted once
    projections = [v for k, v in state.items() if k.startswith("model.layers.") and "_proj." in k]
    return QuantizeResult(path, bits, group, path.stat().st_size, sum(p.numel() for p in params.values()),
                          sum(t.numel() * t.element_size() for t in projections),
                          sum(p.numel() for k, p in params.items() if k.startswith("model.layers.") and "_proj.w" in k),
                          time.perf_counter() - start)
