"""The attention seam: per-document attention in packed rows, and the position ids that go with it."""

from __future__ import annotations

import torch

from qwen25.config import ModelConfig
from qwen25.model.attention import AttentionSpec, sdpa_attention
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.model.rope import positions_in_documents

from tiny_models import unit_scale_


def tiny() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return unit_scale_(Qwen2ForCausalLM(config).eval())


def test_positions_restart_at_each_document() -> None:
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    assert positions_in_documents(ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))]


def test_packed_row_equals_documents_alone() -> None:
    """Three documents packed in one row with document_ids: the same logits, and the same per-document loss, as
    each document run by itself (PyTorch path, fp32)."""
    model = tiny()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 256, (n,), generator=g) for n in (7, 12, 5)]
    packed = torch.cat(docs).unsqueeze(0)
    document_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)]).unsqueeze(0)
    with torch.no_grad():
        got = model(packed, document_ids=document_ids)[0]
        alone = [model(d.unsqueeze(0))[0] for d in docs]
    torch.testing.assert_close(got, torch.cat(alone), atol=2e-5, rtol=1e-5)
    # The loss of a packed row (labels within each document only) equals the documents' summed losses.
    loss_alone = sum(torch.nn.functional.cross_entropy(a[:-1], d[1:], reduction="sum") for a, d in zip(alone, docs))
    starts = torch.tensor([0, 7, 19])
    keep = torch.ones(packed.shape[1] - 1, dtype=torch.bool)
    keep[starts[1:] - 1] = False  # no label crosses a document boundary
    loss_packed = torch.nn.functional.cross_entropy(got[:-1][keep], packed[0, 1:][keep], reduction="sum")
    torch.testing.assert_close(loss_packed, loss_alone, atol=1e-4, rtol=1e-5)
    # Without document_ids the later documents see the earlier ones: the logits differ (the test has teeth).
    with torch.no_grad():
        plain = model(packed)[0]
    assert not torch.allclose(plain[7:], torch.cat(alone[1:]), atol=1e-3)


def test_packed_rows_train_with_gradients() -> None:
    """Gradients flow through the document mask (the training path) and match the documents' own gradients."""
    model = tiny().requires_grad_(True)
    docs = [torch.tensor([3, 9, 27, 81]), torch.tensor([2, 4, 8, 16, 32, 64])]
    packed = torch.cat(docs).unsqueeze(0)
    document_ids = torch.tensor([[0] * 4 + [1] * 6])

    def grads(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    logits = model(packed, document_ids=document_ids)[0]
    keep = torch.tensor([True, True, True, False, True, True, True, True, True])
    packed_grad = grads(torch.nn.functional.cross_entropy(logits[:-1][keep], packed[0, 1:][keep], reduction="sum"))
    alone = sum(torch.nn.functional.cross_entropy(model(d.unsqueeze(0))[0][:-1], d[1:], reduction="sum") for d in docs)
    torch.testing.assert_close(packed_grad, grads(alone), atol=1e-5, rtol=1e-4)


def test_backend_receives_unrotated_keys() -> None:
    """A custom backend sees q/k before rotation (what DCA needs) and can delegate to the reference."""
    model = tiny()
    seen: list[torch.Tensor] = []

    def recording(layer, q, k, v, cos, sin, cache, spec: AttentionSpec):  # noqa: ANN001, ANN202
        if layer == 0:
            seen.append(k)
        return sdpa_attention(layer, q, k, v, cos, sin, cache, spec)

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention=recording), model(ids))
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k = model.model.layers[0].self_attn.k_proj(x).view(1, 5, 2, 16).transpose(1, 2)
    torch.testing.assert_close(seen[0], k)
