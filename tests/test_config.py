"""ModelConfig presets: every Qwen2.5 checkpoint's shape, built on the meta device and counted against the
parameter counts derived from the official configs (SPEC §1.2), plus config.json round trips."""

from __future__ import annotations

import json

import pytest
import torch

from qwen25.config import PRESETS, ModelConfig, preset
from qwen25.model.qwen2 import Qwen2ForCausalLM

# SPEC §1.2 "Derived numbers": total and non-embedding parameters, in billions (3 decimals as published there).
SPEC_COUNTS = {
    "0.5b": (0.494, 0.358), "1.5b": (1.544, 1.310), "3b": (3.086, 2.775), "7b": (7.616, 6.526),
    "14b": (14.77, 13.21), "32b": (32.76, 31.21), "72b": (72.71, 70.22),
}


def _module_count(config: ModelConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, counted once
    embedding = model.model.embed_tokens.weight.numel()
    head = 0 if config.tie_word_embeddings else model.lm_head.weight.numel()
    return total, total - embedding - head


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta_and_counts_match(name):
    config = PRESETS[name]
    total, non_embedding = _module_count(config)
    assert total == config.num_parameters()
    assert non_embedding == config.num_parameters(include_embedding=False)
    size = next(s for s in SPEC_COUNTS if f"-{s}" in name)
    spec_total, spec_non_emb = SPEC_COUNTS[size]
    # SPEC gives 3-4 significant digits: agree to within its rounding.
    assert total / 1e9 == pytest.approx(spec_total, rel=5e-4)
    assert non_embedding / 1e9 == pytest.approx(spec_non_emb, rel=5e-4)


def test_base_and_instruct_deltas_follow_the_official_configs():
    assert preset("qwen2.5-0.5b") .head_dim == 64 and preset("qwen2.5-1.5b").head_dim == 128
    assert preset("qwen2.5-14b").rms_norm_eps == 1e-5 and preset("qwen2.5-14b-instruct").rms_norm_eps == 1e-6
    assert preset("qwen2.5-7b").max_position_embeddings == 131072
    assert preset("qwen2.5-7b-instruct").max_position_embeddings == 32768
    assert preset("qwen2.5-0.5b").max_position_embeddings == 32768  # 0.5B and 3B do not differ
    assert preset("qwen2.5-7b").eos_token_id == 151643 and preset("qwen2.5-7b-instruct").eos_token_id == 151645
    assert preset("qwen2.5-7b").vocab_size == 152064 and not preset("qwen2.5-7b").tie_word_embeddings
    assert preset("qwen2.5-math-7b").rope_theta == 10_000.0 and preset("qwen2.5-math-72b").rms_norm_eps == 1e-5
    assert preset("qwen2.5-coder-32b").rms_norm_eps == 1e-5 and preset("qwen2.5-coder-32b-instruct").rms_norm_eps == 1e-6
    one_m = preset("qwen2.5-14b-instruct-1m")
    assert one_m.rope_theta == 1e7 and one_m.max_position_embeddings == 1_010_000
    assert one_m.dual_chunk_attention_config["chunk_size"] == 262144
    with pytest.raises(KeyError, match="unknown preset"):
        preset("qwen2.5-9b")


def test_kv_bytes_per_token_matches_spec():
    # SPEC §1.2: bf16 K+V over all layers, in KiB.
    expected = {"0.5b": 12, "1.5b": 28, "3b": 36, "7b": 56, "14b": 192, "32b": 256, "72b": 320}
    for size, kib in expected.items():
        assert preset(f"qwen2.5-{size}-instruct").kv_bytes_per_token() == kib * 1024


def test_config_json_round_trip_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = preset("qwen2.5-7b-instruct")
    hf = transformers.Qwen2Config(**config.to_dict())
    hf.save_pretrained(tmp_path)
    back = ModelConfig.from_json_file(tmp_path / "config.json")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rope_theta", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
                  "max_position_embeddings", "head_dim"):
        assert getattr(back, field) == getattr(config, field), field


def test_bad_config_values_are_named(tmp_path):
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(num_attention_heads=14, num_key_value_heads=3)
    with pytest.raises(ValueError, match="unknown architecture 'llama'"):
        ModelConfig.from_dict({"model_type": "llama"})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json_file(bad)
    json.dumps(preset("qwen2.5-0.5b").to_dict())  # serialisable
