"""Quantize a checkpoint's float weights to GGUF blocks in memory (`quantization="q8"` / `"q4"`: HF directories, a
GGUF file requantized, LoRA merges, GRPO's rollout copy) or into a GGUF file (`qwen25 quantize`).

The blocks (`weights.block_quant`) are the types the block kernels and llama.cpp run, laid out as
`weights.gguf_blocks` lays out a GGUF file's own, so the same `GGMLLinear` layers and native forward run them:
- q8: every matrix Q8_0 (one fp16 scale per 32 weights, 1.06 bytes per weight);
- q4: layer projections Q4_K (0.56 bytes per weight) where a row is a multiple of 256 weights, else Q5_0
  (0.69; Qwen2.5-0.5B's 896-wide rows, as in llama.cpp's Q4_K_M file of it); v_proj (0.8% of the weights, but
  4-bit there alone cost ~1.2% perplexity in the older int4 format) and the last layer stay Q8_0, and so do
  the embedding and lm_head (4-bit tables cost ~0.9%).
Nothing is cached on disk (no second copy of the weights): a load quantizes again, 4-5 s for the 0.5B to Q8_0
(README); `qwen25 quantize` writes the blocks as a GGUF file once. Parsing lives in `weights.gguf` /
`weights.safetensors`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen25.config import ModelConfig
from qwen25.kernels.ggml_linear import GGMLEmbedding, GGMLLinear
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.weights.block_quant import block_bytes, quantize_blocks, quantize_blocks_
from qwen25.weights.errors import CheckpointError
from qwen25.weights.gguf_blocks import assemble_block_model
from qwen25.weights.quants import GGMLType

BITS = (8, 4)
Q8_LAST_LAYERS = 1  # q4: how many of the last decoder layers stay Q8_0
FILE_TYPES = {8: 7, 4: 15}  # general.file_type (llama.cpp's llama_ftype): MOSTLY_Q8_0, MOSTLY_Q4_K_M
ROW_CHUNK = 16384  # rows of the embedding / lm_head read at a time: bounds the fp32 transient to ~60 MB

GetTensor = Callable[[str], torch.Tensor]  # HF tensor name -> fp32 tensor
GetRows = Callable[[str, int, int], torch.Tensor]  # HF name, row range -> fp32 rows


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be 8 (Q8_0 blocks) or 4 (Q4_K / Q5_0 blocks), got {bits}")
    return bits


def block_type(config: ModelConfig, name: str, cols: int, bits: int) -> GGMLType:
    """The block type of the 2-D weight `name` (HF name, rows of `cols` values) in a model quantized to `bits`."""
    if bits == 8 or not name.startswith("model.layers.") or ".v_proj." in name:
        return GGMLType.Q8_0
    if int(name.split(".")[2]) >= config.num_hidden_layers - Q8_LAST_LAYERS:
        return GGMLType.Q8_0
    return GGMLType.Q4_K if cols % 256 == 0 else GGMLType.Q5_0


def progress_steps(config: ModelConfig) -> int:
    """How many times `quantize_weights` calls its progress callback."""
    return config.num_hidden_layers + (1 if config.tie_word_embeddings else 2)


def _shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the model `config` describes, by HF name (built on the meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Qwen2ForCausalLM(config).state_dict().items()}


def _table(get_rows: GetRows, name: str, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) table as Q8_0 blocks, read and quantized ROW_CHUNK rows at a time."""
    raw = np.empty(block_bytes(GGMLType.Q8_0, rows, cols), dtype=np.uint8)
    out, per_row = torch.from_numpy(raw), block_bytes(GGMLType.Q8_0, 1, cols)
    for r in range(0, rows, ROW_CHUNK):
        stop = min(r + ROW_CHUNK, rows)
        quantize_blocks_(get_rows(name, r, stop), GGMLType.Q8_0, out[r * per_row:stop * per_row])
    return raw


def quantize_weights(config: ModelConfig, get: GetTensor, get_rows: GetRows, bits: int = 8,
                     progress: Callable[[], None] | None = None,
                     get_bias: Callable[[str], torch.Tensor | None] | None = None) -> Qwen2ForCausalLM:
    """The block model of a checkpoint whose tensors `get` / `get_rows` read (one at a time, big tables in row
    chunks): frozen, eval mode. get_bias: a bias by name, None when absent (default: `get` for q/k/v biases).
    `progress()` is called after each table and each layer."""
    check_bits(bits)
    tick = progress or (lambda: None)

    def bias_of(name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        if get_bias is not None:
            return get_bias(name)
        return get(name) if name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj") else None

    def linear(weight: str, bias: str | None) -> GGMLLinear:
        w = get(weight)
        kind = block_type(config, weight, w.shape[1], bits)
        layer = GGMLLinear(quantize_blocks(w, kind), kind, w.shape[1], w.shape[0], bias_of(bias))
        if weight.endswith("down_proj.weight"):
            tick()  # the last projection of a layer
        return layer

    def vector(name: str) -> torch.nn.Parameter:
        return torch.nn.Parameter(get(name).float().clone(), requires_grad=False)

    V, H = config.vocab_size, config.hidden_size
    head = _table(get_rows, "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight", V, H)
    tick()
    embed = head if config.tie_word_embeddings else _table(get_rows, "model.embed_tokens.weight", V, H)
    if not config.tie_word_embeddings:
        tick()
    return assemble_block_model(config, linear, vector, GGMLEmbedding(embed, GGMLType.Q8_0, V, H),
                                GGMLLinear(head, GGMLType.Q8_0, H, V))


def quantize_loaded_model(model: Qwen2ForCausalLM, bits: int = 8) -> Qwen2ForCausalLM:
    """The block model of an already loaded float model (LoRA merges, tests, tools)."""
    params = dict(model.named_parameters(remove_duplicate=False))

    def get(name: str) -> torch.Tensor:
        return params[name].detach().float()

    def get_rows(name: str, start: int, stop: int) -> torch.Tensor:
        return params[name].detach()[start:stop].float()

    def get_bias(name: str) -> torch.Tensor | None:
        return get(name) if name in params else None

    return quantize_weights(model.config, get, get_rows, bits, get_bias=get_bias)


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
    expected = _shapes(config)

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


# --- `qwen25 quantize` ------------------------------------------------------------------------------------------
@dataclass
class QuantizeResult:
    path: Path
    bits: int
    file_bytes: int
    weights: int  # parameters of the checkpoint (a tied table counted once)
    layer_bytes: int  # of the decoder layers' projections (what q4 shrinks; the tables stay Q8_0)
    layer_weights: int
    seconds: float

    @property
    def bytes_per_weight(self) -> float:
        return self.file_bytes / self.weights

    @property
    def layer_bytes_per_weight(self) -> float:
        return self.layer_bytes / self.layer_weights


class _LazyTensors(Mapping):
    """HF name -> fp32 tensor, read from the checkpoint when asked (each once, by the GGUF writer)."""

    def __init__(self, names: list[str], get: GetTensor, tick: Callable[[], None]) -> None:
        self.names, self.get, self.tick = names, get, tick

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.get(name)
        self.tick()
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def quantize_checkpoint(source: Path, output: Path, tokenizer: Any, bits: int = 8,
                        progress: Callable[[int], Callable[[], None]] | None = None) -> QuantizeResult:
    """Write `source` (a .gguf file or an HF directory) to the GGUF file `output` with the blocks of
    `quantization=f"q{bits}"`, and `tokenizer` (qwen25's, for the file's metadata), streaming one tensor at a
    time. llama.cpp and qwen25 (`quantization="gguf"`, what "auto" picks for it) load the result.

    progress: given the number of steps, returns the per-step callback (e.g. a progress bar's update)."""
    from qwen25.weights.gguf_writer import write_qwen2_gguf

    check_bits(bits)
    start = time.perf_counter()
    config, get, _ = open_source(Path(source))
    shapes = _shapes(config)
    names = [k for k in shapes if not (config.tie_word_embeddings and k == "lm_head.weight")]
    tick = progress(len(names)) if progress is not None else (lambda: None)

    def types(name: str, shape: tuple[int, ...]) -> GGMLType:
        return block_type(config, name, shape[-1], bits)

    write_qwen2_gguf(output, _LazyTensors(names, get, tick), config, tokenizer, name=Path(source).stem,
                     types=types, file_type=FILE_TYPES[bits], shapes=shapes)
    layers = {k: s for k, s in shapes.items() if k.startswith("model.layers.") and len(s) == 2}
    return QuantizeResult(Path(output), bits, Path(output).stat().st_size, sum(int(np.prod(shapes[k])) for k in names),
                          sum(block_bytes(types(k, s), *s) for k, s in layers.items()),
                          sum(s[0] * s[1] for s in layers.values()), time.perf_counter() - start)
