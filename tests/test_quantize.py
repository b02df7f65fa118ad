"""`qwen25 quantize` and q4: the command writes a GGUF of Q8_0 (or Q4_K / Q5_0) blocks that loads as the file's own
blocks with exactly the logits of quantizing at load, clean errors on bad input, the q8/q4 layouts, and (slow) the
real model's q8 and q4 perplexity against the fp32 reference."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen25.kernels.ggml_linear import GGMLLinear
from qwen25.weights.quants import GGMLType

IDS = [9707, 11, 1879, 0, 151644, 872, 198, 14990, 220, 16, 17, 18]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    return subprocess.run([sys.executable, "-m", "qwen25.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def logits(llm, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    with torch.inference_mode():
        return llm.model(torch.tensor([ids]))


def types_of(model) -> dict[str, int]:  # noqa: ANN001
    return {name: m.ggml_type for name, m in model.named_modules() if isinstance(m, GGMLLinear)}


def test_quantize_writes_a_gguf_that_loads_as_quantizing_at_load_does(tiny_hf_dir, tmp_path):
    from qwen25 import LLM
    from qwen25.weights.gguf import GGUFFile

    out = tmp_path / "tiny-q4.gguf"
    result = run_cli("quantize", str(tiny_hf_dir), "--bits", "4", "-o", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and "bytes/weight" in result.stdout
    from_file = LLM(str(out))  # auto: a GGUF file runs its own blocks
    in_memory = LLM(str(tiny_hf_dir), quantization="q4")
    assert from_file.quantization == "gguf" and in_memory.quantization == "q4"
    assert types_of(from_file.model) == types_of(in_memory.model)
    assert torch.equal(logits(from_file, IDS), logits(in_memory, IDS))  # the same blocks, bit for bit
    assert from_file.tokenizer.encode("hello <|im_end|>") == in_memory.tokenizer.encode("hello <|im_end|>")
    with GGUFFile(out) as g:
        kinds = {name: g.info(name).ggml_type for name in g.tensors}
        assert g.metadata["general.file_type"] == 15
    # hidden 32 is no multiple of 256: Q5_0; v_proj, the last layer and the table stay Q8_0; norms/biases F32
    assert kinds["blk.0.attn_q.weight"] == kinds["blk.0.ffn_down.weight"] == GGMLType.Q5_0
    assert kinds["blk.0.attn_v.weight"] == kinds["blk.1.attn_q.weight"] == kinds["token_embd.weight"] == GGMLType.Q8_0
    assert kinds["blk.0.attn_q.bias"] == kinds["output_norm.weight"] == GGMLType.F32
    assert "output.weight" not in kinds  # tied: the embedding's blocks


def test_q8_by_default_named_after_the_source(tiny_hf_dir, tmp_path):
    from qwen25.weights.gguf import GGUFFile

    result = run_cli("quantize", str(tiny_hf_dir), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / f"{tiny_hf_dir.name}-q8_0.gguf"
    with GGUFFile(out) as g:
        assert {g.info(n).ggml_type for n in g.tensors if n.endswith("weight") and "norm" not in n} == {GGMLType.Q8_0}
    again = run_cli("quantize", str(tiny_hf_dir), "--no-progress", cwd=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert run_cli("quantize", str(tiny_hf_dir), "--no-progress", "--overwrite", cwd=tmp_path).returncode == 0


def test_q4_and_q8_track_the_fp32_model(tiny_hf_dir):
    from qwen25 import LLM

    reference = logits(LLM(str(tiny_hf_dir), quantization="none"), IDS)
    for kind, tolerance in (("q8", 0.05), ("q4", 0.2)):
        got = logits(LLM(str(tiny_hf_dir), quantization=kind), IDS)
        assert ((got - reference).norm() / reference.norm()).item() < tolerance, kind


def test_q4_layout():
    from qwen25.config import ModelConfig
    from qwen25.weights.quantized import block_type

    config = ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=896, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    assert block_type(config, "model.layers.0.self_attn.q_proj.weight", 256, 4) == GGMLType.Q4_K
    assert block_type(config, "model.layers.0.mlp.down_proj.weight", 896, 4) == GGMLType.Q5_0  # 896 % 256 != 0
    assert block_type(config, "model.layers.0.self_attn.v_proj.weight", 256, 4) == GGMLType.Q8_0
    assert block_type(config, "model.layers.2.mlp.up_proj.weight", 256, 4) == GGMLType.Q8_0  # the last layer
    assert block_type(config, "lm_head.weight", 256, 4) == GGMLType.Q8_0
    assert block_type(config, "model.layers.0.mlp.up_proj.weight", 256, 8) == GGMLType.Q8_0


def test_a_lone_safetensors_file_is_a_clear_error(tmp_path):
    from qwen25.weights.errors import CheckpointError
    from qwen25.weights.loader import load_weights

    old = tmp_path / "model-q8.safetensors"  # what `qwen25 quantize --output` wrote before it wrote GGUF files
    old.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="quantize` it to a .gguf"):
        load_weights(old, quantization="q8")


@pytest.mark.parametrize("args,fragments", [
    (["/nonexistent/model-dir"], ["/nonexistent/model-dir", "no such file"]),
    (["{tiny}", "--bits", "3"], ["bits must be 8", "got 3"]),
    (["{tiny}", "--output", "{tmp}/out.bin"], ["must be a file name ending in .gguf"]),
    (["{tiny}", "--output", "{tmp}/no/such/dir/x.gguf"], ["no such directory"]),
    (["{tmp}", "-o", "{tmp}/x.gguf"], ["no tokenizer.json"]),
])
def test_quantize_bad_input_is_a_one_line_error(args, fragments, tiny_hf_dir, tmp_path):
    args = [a.format(tiny=tiny_hf_dir, tmp=tmp_path) for a in args]
    result = run_cli("quantize", *args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("qwen25: error:") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_quantize_help_teaches():
    result = run_cli("quantize", "--help")
    assert result.returncode == 0
    for word in ("--bits", "--output", "--overwrite", "examples:", "bytes/weight", "Q8_0", "Q4_K", "llama.cpp"):
        assert word in result.stdout


# --- the real model ---------------------------------------------------------------------------------------------


def code_windows(tokenizer) -> list[torch.Tensor]:  # noqa: ANN001
    """Four 1,024-token windows of PyTorch's own source (fixed by the pinned torch version); the first is the
    q8 test's text."""
    import torch.functional
    import torch.nn.modules.activation
    import torch.nn.modules.module

    sources = [(torch.nn.modules.conv.__doc__ or "") + open(torch.nn.modules.conv.__file__).read()[:9000],
               open(torch.nn.modules.activation.__file__).read()[20000:],
               open(torch.functional.__file__).read()[5000:], open(torch.nn.modules.module.__file__).read()[30000:]]
    return [torch.tensor([tokenizer.encode(text)[:1024]]) for text in sources]


def perplexity(model, windows: list[torch.Tensor]) -> float:  # noqa: ANN001
    nll = 0.0
    with torch.inference_mode():
        for ids in windows:
            out = model(ids)
            nll += torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:], reduction="sum").item()
    return math.exp(nll / sum(ids.shape[1] - 1 for ids in windows))


def perplexity_cached(model, windows: list[torch.Tensor], chunk: int = 256) -> float:  # noqa: ANN001
    """Perplexity with each window fed through a KV cache in chunks: the path generation takes (native)."""
    from qwen25.engine.kv_cache import ContiguousKVCache
    from qwen25.kernels.native import NativeForward

    native = NativeForward.for_model(model)
    assert native is not None, "the q8/q4 model should run natively here"
    nll = 0.0
    with torch.no_grad():
        for ids in windows:
            cache = ContiguousKVCache(model.config, 1, ids.shape[1])
            out = torch.cat([native.forward_cache(part, cache, cache.native_view(), part.shape[1])
                             for part in ids.split(chunk, dim=1)], dim=1)
            nll += torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:], reduction="sum").item()
    return math.exp(nll / sum(ids.shape[1] - 1 for ids in windows))


@pytest.mark.slow
@pytest.mark.real_model
def test_q8_and_q4_perplexity_against_fp32_reference(real_gguf):
    """Qwen2.5-Coder-0.5B on 4 x 1,024 tokens of code, against its dequantized fp32 weights (ppl 3.9459).
    Measured (PyTorch path / native forward, ratio to fp32): q8 (Q8_0) 0.9995 / 1.0002; q4 (Q5_0 projections,
    Q4_K down_proj, Q8_0 v_proj, last layer and tables) 0.9986 / 0.9992 (session 15); the file's own blocks
    ("gguf") 1.0000 / 1.0000 since the K types' activation exponents (1.0016 / 1.0005 before). The older private
    formats gave q8 1.0008 / 1.0046 and q4 1.0043 / 1.0063. Requantizing an already 4-bit file to q4 adds little;
    the bound is the project's 1% target for fast paths."""
    from qwen25 import LLM

    reference = LLM(str(real_gguf), quantization="none")
    windows = code_windows(reference.tokenizer)
    base = perplexity(reference.model, windows)
    del reference
    for kind in ("q8", "q4"):
        llm = LLM(str(real_gguf), quantization=kind)
        assert llm.engine.runner.native_for_pass() is not None  # the fused native forward runs its passes
        for path, ppl in (("PyTorch", perplexity(llm.model, windows)), ("native", perplexity_cached(llm.model, windows))):
            assert abs(ppl / base - 1) < 0.01, f"{kind} perplexity on the {path} path is {ppl / base:.4f}x fp32's"
        del llm
