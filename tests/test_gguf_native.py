"""The fused native forward on the GGUF file's own blocks (`quantization="gguf"`, qwen25.weights.gguf_blocks): on a
tiny random model exported to GGUF (Q8_0 blocks; and F16, which the loader turns into Q8_0 blocks), fast, and on
the real 0.5B Q4_K_M (Q4_K, Q6_K, Q5_0, Q8_0 tensors, slow), against the PyTorch path on the same layers and
against the dequantized fp32 reference (`quantization="none"`).

The PyTorch path runs the same `GGMLLinear` block matmuls (activations rounded to 8 bits per block, the format's
design) but attention, norms and residual adds as PyTorch ops in another fp32 order; an activation that lies at a
rounding boundary can then round to the neighbouring step, and such flips propagate through 24 layers. Measured:
max |logit delta| 0.41 on logits of magnitude 24 (1.7%), every argmax equal; bound 5% of the largest logit.
Against the fp32 reference on the dequantized weights, the 8-bit activation blocks (relative rounding step
~1/254 per block) bound the tiny model's logits within 3% of their largest value (measured 0.6% for Q8_0,
1.0% for F16 made Q8_0 at load).
Rows are independent (batched == alone, bit for bit) and the avx2 and avx512 builds give the same bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen25.kernels import isa
from qwen25.kernels.native import KVView, NativeForward
from qwen25.weights.loader import load_weights

SLOW = [pytest.mark.slow, pytest.mark.real_model]
PROMPT = [151644, 872, 198, 7985, 264, 13027, 729]  # <|im_start|>user\nWrite a Python function
OTHER = [151644, 872, 198, 9707]


@pytest.fixture(scope="module", params=[pytest.param("real", marks=SLOW), "tiny-q8_0", "tiny-f16"])
def model(request, tmp_path_factory):
    if request.param == "real":
        return load_weights(request.getfixturevalue("real_gguf"), quantization="gguf")
    from qwen25.checkpoint import load
    from qwen25.weights.export import export_model

    source = load(request.getfixturevalue("tiny_hf_dir"))
    path = tmp_path_factory.mktemp(request.param) / "tiny.gguf"
    export_model(source.model, path, "gguf", tokenizer=source.tokenizer, dtype=request.param.split("-")[1])
    return load_weights(path, quantization="gguf")


def test_tiny_matches_fp32_reference(model, request):
    if model.config.hidden_size > 64:
        pytest.skip("the real model's bound is the PyTorch-path test's")
    reference = load_weights(model.source, quantization="none").model
    ids = torch.tensor([[151644, 872, 198, 7985, 264, 13027, 729, 42]])
    with torch.no_grad():
        ref = reference(ids)[0]
    native = NativeForward.for_model(model.model)
    got = run(native, model.config, [(t, i, 0) for i, t in enumerate(ids[0].tolist())], 1)
    assert (got - ref).abs().max() <= 0.03 * ref.abs().max()


def run(native: NativeForward, config, rows: list[tuple[int, int, int]], seqs: int) -> torch.Tensor:
    k = torch.zeros(config.num_hidden_layers, seqs, config.num_key_value_heads, 64, config.head_dim)
    tokens = torch.tensor([t for t, _, _ in rows])
    positions = torch.tensor([p for _, p, _ in rows], dtype=torch.int32)
    seq_of_row = torch.tensor([s for _, _, s in rows], dtype=torch.int32)
    return native(tokens, positions, seq_of_row, KVView(k, torch.zeros_like(k)), torch.arange(len(rows), dtype=torch.int32))


def test_blocks_are_the_files_bytes(model):
    layer = model.model.model.layers[0]
    raw = layer.mlp.down_proj.raw
    if model.source.parent.name.startswith("tiny-f16"):
        assert layer.mlp.down_proj.ggml_type == 8  # F16 has no block kernel: Q8_0 blocks made at load
    else:  # a view of the file's mapping, not a copy
        assert isinstance(raw.base, np.memmap) or isinstance(getattr(raw.base, "base", None), np.memmap)
    assert model.quantization == "gguf"


def test_native_matches_pytorch_path(model):
    native = NativeForward.for_model(model.model)
    assert native is not None
    with torch.no_grad():
        ref = model.model(torch.tensor([PROMPT]))
    ref = (ref.logits if hasattr(ref, "logits") else ref)[0]
    got = run(native, model.config, [(t, i, 0) for i, t in enumerate(PROMPT)], 1)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_batched_equals_alone(model):
    native = NativeForward.for_model(model.model)
    alone = run(native, model.config, [(t, i, 0) for i, t in enumerate(PROMPT)], 1)
    other = run(native, model.config, [(t, i, 0) for i, t in enumerate(OTHER)], 1)
    both = run(native, model.config, [(t, i, 0) for i, t in enumerate(PROMPT)]
               + [(t, i, 1) for i, t in enumerate(OTHER)], 2)
    assert torch.equal(both[:len(PROMPT)], alone) and torch.equal(both[len(PROMPT):], other)
    step = run(native, model.config, [(PROMPT[0], 0, 0)], 1)  # decode-sized pass: the prefetching build
    assert torch.equal(step[0], alone[0])


def test_long_pass_equals_short_ones(model):
    """A pass of 32+ rows quantizes the activations once, each thread its share of the rows (forward.c,
    SHARED_QUANT_ROWS), and runs the packed panels in full tiles: its rows equal the same rows run in shorter passes
    (each thread quantizing all rows itself), bit for bit."""
    native = NativeForward.for_model(model.model)
    first, second = (PROMPT * 3)[:20], (OTHER * 5)[:20]
    one = run(native, model.config, [(t, i, 0) for i, t in enumerate(first)], 1)
    two = run(native, model.config, [(t, i, 0) for i, t in enumerate(second)], 1)
    both = run(native, model.config, [(t, i, 0) for i, t in enumerate(first)]
               + [(t, i, 1) for i, t in enumerate(second)], 2)
    assert torch.equal(both[:20], one) and torch.equal(both[20:], two)


def test_thread_count_does_not_change_the_bits(model):
    """Each output value is computed by one thread in the same steps whatever the team size, so 1, 2 and 4
    threads give the same bits. Four threads on a two-core machine outrun their cores: the waits in
    qwen25/kernels/team_barrier.c then run out of spin and sleep on the futex, the path a quiet machine rarely
    takes. A 40-row pass (shared activation quantization, two extra waits per matmul) and decode steps, repeated:
    a wait that let a thread through early would read half-written rows and change the logits."""
    native = NativeForward.for_model(model.model)
    rows = [(t, i, 0) for i, t in enumerate((PROMPT * 6)[:40])]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = run(native, model.config, rows, 1)
        expected_step = run(native, model.config, rows[:1], 1)
        for n in (2, 4):
            torch.set_num_threads(n)
            for _ in range(5):
                assert torch.equal(run(native, model.config, rows, 1), expected), f"{n} threads"
                assert torch.equal(run(native, model.config, rows[:1], 1), expected_step), f"{n} threads"
    finally:
        torch.set_num_threads(threads)


def test_avx2_equals_avx512(model):
    for level in ("avx512", "avx2"):
        if isa.missing(level):
            pytest.skip(f"this CPU lacks {', '.join(isa.missing(level))} for the {level} build")
    rows = [(t, i, 0) for i, t in enumerate(PROMPT)]
    a = run(NativeForward.for_model(model.model, level="avx512"), model.config, rows, 1)
    b = run(NativeForward.for_model(model.model, level="avx2"), model.config, rows, 1)
    assert torch.equal(a, b)


def test_embedding_rows_are_exact(model):
    """The embedding reads its looked-up rows from the file with pread when its bytes are the file's (not
    through the mapping, see qwen25.kernels.ggml_linear): the rows equal the dequantized table's, exactly,
    through the PyTorch module and through the native forward's row table."""
    from qwen25.weights.quants import dequantize

    embed = model.model.model.embed_tokens
    assert (embed.source is not None) == (not model.source.parent.name.startswith("tiny-f16"))
    ids = torch.tensor([[PROMPT[3], 0, PROMPT[3]], [embed.num_embeddings - 1, 42, PROMPT[0]]])
    table = embed.raw.reshape(embed.num_embeddings, -1)[ids.reshape(-1).numpy()]
    expected = torch.from_numpy(np.asarray(dequantize(table.reshape(-1), embed.ggml_type,
                                                      (ids.numel(), embed.embedding_dim))))
    assert torch.equal(embed(ids).reshape(-1, embed.embedding_dim), expected)
    rows, local = embed.rows(ids)
    assert local.shape == ids.shape and torch.equal(torch.from_numpy(rows[local.reshape(-1).numpy()]),
                                                    torch.from_numpy(table))
