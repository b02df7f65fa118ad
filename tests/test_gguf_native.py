"""The fused native forward on the GGUF file's own blocks (`quantization="gguf"`, qwen25.weights.gguf_blocks) on the
real 0.5B Q4_K_M (Q4_K, Q6_K, Q5_0, Q8_0 tensors), against the PyTorch path on the same layers.

The PyTorch path runs the same `GGMLLinear` block matmuls (activations rounded to 8 bits per block, the format's
design) but attention, norms and residual adds as PyTorch ops in another fp32 order; an activation that lies at a
rounding boundary can then round to the neighbouring step, and such flips propagate through 24 layers. Measured:
max |logit delta| 0.41 on logits of magnitude 24 (1.7%), every argmax equal; bound 5% of the largest logit.
Rows are independent (batched == alone, bit for bit) and the avx2 and avx512 builds give the same bits.
"""

from __future__ import annotations

import pytest
import torch

from qwen25.kernels import isa
from qwen25.kernels.native import KVView, NativeForward
from qwen25.weights.loader import load_weights

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

PROMPT = [151644, 872, 198, 7985, 264, 13027, 729]  # <|im_start|>user\nWrite a Python function
OTHER = [151644, 872, 198, 9707]


@pytest.fixture(scope="module")
def model(real_gguf):
    return load_weights(real_gguf, quantization="gguf")


def run(native: NativeForward, config, rows: list[tuple[int, int, int]], seqs: int) -> torch.Tensor:
    k = torch.zeros(config.num_hidden_layers, seqs, config.num_key_value_heads, 64, config.head_dim)
    tokens = torch.tensor([t for t, _, _ in rows])
    positions = torch.tensor([p for _, p, _ in rows], dtype=torch.int32)
    seq_of_row = torch.tensor([s for _, _, s in rows], dtype=torch.int32)
    return native(tokens, positions, seq_of_row, KVView(k, torch.zeros_like(k)), torch.arange(len(rows), dtype=torch.int32))


def test_blocks_are_the_files_bytes(model, real_gguf):
    layer = model.model.model.layers[0]
    assert not layer.mlp.down_proj.raw.flags.owndata  # a view of the mapping, not a copy
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


def test_avx2_equals_avx512(model):
    for level in ("avx512", "avx2"):
        if isa.missing(level):
            pytest.skip(f"this CPU lacks {', '.join(isa.missing(level))} for the {level} build")
    rows = [(t, i, 0) for i, t in enumerate(PROMPT)]
    a = run(NativeForward.for_model(model.model, level="avx512"), model.config, rows, 1)
    b = run(NativeForward.for_model(model.model, level="avx2"), model.config, rows, 1)
    assert torch.equal(a, b)
