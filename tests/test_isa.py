"""Runtime ISA dispatch (`qwen25.kernels.isa`): which level the CPU's flags allow, what $QWEN25_ISA forces, the
error for a level the CPU lacks, that each build holds the instructions of its level, and that the avx512 and
avx2 builds of the fused forward give the same logits bit for bit (their int8 dot products are exact integer sums
either way: vpdpbusd vs maddubs + madd, whose int16 pairs cannot saturate for the kernel's value ranges; the float
steps are the same source). Agreement of each build with the PyTorch reference is in test_native_forward.py,
which runs every test there on each level the CPU has."""

from __future__ import annotations

import shutil
import subprocess
import warnings

import pytest
import torch

from qwen25.engine.kv_cache import ContiguousKVCache
from qwen25.kernels import isa, kernels_line, load_forward_kernel
from qwen25.kernels.native import NativeForward

from test_native_forward import native_contiguous, tiny_q8_model

AVX2_ONLY = frozenset({"sse2", "avx", "avx2", "fma", "f16c"})
AVX512 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
CPUINFO = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(isa.ENV, raising=False)
    monkeypatch.delenv("QWEN25_NO_NATIVE", raising=False)


def test_cpuinfo_parsing() -> None:
    assert isa.cpu_flags(CPUINFO) == frozenset({"fpu", "sse2", "avx", "avx2", "fma", "f16c"})
    assert isa.cpu_model(CPUINFO) == "Test CPU 9000"
    assert isa.cpu_flags("") == frozenset()


@pytest.mark.skipif(not isa.cpu_flags(), reason="no /proc/cpuinfo flags on this OS")
def test_levels_from_flags() -> None:
    if isa.missing("avx2", AVX2_ONLY) == ["an x86-64 CPU"]:
        pytest.skip("not an x86-64 CPU: every native level is refused")
    assert isa.best_level(AVX512) == "avx512"
    assert isa.best_level(AVX2_ONLY) == "avx2"
    assert isa.best_level(frozenset({"sse2"})) == "none"
    assert isa.missing("avx512", AVX2_ONLY) == ["avx512f", "avx512bw", "avx512vl", "avx512_vnni"]
    assert isa.missing("avx512", AVX512 - {"avx512_vnni"}) == ["avx512_vnni"]  # F/BW/VL alone is not enough
    assert isa.selected_level(AVX512) == "avx512"


def test_env_forces_a_lower_level(monkeypatch: pytest.MonkeyPatch) -> None:
    if isa.missing("avx2", AVX512):
        pytest.skip("not an x86-64 CPU")
    monkeypatch.setenv(isa.ENV, "avx2")
    assert isa.selected_level(AVX512) == "avx2"
    assert "forced by QWEN25_ISA=avx2" in isa.describe(AVX512)
    monkeypatch.setenv(isa.ENV, "none")
    assert isa.selected_level(AVX512) == "none"
    monkeypatch.setenv(isa.ENV, "auto")
    assert isa.selected_level(AVX512) == "avx512"
    monkeypatch.delenv(isa.ENV)
    monkeypatch.setenv("QWEN25_NO_NATIVE", "1")  # the older switch still turns the kernels off
    assert isa.selected_level(AVX512) == "none"


def test_forcing_a_level_the_cpu_lacks_names_the_features(monkeypatch: pytest.MonkeyPatch) -> None:
    if isa.missing("avx2", AVX2_ONLY):
        pytest.skip("not an x86-64 CPU")
    monkeypatch.setenv(isa.ENV, "avx512")
    with pytest.raises(ValueError, match="lacks avx512f, avx512bw, avx512vl, avx512_vnni"):
        isa.selected_level(AVX2_ONLY)
    assert "lacks avx512f" in isa.describe(AVX2_ONLY)
    monkeypatch.setenv(isa.ENV, "sse9")
    with pytest.raises(ValueError, match="unknown ISA level 'sse9'"):
        isa.selected_level(AVX2_ONLY)


def test_kernels_line_says_what_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    line = kernels_line()
    assert line.startswith(f"cpu: {isa.cpu_model()}")
    assert f"kernels: {isa.best_level()}" in line
    monkeypatch.setenv(isa.ENV, "none")
    assert "kernels: none (PyTorch modules)" in kernels_line()


def test_without_block_kernels_auto_loads_float_weights_and_block_formats_say_why(
        monkeypatch: pytest.MonkeyPatch, tiny_hf_dir, tmp_path) -> None:  # noqa: ANN001
    """Where the kernels cannot run (no C compiler, no AVX2: QWEN25_ISA=none stands in), a GGUF loads with
    quantization="auto" as dequantized weights on the PyTorch path and generates; asking for block weights
    ("gguf", "q8", "q4") fails at load, naming the reason and the way out, not at the first forward."""
    from qwen25 import LLM, SamplingParams
    from qwen25.checkpoint import load
    from qwen25.weights.errors import CheckpointError
    from qwen25.weights.export import export_model

    source = load(tiny_hf_dir)
    path = tmp_path / "tiny.gguf"
    export_model(source.model, path, "gguf", tokenizer=source.tokenizer, dtype="q8_0")
    monkeypatch.setenv(isa.ENV, "none")
    llm = LLM(str(path))
    assert llm.quantization == "none"
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 3
    for kind in ("gguf", "q8", "q4"):
        with pytest.raises(CheckpointError, match=f"quantization='{kind}' runs on the block kernels, which cannot "
                                                  "run here .*kernels: none.*load with quantization='none'"):
            LLM(str(path), quantization=kind)


def test_models_paths_prints_the_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    from qwen25.weights.cli import ModelsConfig, main_models

    assert main_models(ModelsConfig(paths=True)) == 0
    assert kernels_line() in capsys.readouterr().out


def skip_unless(level: str) -> None:
    lacking = isa.missing(level)
    if lacking:
        pytest.skip(f"the {level} kernels need {', '.join(lacking)}, which this CPU lacks")
    if load_forward_kernel(level=level) is None:
        pytest.skip(f"the {level} build did not build here (no C compiler)")


@pytest.mark.parametrize("level", ["avx512", "avx2"])
def test_every_level_the_cpu_runs_builds_where_there_is_a_compiler(level: str) -> None:
    """The kernel tests skip where a build is missing: right without a compiler, wrong with one. So a compile
    error in a kernel fails here instead of turning the kernel tests into skips."""
    from qwen25.kernels import _compiler, load_ggml_kernels

    lacking = isa.missing(level)
    if lacking:
        pytest.skip(f"the {level} kernels need {', '.join(lacking)}, which this CPU lacks")
    if _compiler() is None:
        pytest.skip("no C compiler here: the PyTorch path runs, as it should")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the build's compiler errors, if any, in the failure
        assert load_ggml_kernels(level) is not None
        assert load_forward_kernel(level=level) is not None


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
@pytest.mark.parametrize("level,has_vnni", [("avx512", True), ("avx2", False)])
def test_each_build_holds_its_instructions(level: str, has_vnni: bool) -> None:
    skip_unless(level)
    lib = load_forward_kernel(level=level)
    text = subprocess.run(["objdump", "-d", lib._name], capture_output=True, text=True, check=True).stdout
    assert ("vpdpbusd" in text) == has_vnni
    assert "vpmaddubsw" in text  # both: the block kernels' int8 dot products on 256-bit vectors
    if level == "avx2":
        assert "zmm" not in text and "vpdpbusd" not in text  # nothing an AVX2-only CPU would fault on


@pytest.mark.parametrize("bits", [8, 4])
def test_avx512_and_avx2_give_the_same_logits(bits: int) -> None:
    skip_unless("avx512")
    skip_unless("avx2")
    model = tiny_q8_model(bits=bits)
    chunks = [[5, 17, 300, 2, 9, 44, 7], [11], [250], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    logits = {}
    for level in ("avx512", "avx2"):
        native = NativeForward.for_model(model, level=level)
        logits[level] = native_contiguous(native, chunks, ContiguousKVCache(model.config, 1, 32))
    assert torch.isfinite(logits["avx2"]).all()
    assert torch.equal(logits["avx512"], logits["avx2"])
