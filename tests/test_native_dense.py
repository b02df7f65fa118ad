"""The native forward's dense causal attention (`qwen25/kernels/dense_attention.c`) on its own, on the AVX-512 and
AVX2 builds: a chunk of queries against keys/values in a paged cache (fp32, fp16 or bf16, blocks out of order)
equals softmax attention over the same stored values up to fp32 rounding (its error against float64 SDPA within
twice fp32 SDPA's plus 8 ulps of the largest output), for lengths spanning several 64-key tiles and chunks
spanning several query blocks; a row's result is bit-identical whatever the chunk it comes in, and on both
builds (whose paths differ: the AVX-512 build puts the keys along the vector lanes, the AVX2 build the queries)."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from qwen25.kernels import load_forward_kernel
from qwen25.kernels.isa import missing
from qwen25.kernels.native import KVView

BLOCK, LAYERS = 16, 2
CASES = [(1, 0), (200, 0), (300, 170), (257, 256), (130, 1), (700, 500)]  # (keys S, cached past)
# (heads, KV heads, D): the AVX-512 build puts the keys along the lanes for D a multiple of 16, the queries for D 8
SHAPES = [(14, 2, 64), (4, 4, 32), (6, 2, 16), (4, 2, 8)]


def build(level: str) -> ctypes.CDLL:
    lacking = missing(level)
    if lacking:
        pytest.skip(f"the {level} kernels need {', '.join(lacking)}, which this CPU lacks")
    lib = load_forward_kernel(level=level)
    if lib is None:
        pytest.skip("the native forward kernel did not build here (no compiler)")
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.dense_attention.argtypes = [p, i, i, p, i, i, i, i, i, p, i]
    lib.dense_attention.restype = None
    return lib


@pytest.fixture(params=["avx512", "avx2"])
def lib(request):  # noqa: ANN001, ANN201
    return build(request.param)


def cached(S: int, heads: int, kv_heads: int, D: int, dtype: torch.dtype, seed: int = 0):  # noqa: ANN201
    """Random keys/values (H_kv, S, D) in a paged cache (layer 1, blocks in reverse order over the pool); they
    come back as stored (widened to fp32) for the reference, with the view the kernel reads."""
    g = torch.Generator().manual_seed(seed)
    k, v = (3 * torch.randn(kv_heads, S, D, generator=g) for _ in range(2))
    n_blocks = -(-S // BLOCK)
    keys = torch.zeros(LAYERS, kv_heads, n_blocks, BLOCK, D, dtype=dtype)
    values = torch.zeros_like(keys)
    table = torch.arange(n_blocks - 1, -1, -1, dtype=torch.int32)
    slots = table[torch.arange(S) // BLOCK] * BLOCK + torch.arange(S) % BLOCK
    keys[1].view(kv_heads, -1, D)[:, slots] = k.to(dtype)
    values[1].view(kv_heads, -1, D)[:, slots] = v.to(dtype)
    stored = lambda c: c[1].view(kv_heads, -1, D)[:, slots].float()  # noqa: E731
    return stored(keys), stored(values), KVView(keys, values, table.unsqueeze(0))


def native(lib, view: KVView, q: torch.Tensor, past: int, kv_heads: int) -> torch.Tensor:  # noqa: ANN001
    """q (T, H, D) at positions past .. past+T-1 -> out (T, H, D)."""
    T, H, D = q.shape
    q = q.contiguous()
    out = torch.zeros(T, H, D)
    kv = view.as_struct()
    lib.dense_attention(ctypes.byref(kv), 1, 0, q.data_ptr(), T, past, H, kv_heads, D, out.data_ptr(), 2)
    return out


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, dtype: torch.dtype) -> torch.Tensor:
    """Causal SDPA in `dtype`: q (T, H, D), k/v (H_kv, S, D) -> (T, H, D) fp32."""
    S = k.shape[1]
    causal = torch.arange(S)[None, :] <= torch.arange(past, S)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None].to(dtype), k[None].to(dtype), v[None].to(dtype),
                                         attn_mask=causal, enable_gqa=True)[0]
    return out.transpose(0, 1).float()


@pytest.mark.parametrize("S,past", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,D", SHAPES)
def test_equals_softmax_attention_over_the_stored_values(lib, S, past, dtype, heads, kv_heads, D) -> None:  # noqa: ANN001
    k, v, view = cached(S, heads, kv_heads, D, dtype)
    q = torch.randn(S - past, heads, D, generator=torch.Generator().manual_seed(1))
    exact = sdpa(q, k, v, past, torch.float64)
    err, fp32_err = ((out - exact).abs().max() for out in (native(lib, view, q, past, kv_heads),
                                                          sdpa(q, k, v, past, torch.float32)))
    assert err <= 2 * fp32_err + 8 * 2**-23 * exact.abs().max(), (err, fp32_err)  # fp32 SDPA's error, a few ulps


CHUNKS = (1, 2, 3, 1, 7, 1, 1, 5, 50, 8, 1, 242)  # rows per call, in turn, until the queries run out


@pytest.mark.parametrize("S,past", [(700, 400), (130, 60), (64, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,D", SHAPES)
def test_rows_do_not_depend_on_the_chunk_or_the_build(S, past, dtype, heads, kv_heads, D) -> None:  # noqa: ANN001
    """Queries past..S-1 in one call, and in chunks of CHUNKS rows (decode rows alone, blocks of a few rows, whole
    blocks, across 64-key tiles), on each build: bit-identical; and the builds agree, so the AVX-512 build's keys
    along the lanes give the AVX2 build's queries along the lanes, bit for bit."""
    _, _, view = cached(S, heads, kv_heads, D, dtype, seed=3)
    q = torch.randn(S - past, heads, D, generator=torch.Generator().manual_seed(4))
    runs = []
    for level in ("avx512", "avx2"):
        lib = build(level)
        whole = native(lib, view, q, past, kv_heads)
        parts, at, k = [], 0, 0
        while at < S - past:
            n = min(CHUNKS[k % len(CHUNKS)], S - past - at)
            parts.append(native(lib, view, q[at:at + n], past + at, kv_heads))
            at, k = at + n, k + 1
        assert torch.equal(torch.cat(parts), whole)
        runs.append(whole)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_value_reaches_only_the_rows_that_see_it(lib, dtype, bad) -> None:  # noqa: ANN001
    """One key's value made inf or NaN (as an fp16 cache overflow would) inside a chunk: the rows before it still
    equal the clean run bit for bit (a masked key has weight 0, and 0 * inf must not leak in), the rows from it
    on are not finite."""
    heads, kv_heads, D, S, past, at = 14, 2, 64, 300, 170, 255  # key 255: mid-block (16-row blocks)
    _, _, view = cached(S, heads, kv_heads, D, dtype, seed=5)
    q = torch.randn(S - past, heads, D, generator=torch.Generator().manual_seed(6))
    clean = native(lib, view, q, past, kv_heads)
    slot = int(view.tables[0, at // BLOCK]) * BLOCK + at % BLOCK
    view.values[1].view(kv_heads, -1, D)[0, slot, 3] = bad
    poisoned = native(lib, view, q, past, kv_heads)
    rows_before = at - past
    assert torch.equal(poisoned[:rows_before], clean[:rows_before])
    assert not poisoned[rows_before:, :heads // kv_heads].isfinite().all(dim=-1).any()  # head 0's query heads
    assert torch.equal(poisoned[:, heads // kv_heads:], clean[:, heads // kv_heads:])  # the other KV head's
