"""qwen25.train.logprobs: chunked per-token log-probs (and entropy) equal a full-vocabulary log_softmax of the
model's logits, in value and in gradient, with left padding and with no labelled position."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import unit_scale_
from train_toy import TOY_CONFIG

from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.train.distributed import DistContext
from qwen25.train.logprobs import sequence_logps, token_logps

CTX = DistContext()


def _model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return unit_scale_(Qwen2ForCausalLM(TOY_CONFIG)).train()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TOY_CONFIG.vocab_size, (4, 12), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 3:11] = ids[:, 4:12]
    labels[1, 3:] = -100
    return ids, labels


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out


def _assert_grads_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    for name, grad in ours.items():
        scale = ref[name].abs().max().item()
        assert (grad - ref[name]).abs().max().item() <= 1e-5 * scale + 1e-9, name


@pytest.mark.parametrize("chunk", [3, 1024])
def test_token_logps_and_entropy_equal_full_log_softmax(chunk):
    model = _model()
    ids, labels = _inputs()
    weights = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    out = token_logps(model, ids, labels, CTX, chunk=chunk, entropy=True)
    ((out.logps + 0.1 * out.entropy) * weights).sum().backward()
    ours = _grads(model)

    full = F.log_softmax(model(ids), -1)
    keep = labels != -100
    expected = full.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    entropy = -(full.exp() * full).sum(-1) * keep
    ((expected + 0.1 * entropy) * weights).sum().backward()
    torch.testing.assert_close(out.logps, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.mask, keep)
    _assert_grads_close(ours, _grads(model))

    sums, counts = sequence_logps(model, ids, labels, CTX, chunk=chunk)
    torch.testing.assert_close(sums, expected.sum(-1), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [8, 0, 8, 8]


def test_left_padding_gives_the_unpadded_rows_values():
    model = _model().eval()
    ids, labels = _inputs()
    padded = torch.cat([torch.zeros(4, 3, dtype=ids.dtype), ids], 1)
    padded_labels = torch.cat([torch.full((4, 3), -100), labels], 1)
    mask = torch.ones_like(padded, dtype=torch.bool)
    mask[:, :3] = False
    positions_free = token_logps(model, ids, labels, CTX, chunk=5)
    with torch.no_grad():
        shifted = token_logps(model, padded, padded_labels, CTX, chunk=5, padding_mask=mask)
    # positions restart after the padding only if given; without positions the padded rows' RoPE is shifted by
    # 3, which attention is invariant to (relative positions), so the log-probs agree
    torch.testing.assert_close(shifted.logps[:, 3:], positions_free.logps.detach(), rtol=1e-4, atol=1e-4)


def test_no_labelled_position_is_zero_and_connected():
    model = _model()
    ids, _ = _inputs()
    out = token_logps(model, ids, torch.full_like(ids, -100), CTX, entropy=True)
    assert out.logps.abs().sum() == 0 and out.entropy.abs().sum() == 0
    out.logps.sum().backward()  # no error: still part of the graph


def test_bad_shapes_are_refused():
    model = _model()
    ids, labels = _inputs()
    with pytest.raises(ValueError, match="same"):
        token_logps(model, ids, labels[:, :5], CTX)
    with pytest.raises(ValueError, match="chunk"):
        token_logps(model, ids, labels, CTX, chunk=0)
