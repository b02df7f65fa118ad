"""Matmuls on ggml weight blocks (`qwen25/kernels/ggml_dot.c` via `qwen25.kernels.ggml_matmul`) against
gguf-py's own dequantizer (`gguf.quants.dequantize`, the reference) on random blocks and on the real 0.5B's
tensors, which hold all four supported types (Q4_K, Q6_K, Q5_0, Q8_0).

Bounds: with the input rounded the way the kernel rounds it (`quantize_activations`, 8 bits per block), the kernel
equals `x_q @ dequantize(W).T` up to fp32 summation order: relative error < 2e-6 (measured ~2.5e-7). The kernels
(packed panels for long passes, rows streamed in place for short ones) take the same integer and fp32 steps for a
(row, weight row) pair, so a row's result does not depend on the batch. Against the
unrounded input, the activation rounding costs ~0.5-2% relative error on random data (bound 4%). The avx512
(vpdpbusd) and avx2 (maddubs) builds give the same bits: their integer sums are exact either way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen25.kernels import isa, load_ggml_kernels
from qwen25.kernels.ggml_matmul import BLOCK as VALUES, ggml_matmul, quantize_activations
from qwen25.weights.quants import GGMLType, tensor_nbytes

gguf_quants = pytest.importorskip("gguf.quants")
gguf = pytest.importorskip("gguf")

SCALE_BYTES = {GGMLType.Q4_K: (0, 2), GGMLType.Q6_K: (208,), GGMLType.Q5_0: (0,), GGMLType.Q8_0: (0,)}
BLOCK_BYTES = {GGMLType.Q4_K: 144, GGMLType.Q6_K: 210, GGMLType.Q5_0: 22, GGMLType.Q8_0: 34}
BLOCK = list(BLOCK_BYTES)  # the types the kernels run


def levels() -> list[str]:
    return ["avx512", "avx2"]


def skip_unless(level: str) -> None:
    lacking = isa.missing(level)
    if lacking:
        pytest.skip(f"the {level} kernels need {', '.join(lacking)}, which this CPU lacks")
    if load_ggml_kernels(level) is None:
        pytest.skip(f"the {level} build of ggml_dot.c did not build here (no C compiler)")


def reference_weight(raw: np.ndarray, ggml_type: GGMLType, shape: tuple[int, int]) -> torch.Tensor:
    deq = gguf_quants.dequantize(raw.reshape(shape[0], -1), gguf.GGMLQuantizationType(int(ggml_type)))
    return torch.from_numpy(np.asarray(deq, dtype=np.float32).reshape(shape))


def random_blocks(ggml_type: GGMLType, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random bytes in every quant, bit and scale field; the fp16 scales set to finite random values."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, tensor_nbytes(ggml_type, shape), dtype=np.uint8)
    blocks = raw.reshape(-1, BLOCK_BYTES[ggml_type])
    for at in SCALE_BYTES[ggml_type]:
        scales = rng.uniform(1e-3, 2e-2, len(blocks)).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw


def activations(m: int, n: int, seed: int) -> torch.Tensor:
    """Random rows whose 32-value groups differ in scale by up to 2^6, as real activations do: every exponent the
    K types' activation sub-blocks take (0..3, and past the cap) occurs."""
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 ** -torch.randint(0, 7, (m, n // 32, 1), generator=g).float()
    return (torch.randn(m, n // 32, 32, generator=g) * scale).reshape(m, n)


def check(raw: np.ndarray, ggml_type: GGMLType, shape: tuple[int, int], x: torch.Tensor, level: str) -> torch.Tensor:
    got = ggml_matmul(x, raw, ggml_type, shape, level=level)
    weight = reference_weight(raw, ggml_type, shape)
    exact = quantize_activations(x, ggml_type) @ weight.T
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < 2e-6, f"{ggml_type.name} {level}: relative error {rel:.2e} vs the rounded-input reference"
    full = x @ weight.T
    rel_full = ((got - full).norm() / full.norm()).item()
    assert rel_full < 4e-2, f"{ggml_type.name} {level}: relative error {rel_full:.2e} vs the fp32 input"
    return got


@pytest.mark.parametrize("level", levels())
@pytest.mark.parametrize("ggml_type", list(BLOCK))
@pytest.mark.parametrize("m", [1, 3, 16])
def test_random_blocks(ggml_type: GGMLType, level: str, m: int) -> None:
    skip_unless(level)
    shape = (37, 2 * 256)
    check(random_blocks(ggml_type, shape, seed=int(ggml_type)), ggml_type, shape, activations(m, shape[1], m), level)


@pytest.mark.parametrize("ggml_type", list(BLOCK))
def test_isa_builds_agree_bit_for_bit(ggml_type: GGMLType) -> None:
    skip_unless("avx512")
    skip_unless("avx2")
    shape = (19, 768)
    raw, x = random_blocks(ggml_type, shape, seed=7), activations(4, 768, 7)
    assert torch.equal(ggml_matmul(x, raw, ggml_type, shape, level="avx512"),
                       ggml_matmul(x, raw, ggml_type, shape, level="avx2"))


@pytest.mark.parametrize("level", levels())
@pytest.mark.parametrize("ggml_type", list(BLOCK))
@pytest.mark.parametrize("n", [512, 768, 800, 2080])
def test_rows_do_not_depend_on_the_batch(ggml_type: GGMLType, level: str, n: int) -> None:
    """Passes of 1 row run the streaming kernel (ggml_stream.c: rows read in place), 2 up to a per-type crossover
    the multi-row one (ggml_stream_rows.c: groups of 8, 4 or 2), longer ones the packed panels in tiles of several
    activation rows plus leftover rows (ggml_panel.c), and 37 weight rows end in a partial panel: a row's result
    is the same bits in every case. n: an even and an odd number of 256-value blocks (the streaming kernel takes
    them in pairs), and 25 and 65 32-value blocks (the streaming kernel reads rows in chunks of 64 blocks, 8 rows
    at a time: 37 rows end in a partial group)."""
    skip_unless(level)
    if n % VALUES[ggml_type]:
        pytest.skip(f"{n} values are not whole {ggml_type.name} blocks")
    shape = (37, n)
    raw, x = random_blocks(ggml_type, shape, seed=3), activations(13, n, 3)
    together = ggml_matmul(x, raw, ggml_type, shape, level=level)
    alone = torch.cat([ggml_matmul(x[i:i + 1], raw, ggml_type, shape, level=level) for i in range(13)])
    pairs = torch.cat([ggml_matmul(x[i:i + 2], raw, ggml_type, shape, level=level) for i in range(0, 12, 2)])
    threes = torch.cat([ggml_matmul(x[i:i + 3], raw, ggml_type, shape, level=level) for i in range(0, 12, 3)])
    assert torch.equal(together, alone)
    assert torch.equal(together[:12], pairs) and torch.equal(together[:12], threes)


@pytest.mark.parametrize("level", levels())
@pytest.mark.parametrize("ggml_type", list(BLOCK))
@pytest.mark.parametrize("n", [512, 800])
def test_every_pass_size_gives_the_same_bits(ggml_type: GGMLType, level: str, n: int) -> None:
    """Passes of 1..16 rows (the single-row stream kernel for 1, the multi-row one, ggml_stream_rows.c, up to
    its per-type crossover, packed panels above it) against a 20-row pass (panels): the first m rows are the same
    bits for every m."""
    skip_unless(level)
    if n % VALUES[ggml_type]:
        pytest.skip(f"{n} values are not whole {ggml_type.name} blocks")
    shape = (37, n)
    raw, x = random_blocks(ggml_type, shape, seed=5), activations(20, n, 5)
    panels = ggml_matmul(x, raw, ggml_type, shape, level=level)
    for m in range(1, 17):
        assert torch.equal(ggml_matmul(x[:m], raw, ggml_type, shape, level=level), panels[:m]), f"{m} rows"


def test_bad_input_is_refused() -> None:
    raw = random_blocks(GGMLType.Q8_0, (2, 64), seed=0)
    with pytest.raises(ValueError, match="no block kernel for Q2_K"):
        ggml_matmul(torch.randn(1, 64), raw, GGMLType.Q2_K, (2, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        ggml_matmul(torch.randn(1, 48), raw, GGMLType.Q8_0, (2, 48))
    with pytest.raises(ValueError, match="bytes for a Q8_0 weight"):
        ggml_matmul(torch.randn(1, 64), raw[:-1], GGMLType.Q8_0, (2, 64))


@pytest.mark.real_model
@pytest.mark.parametrize("level", levels())
def test_real_tensors(real_gguf, level: str) -> None:  # noqa: ANN001
    """The first 64 rows of one tensor of each type in the real 0.5B Q4_K_M file, with a hidden-state-like input
    (a few large channels, as Qwen2's residual stream has)."""
    from qwen25.weights.gguf import GGUFFile

    skip_unless(level)
    g = GGUFFile(real_gguf)
    seen = set()
    for name, info in g.tensors.items():
        if len(info.shape) != 2 or info.ggml_type not in BLOCK or info.ggml_type in seen:
            continue
        seen.add(info.ggml_type)
        rows, n = 64, info.shape[1]
        raw = np.asarray(g.raw(name)).reshape(-1)[:tensor_nbytes(info.ggml_type, (rows, n))]
        torch.manual_seed(0)
        x = torch.randn(2, n)
        x[:, :4] *= 30
        check(raw, info.ggml_type, (rows, n), x, level)
    assert seen == set(BLOCK), f"the 0.5B file was expected to hold all four types, found {seen}"


def test_type_ids_match_the_loader() -> None:
    from qwen25.kernels.ggml_matmul import TYPES

    for type_id, (name, qk, nbytes) in TYPES.items():
        assert GGMLType(type_id).name == name
        assert tensor_nbytes(GGMLType(type_id), (1, qk)) == nbytes


def test_k_type_activations_keep_up_to_three_more_bits_below_the_block_max() -> None:
    """The K types' 256-value activation blocks round each 32 values with the block's step A / 127 divided by
    2^k, k <= 3 the most that keeps them within +-127 (ggml_dot.c): a channel 100x the others no longer costs the
    rest of its block 3 bits. Closed form: the error is at most half the sub-block's step."""
    torch.manual_seed(0)
    x = torch.randn(1, 512)
    x[0, 0] = 100.0                 # block 0: one outlier, the other 7 sub-blocks at ~1/30 of it: k = 3
    x[0, 256 + 32:256 + 64] *= 0.6  # block 1: a sub-block at ~0.2-0.3 of the max: k = 1
    q = quantize_activations(x, GGMLType.Q4_K)
    step0 = 100.0 / 127
    assert (q[0, :32] - x[0, :32]).abs().max() <= step0 / 2 * (1 + 1e-6)
    assert (q[0, 32:256] - x[0, 32:256]).abs().max() <= step0 / 16 * (1 + 1e-6)
    b1 = x[0, 256:]
    amax, sub_max = b1.abs().max(), b1[32:64].abs().max()
    k = max(kk for kk in range(4) if sub_max * 2 ** kk <= amax)
    assert k >= 1
    assert (q[0, 256 + 32:256 + 64] - b1[32:64]).abs().max() <= amax / 127 / 2 ** k / 2 * (1 + 1e-6)
    # the 32-value types are unchanged: one step per block
    q8 = quantize_activations(x[:, :32], GGMLType.Q8_0)
    assert torch.allclose(q8, torch.round(x[:, :32] * (127 / 100.0)) * (100.0 / 127))
