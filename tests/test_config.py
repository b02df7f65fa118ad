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


# --- long context: rope_scaling and dual_chunk_attention_config --------------------------------------------
# Qwen/Qwen2.5-7B-Instruct-1M's config.json as the checkpoint carries it (SPEC §1.3).
CONFIG_7B_1M = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 1010000, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-05, "rope_theta": 10000000.0,
    "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
    "dual_chunk_attention_config": {"chunk_size": 262144, "local_size": 8192,
                                    "original_max_position_embeddings": 262144},
}


def test_a_1m_checkpoint_config_loads_as_it_is(tmp_path):
    from qwen25.model.dca import DualChunkAttention

    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG_7B_1M))
    config = ModelConfig.from_json_file(path)
    assert config.dual_chunk_attention_config == CONFIG_7B_1M["dual_chunk_attention_config"]
    assert config.rope_scaling is None and config.max_position_embeddings == 1010000
    assert config == preset("qwen2.5-7b-instruct-1m").replace(max_window_layers=28, sliding_window=32768)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    assert isinstance(model.model.attention, DualChunkAttention) and model.model.attention.plain_length == 262144
    back = ModelConfig.from_dict(config.to_dict())  # round trip keeps the DCA config
    assert back.dual_chunk_attention_config == config.dual_chunk_attention_config and back.head_dim == 128


@pytest.mark.parametrize("scaling,message", [
    ({"factor": 4.0, "original_max_position_embeddings": 32768}, "missing field 'rope_type'"),
    ({"type": "yarn", "original_max_position_embeddings": 32768}, "missing field 'factor'"),
    ({"type": "yarn", "factor": 4.0}, "missing field 'original_max_position_embeddings'"),
    ({"type": "yarn", "factor": "4", "original_max_position_embeddings": 32768}, "'factor' must be a number >= 1"),
    ({"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 32768}, "'factor' must be a number >= 1"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}, "'original_max_position_embeddings' must"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "beta_fats": 32}, "unknown field 'beta_fats'"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "beta_fast": 1, "beta_slow": 8},
     "'beta_fast' .* must not be below 'beta_slow'"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "dynamic": "yes"}, "'dynamic' must be"),
    ({"rope_type": "yarn", "type": "linear", "factor": 4.0}, "disagree"),
    ({"type": "linear", "factor": 4.0}, "rope_type 'linear' is not supported"),
    ("yarn", "must be a JSON object"),
])
def test_bad_rope_scaling_is_named(scaling, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(rope_scaling=scaling)
    if isinstance(scaling, dict):
        from qwen25.config import parse_rope_scaling

        with pytest.raises(ValueError, match=message):
            parse_rope_scaling(json.dumps(scaling))


def test_bad_dual_chunk_attention_config_is_named():
    ok = {"chunk_size": 16384, "local_size": 1024, "original_max_position_embeddings": 16384}
    ModelConfig(dual_chunk_attention_config=ok)  # a 32K model takes a 16K chunk
    cases = [
        ({"local_size": 1024}, "missing field 'chunk_size'"),
        ({**ok, "local_size": 16384}, "'chunk_size' \\(16384\\) must be larger than 'local_size'"),
        ({**ok, "chunk_size": -1}, "'chunk_size' must be a non-negative integer"),
        ({**ok, "chunk": 3}, "unknown field 'chunk'"),
        ({**ok, "original_max_position_embeddings": 1.5}, "'original_max_position_embeddings' must"),
    ]
    for dca, message in cases:
        with pytest.raises(ValueError, match=message):
            ModelConfig(dual_chunk_attention_config=dca)
    # Models that cannot take it: the 1M checkpoints' chunks on a 32K model, DCA with dynamic YaRN.
    with pytest.raises(ValueError, match="'chunk_size' \\(262144\\) exceeds the positions this model takes"):
        preset("qwen2.5-0.5b-instruct").replace(dual_chunk_attention_config=dict(CONFIG_7B_1M["dual_chunk_attention_config"]))
    dynamic = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "dynamic": True}
    with pytest.raises(ValueError, match="cannot be combined with dynamic YaRN"):
        ModelConfig(rope_scaling=dynamic, dual_chunk_attention_config=ok)
    # With YaRN the model takes factor x original positions: a 128K chunk fits a 32K model scaled by 4.
    yarn = {k: v for k, v in dynamic.items() if k != "dynamic"}
    ModelConfig(rope_scaling=yarn, dual_chunk_attention_config={**ok, "chunk_size": 131072})


def test_long_context_flags():
    from qwen25.config import parse_dual_chunk_attention, parse_rope_scaling

    base = preset("qwen2.5-7b-instruct")
    scaling = parse_rope_scaling('{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":32768}')
    longer = base.with_long_context(rope_scaling=scaling)
    assert longer.rope_scaling == scaling and longer.max_position_embeddings == 131072
    assert parse_rope_scaling("none") is None
    with pytest.raises(ValueError, match="--rope-scaling: not valid JSON"):
        parse_rope_scaling("{yarn")
    assert parse_dual_chunk_attention("off", base) is None
    assert parse_dual_chunk_attention("on", base) == {"chunk_size": 32768, "local_size": 1024,
                                                      "original_max_position_embeddings": 32768}
    assert parse_dual_chunk_attention("on", longer)["chunk_size"] == 32768  # the native window, not 128K
    dca = parse_dual_chunk_attention('{"chunk_size": 16384, "local_size": 512}', base)
    assert base.with_long_context(dual_chunk_attention_config=dca).dual_chunk_attention_config == dca
    with pytest.raises(ValueError, match="exceeds the positions this model takes"):
        parse_dual_chunk_attention('{"chunk_size": 65536, "local_size": 512}', base)
