"""LoRA (qwen25.train.lora) against peft: adapters qwen25 writes load in peft with the same logits, adapters peft
writes load in qwen25, merging changes nothing, and `LLM(base, lora=...)` generates what transformers + peft do."""

from __future__ import annotations

import json

import pytest
import torch

from qwen25.train.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    load_merged,
    lora_state_dict,
    merge_lora,
    read_adapter_config,
    save_adapter,
)
from qwen25.weights.loader import load_weights

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def base_dir(request, tmp_path_factory):
    """A tiny random transformers Qwen2 (q/k/v biases, GQA) saved as an HF directory."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                      tie_word_embeddings=request.param)
    path = tmp_path_factory.mktemp("lora-base")
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def _base(path):
    return load_weights(path).model


def _randomize_b(model, seed=1):
    """B is zero at init (the adapter is a no-op); give it values so the comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _peft_model(base_dir, adapter_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(hf, adapter_dir).eval()


IDS = torch.tensor([[5, 17, 99, 3, 250, 7, 81, 8, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9]])


def test_apply_lora_freezes_base_and_inits_like_peft(base_dir):
    model = _base(base_dir)
    before = model(IDS)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    lora = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(lora) == 2 * len(ALL)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(lora)
    assert all(m.lora_B.weight.abs().sum() == 0 and m.lora_A.weight.abs().sum() > 0 for m in lora)
    assert all(m.scaling == 2.0 for m in lora)
    torch.testing.assert_close(model(IDS), before, rtol=0, atol=0)  # B = 0: the adapter starts as a no-op
    # the base keeps its HF names, so its state dict still loads as a checkpoint
    assert "model.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())
    loss = model(IDS).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(model.get_parameter(n).grad is not None for n in trainable if "lora_B" in n)


def test_adapter_loads_in_peft_with_equal_logits(base_dir, tmp_path):
    model = _base(base_dir)
    base_logits = model(IDS)
    cfg = LoraConfig(r=4, alpha=8, dropout=0.1)
    apply_lora(model, cfg)
    _randomize_b(model)
    model.eval()
    ours = model(IDS)
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter changes the output
    save_adapter(model, cfg, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM" and raw["r"] == 4
    assert raw["lora_alpha"] == 8 and raw["base_model_name_or_path"] == str(base_dir)
    theirs = _peft_model(base_dir, tmp_path / "adapter")
    with torch.no_grad():
        delta = (theirs(IDS).logits - ours).abs().max().item()
    assert delta < 1e-4
    # peft's own key names for the same targets
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_keys = set(peft.get_peft_model_state_dict(peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL), task_type="CAUSAL_LM"))))
    assert set(lora_state_dict(model)) == peft_keys


def test_peft_adapter_loads_in_qwen25(base_dir, tmp_path):
    """The other direction: an adapter peft trained (here: randomised) on a subset of modules, with rsLoRA."""
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 use_rslora=True, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    pm.save_pretrained(tmp_path / "peft-adapter")
    with torch.no_grad():
        theirs = pm.eval()(IDS).logits
    model = _base(base_dir)
    cfg = load_adapter(model, tmp_path / "peft-adapter")
    assert cfg.r == 8 and cfg.use_rslora and set(cfg.target_modules) == {"q_proj", "v_proj", "down_proj"}
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 6
    assert (model.eval()(IDS) - theirs).abs().max() < 1e-4


def test_merge_and_load_round_trip(base_dir, tmp_path):
    model = _base(base_dir)
    cfg = LoraConfig(r=2, alpha=5, dropout=0.0, target_modules=("q_proj", "o_proj", "up_proj"))
    apply_lora(model, cfg)
    _randomize_b(model)
    unmerged = model(IDS)
    save_adapter(model, cfg, tmp_path / "a", "base")
    saved = lora_state_dict(model)

    fresh = _base(base_dir)
    loaded = load_adapter(fresh, tmp_path / "a")
    assert loaded == cfg
    for key, tensor in lora_state_dict(fresh).items():
        torch.testing.assert_close(tensor, saved[key], rtol=0, atol=0)
    torch.testing.assert_close(fresh(IDS), unmerged, rtol=0, atol=0)

    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert (model(IDS) - unmerged).abs().max() < 1e-5
    assert set(model.state_dict()) == set(_base(base_dir).state_dict())  # plain names again


def test_resume_into_model_that_has_lora(base_dir, tmp_path):
    """load_adapter on a model that already has LoRA layers (a resumed run) copies the weights in."""
    model = _base(base_dir)
    cfg = LoraConfig(r=4, alpha=8)
    apply_lora(model, cfg)
    _randomize_b(model, seed=5)
    save_adapter(model, cfg, tmp_path / "a", "base")
    other = _base(base_dir)
    apply_lora(other, cfg)
    load_adapter(other, tmp_path / "a")
    theirs, ours = lora_state_dict(other), lora_state_dict(model)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert all(p.requires_grad for n, p in other.named_parameters() if "lora_" in n)


def test_bad_adapters_are_refused(base_dir, tmp_path):
    model = _base(base_dir)
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter directory"):
        load_adapter(model, tmp_path)
    # an adapter made for a deeper/wider model
    torch.manual_seed(0)
    big = transformers.Qwen2Config(vocab_size=320, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.Qwen2ForCausalLM(big).save_pretrained(tmp_path / "big")
    other = _base(tmp_path / "big")
    apply_lora(other, LoraConfig(r=4))
    save_adapter(other, LoraConfig(r=4), tmp_path / "big-adapter", "big")
    with pytest.raises(ValueError, match="adapter for another base model"):
        load_adapter(_base(base_dir), tmp_path / "big-adapter")
    raw = json.loads((tmp_path / "big-adapter" / "adapter_config.json").read_text())
    raw["use_dora"] = True
    (tmp_path / "big-adapter" / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="DoRA"):
        read_adapter_config(tmp_path / "big-adapter")
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(other, LoraConfig(r=4))
    with pytest.raises(ValueError, match="target_modules"):
        LoraConfig(target_modules=("lm_head",))


def test_fused_or_quantized_models_are_refused():
    from qwen25.config import ModelConfig
    from qwen25.model.init import model_from_config
    from qwen25.weights.quantized import quantize_loaded_model

    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="quantization='none'"):
        apply_lora(quantize_loaded_model(model_from_config(config, seed=0)), LoraConfig())


# --- serving an adapter -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_adapter(tiny_hf_dir, tmp_path_factory):
    model = _base(tiny_hf_dir)
    cfg = LoraConfig(r=4, alpha=16, dropout=0.0)
    apply_lora(model, cfg)
    _randomize_b(model, seed=7)
    path = tmp_path_factory.mktemp("tiny-adapter")
    save_adapter(model, cfg, path, str(tiny_hf_dir))
    return path


def test_llm_with_lora_generates_like_peft(tiny_hf_dir, tiny_adapter):
    from qwen25 import LLM, SamplingParams

    llm = LLM(str(tiny_hf_dir), lora=str(tiny_adapter))
    assert llm.quantization == "none" and llm.lora == str(tiny_adapter)
    prompt = "def fibonacci(n):"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]

    merged = _peft_model(tiny_hf_dir, tiny_adapter).merge_and_unload()
    ids = torch.tensor([llm.tokenizer.encode(prompt)])
    with torch.no_grad():
        ref = merged.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=151643,
                              repetition_penalty=1.0)[0, ids.shape[1]:]
    assert out.token_ids == ref.tolist()
    base = LLM(str(tiny_hf_dir)).generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert base[0].outputs[0].token_ids != out.token_ids  # the adapter is what changed the text


def test_load_merged_quantizes_the_merged_weights(tiny_hf_dir, tiny_adapter):
    fp32 = load_merged(tiny_hf_dir, tiny_adapter)
    q8 = load_merged(tiny_hf_dir, tiny_adapter, quantization="q8")
    assert q8.quantization == "q8" and fp32.quantization is None
    ids = torch.tensor([[9707, 11, 1879, 0, 358, 1079]])
    a, b = fp32.model(ids), q8.model(ids)
    # Q8_0 weights, and 8-bit activation blocks (each 32-wide row of this tiny model is one block): measured 5.3%
    assert (a - b).abs().max() < 0.08 * a.abs().max()
    from qwen25.weights.quantized import quantize_loaded_model

    assert torch.equal(quantize_loaded_model(fp32.model, 8)(ids), b)  # exactly the merged weights, quantized
    assert load_merged(tiny_hf_dir, tiny_adapter, dtype=torch.bfloat16).model.lm_head.weight.dtype == torch.bfloat16


def test_cli_lora_flag(tiny_hf_dir, tiny_adapter, capsys):
    from qwen25.cli import main

    assert main(["generate", "--model", str(tiny_hf_dir), "--lora", str(tiny_adapter), "--prompt", "hi",
                 "--temperature", "0", "--max-tokens", "3"]) == 0
    assert main(["chat", "--model", str(tiny_hf_dir), "--lora", str(tiny_hf_dir), "--prompt", "hi"]) == 1
    assert "not a LoRA adapter directory" in capsys.readouterr().err


def test_mask_dropout_is_dropout_with_a_one_byte_mask():
    from qwen25.train.lora import MaskDropout

    torch.manual_seed(0)
    x = torch.randn(64, 512, requires_grad=True)
    drop = MaskDropout(0.25)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # the drop rate
    torch.testing.assert_close(y[kept], x[kept] / 0.75)  # survivors scaled by 1 / (1 - p), as nn.Dropout
    assert [t.dtype for t in y.grad_fn.saved_tensors] == [torch.bool]  # all that backward keeps
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() / 0.75)  # the gradient flows through the same mask
    drop.eval()
    assert drop(x) is x
