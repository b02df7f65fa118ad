"""qwen25.train.linear_ce: loss and gradients equal autograd through materialised logits (the reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen25.train.linear_ce import linear_cross_entropy


def _inputs(n: int = 37, hidden: int = 16, vocab: int = 101, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float32)
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    t = torch.randint(0, vocab, (n,), generator=g)
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 8, 37, 256])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_fp32_loss_and_gradients_equal_materialised_logits(chunk, weight_grad):
    h, w, t = _inputs()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_(weight_grad)
    ref = F.cross_entropy(F.linear(h1, w1).float(), t, reduction="sum")
    (ref * 0.37).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_(weight_grad)
    got = linear_cross_entropy(h2, w2, t, chunk=chunk)
    (got * 0.37).backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-6)
    if weight_grad:
        torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-6)
    else:
        assert w2.grad is None


def test_bf16_equals_autocast_lm_head():
    """compute_dtype=bf16 is what `lm_head(hidden)` under CPU bf16 autocast computes, then an fp32 cross-entropy."""
    h, w, t = _inputs(n=64, hidden=32, vocab=300)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(h1, w1)
    ref = F.cross_entropy(logits.float(), t, reduction="sum")
    ref.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast does not change it
        got = linear_cross_entropy(h2, w2, t, chunk=16, compute_dtype=torch.bfloat16)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)
    # d logits is rounded to bf16 before its matmuls (autocast rounds the same gradient the same way)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=2e-2, atol=2e-2)


def test_without_grad_it_is_the_loss_alone():
    h, w, t = _inputs()
    with torch.no_grad():
        got = linear_cross_entropy(h, w, t, chunk=5)
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-4)


def test_tied_weight_gradients_add_up():
    """An embedding shared with the output layer gets both gradients, as with a plain lm_head."""
    h, w, t = _inputs()
    ids = torch.randint(0, w.shape[0], (h.shape[0],))
    grads = []
    for fused in (False, True):
        weight = w.clone().requires_grad_()
        hidden = F.embedding(ids, weight) + h
        loss = (linear_cross_entropy(hidden, weight, t, chunk=7) if fused
                else F.cross_entropy(hidden @ weight.T, t, reduction="sum"))
        loss.backward()
        grads.append(weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused():
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(h[:, :3], w, t)
    with pytest.raises(ValueError, match="one target per row"):
        linear_cross_entropy(h, w, t[:3])
