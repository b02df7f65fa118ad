"""Ground for training: trainable loads (gradients reach every weight), the from-scratch init (its statistics,
seeding, tied weights), and the default load staying frozen."""

from __future__ import annotations

import pytest
import torch

from qwen25.checkpoint import load
from qwen25.config import preset
from qwen25.model.init import init_weights, model_from_config
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.weights.loader import load_weights

TINY = preset("qwen2.5-0.5b").replace(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def lm_loss(model: Qwen2ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


# --- loading for training -----------------------------------------------------------------------------------------
def test_trainable_load_gives_every_parameter_a_gradient(tiny_hf_dir) -> None:  # noqa: ANN001
    checkpoint = load(tiny_hf_dir, trainable=True)
    model = checkpoint.model
    assert model.training and checkpoint.tokenizer is not None
    params = dict(model.named_parameters())
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied in the file's config
    ids = torch.tensor([checkpoint.tokenizer.encode("def add(a, b):\n    return a + b\n")])
    lm_loss(model, ids).backward()
    missing = [name for name, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert all(p.grad.abs().sum() > 0 for name, p in params.items() if "layers.0" in name)


def test_trainable_weights_keep_the_requested_dtype(tiny_hf_dir) -> None:  # noqa: ANN001
    model = load_weights(tiny_hf_dir, dtype=torch.bfloat16, trainable=True).model
    assert all(p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.inv_freq.dtype == torch.float32  # the RoPE buffer is not a weight


def test_optimizer_steps_write_the_loaded_tensors_not_the_file(tiny_hf_dir) -> None:  # noqa: ANN001
    """fp32 weights of an fp32 file are copy-on-write views of its mapping: a step changes the model only."""
    model = load_weights(tiny_hf_dir, trainable=True).model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    weight = model.model.layers[0].self_attn.q_proj.weight
    before = weight.detach().clone()
    lm_loss(model, torch.randint(0, 1000, (2, 12))).backward()
    optimizer.step()
    assert not torch.equal(before, weight)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fresh = load_weights(tiny_hf_dir).model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(before, fresh)


def test_default_load_is_frozen(tiny_hf_dir) -> None:  # noqa: ANN001
    model = load(tiny_hf_dir).model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_quantized_loads_refuse_trainable(tiny_hf_dir) -> None:  # noqa: ANN001
    for quantization in ("q8", "q4"):
        with pytest.raises(ValueError, match="trainable=True needs float weights"):
            load(tiny_hf_dir, quantization=quantization, trainable=True)


# --- training from scratch --------------------------------------------------------------------------------------
def test_init_statistics_are_what_they_claim() -> None:
    model = model_from_config(TINY, seed=0, std=0.02)
    assert model.training and all(p.requires_grad for p in model.parameters())
    named = dict(model.named_parameters())
    weights = torch.cat([p.flatten() for n, p in named.items() if n.endswith("proj.weight") or "embed" in n])
    assert abs(weights.mean().item()) < 1e-3
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    for name, p in named.items():
        if name.endswith("proj.weight") or "embed" in name:
            assert p.std().item() == pytest.approx(0.02, rel=0.25), name
    biases = [p for n, p in named.items() if n.endswith(".bias")]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)
    norms = [p for n, p in named.items() if "norm" in n]
    assert len(norms) == 2 * TINY.num_hidden_layers + 1 and all(torch.all(p == 1) for p in norms)
    reference = Qwen2ForCausalLM(TINY).model.inv_freq
    assert torch.equal(model.model.inv_freq, reference)  # RoPE buffer intact


def test_init_is_seeded_without_touching_the_global_rng() -> None:
    state = torch.random.get_rng_state()
    a, b = model_from_config(TINY, seed=1), model_from_config(TINY, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = model_from_config(TINY, seed=2)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_tied_weights_stay_tied_through_init_and_training() -> None:
    model = model_from_config(TINY, seed=0)
    assert TINY.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert len(list(model.parameters())) == len(dict(model.named_parameters(remove_duplicate=False))) - 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, TINY.vocab_size, (2, 16))
    first = lm_loss(model, ids)
    for _ in range(5):
        optimizer.zero_grad()
        lm_loss(model, ids).backward()
        optimizer.step()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert lm_loss(model, ids).item() < first.item()  # it learns

    untied = model_from_config(TINY.replace(tie_word_embeddings=False), seed=0)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_init_weights_reinitialises_a_loaded_model_and_keeps_the_tie(tiny_hf_dir) -> None:  # noqa: ANN001
    model = load_weights(tiny_hf_dir, trainable=True).model
    init_weights(model, std=0.5, seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.5, rel=0.01)
    assert all(torch.all(layer.input_layernorm.weight == 1) for layer in model.model.layers)


def test_init_weights_refuses_a_quantized_model() -> None:
    from qwen25.weights.quantized import quantize_loaded_model

    model = quantize_loaded_model(model_from_config(TINY, seed=0))
    norm = model.model.norm.weight.detach().clone()
    with pytest.raises(ValueError, match="buffers"):
        init_weights(model)
    assert torch.equal(norm, model.model.norm.weight)  # nothing changed before the refusal


def test_bf16_from_scratch_and_unknown_preset_names() -> None:
    model = model_from_config(TINY, seed=0, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.inv_freq.dtype == torch.float32
    with pytest.raises(KeyError, match="unknown preset"):
        model_from_config("qwen9-0.5b")
