"""YaRN: inverse frequencies, attention factor and logits equal transformers' (static YaRN, tiny random models saved
by transformers and loaded through qwen25's own loader, at positions beyond original_max_position_embeddings);
dynamic YaRN equals plain RoPE inside the native window (bit for bit) and static YaRN beyond it, with the cached
keys re-rotated when a sequence crosses the window; the native forward takes static YaRN only."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from qwen25.config import ModelConfig  # noqa: E402
from qwen25.engine.kv_cache import ContiguousKVCache  # noqa: E402
from qwen25.kernels.native import NativeForward  # noqa: E402
from qwen25.model.attention import UnrotatedKVCache, sdpa_attention  # noqa: E402
from qwen25.model.long_context import DynamicYarnAttention, attention_for_config, plain_attention_limit  # noqa: E402
from qwen25.model.rope import rope_inv_freq  # noqa: E402
from qwen25.weights.loader import model_from_state_dict  # noqa: E402
from qwen25.weights.safetensors import load_safetensors  # noqa: E402

from tiny_models import unit_scale_  # noqa: E402

WINDOW = 32  # original_max_position_embeddings of the tiny models: sequences of 33+ tokens are "long"
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": WINDOW}

YARN_CASES = [
    (64, 1e6, 131072, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),  # Qwen2.5 docs
    (128, 1e6, 32768, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    (16, 1e6, 128, YARN),
    (64, 1e4, 32768, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16,
                      "beta_slow": 2, "truncate": False, "mscale": 1.0, "mscale_all_dim": 0.5}),
    (64, 1e7, 2500, {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 1000,
                     "attention_factor": 1.3}),
]


@pytest.mark.parametrize("head_dim,theta,max_pos,scaling", YARN_CASES)
def test_inv_freq_and_attention_factor_equal_transformers(head_dim, theta, max_pos, scaling):
    hf = transformers.Qwen2Config(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=max_pos,
                                  rope_parameters=dict(scaling, rope_theta=theta))
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    inv, factor = rope_inv_freq(head_dim, theta, scaling)
    assert inv.dtype == torch.float32
    assert torch.equal(inv, ref_inv.float())  # bit for bit
    assert factor == ref_factor


def test_the_ramp_uses_original_max_position_embeddings_not_max_position_embeddings():
    a, _ = rope_inv_freq(64, 1e6, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    b, _ = rope_inv_freq(64, 1e6, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 131072})
    assert not torch.equal(a, b)  # the window moves the ramp; max_position_embeddings is not an input at all
    default, one = rope_inv_freq(64, 1e6)
    assert one == 1.0 and torch.equal(a[:4], default[:4]) and torch.allclose(a[-4:], default[-4:] / 4)


def _tiny_hf(tmp_path, rope_scaling, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4 * WINDOW, rms_norm_eps=1e-6, rope_theta=10_000.0,
        tie_word_embeddings=False, rope_scaling=rope_scaling)
    hf = unit_scale_(transformers.Qwen2ForCausalLM(cfg).eval(), norms=True)  # logits of order 1
    path = tmp_path / "hf"
    hf.save_pretrained(path, safe_serialization=True)
    return hf, path


def _load(path, **changes):
    config = ModelConfig.from_json_file(path / "config.json").replace(**changes)
    return model_from_state_dict(config, load_safetensors(path, dtype=torch.float32), str(path))


def test_static_yarn_logits_equal_transformers_beyond_the_window(tmp_path):
    hf, path = _tiny_hf(tmp_path, dict(YARN))
    ours = _load(path)
    assert ours.config.rope_scaling["factor"] == 4.0 and attention_for_config(ours.config) is sdpa_attention
    ids = torch.randint(0, 384, (2, 3 * WINDOW + 5))  # positions up to 100 > 32
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    delta = (got - ref).abs().max().item()
    print(f"static YaRN vs transformers: max |logit delta| {delta:.2e} over {ids.shape[1]} positions")
    assert delta < 1e-5
    # ...and the scaling is in effect: the same weights without YaRN give other logits.
    with torch.no_grad():
        plain = _load(path, rope_scaling=None)(ids)
    assert (plain - ref).abs().max().item() > 1e-2


def test_legacy_rope_scaling_config_json_loads(tmp_path):
    """A config.json as Qwen's docs tell users to edit it (`rope_scaling` with `type`) gives the same model."""
    _, path = _tiny_hf(tmp_path, dict(YARN))
    data = json.loads((path / "config.json").read_text())
    data.pop("rope_parameters")
    data["rope_theta"] = 10_000.0
    data["rope_scaling"] = {"factor": 4.0, "original_max_position_embeddings": WINDOW, "type": "yarn"}
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps(data))
    a, b = ModelConfig.from_json_file(path / "config.json"), ModelConfig.from_json_file(legacy)
    (inv_a, factor_a), (inv_b, factor_b) = (rope_inv_freq(16, c.rope_theta, c.rope_scaling) for c in (a, b))
    assert torch.equal(inv_a, inv_b) and factor_a == factor_b > 1


# --- dynamic YaRN --------------------------------------------------------------------------------------------
def _three_models(tmp_path, layers=2):
    """The same weights as plain RoPE, static YaRN and dynamic YaRN."""
    _, path = _tiny_hf(tmp_path, None, layers=layers)
    return (_load(path), _load(path, rope_scaling=dict(YARN)), _load(path, rope_scaling=dict(YARN, dynamic=True)))


def test_dynamic_equals_plain_inside_the_window_and_static_beyond(tmp_path):
    plain, static, dynamic = _three_models(tmp_path)
    assert isinstance(attention_for_config(dynamic.config), DynamicYarnAttention)
    short, long = torch.randint(0, 384, (2, WINDOW)), torch.randint(0, 384, (2, 2 * WINDOW + 7))
    with torch.no_grad():
        assert torch.equal(dynamic(short), plain(short))  # bit for bit
        assert not torch.allclose(static(short), plain(short), atol=1e-3)  # what static YaRN costs short prompts
        torch.testing.assert_close(dynamic(long), static(long), atol=1e-6, rtol=0)
        # On a cache of unrotated keys: prefill + decode inside the window is still bit-exact plain RoPE.
        cache, ref_cache = UnrotatedKVCache(dynamic.config, 2, WINDOW), ContiguousKVCache(plain.config, 2, WINDOW)
        got = [dynamic(short[:, :20], cache=cache)] + [dynamic(short[:, t:t + 1], cache=cache) for t in range(20, WINDOW)]
        ref = [plain(short[:, :20], cache=ref_cache)] + [plain(short[:, t:t + 1], cache=ref_cache)
                                                         for t in range(20, WINDOW)]
    assert torch.equal(torch.cat(got, 1), torch.cat(ref, 1))


def test_crossing_the_window_re_rotates_the_cached_keys(tmp_path):
    """One layer, so cached keys/values depend on the tokens only: decode steps past the window on the cache of
    unrotated keys equal a one-pass static-YaRN forward at those positions (every cached key rotated with the
    YaRN frequencies), and the steps inside the window equal plain RoPE."""
    plain, static, dynamic = _three_models(tmp_path, layers=1)
    ids = torch.randint(0, 384, (1, WINDOW + 12))
    with torch.no_grad():
        cache = UnrotatedKVCache(dynamic.config, 1, WINDOW + 12)
        steps = [dynamic(ids[:, :WINDOW - 4], cache=cache)]
        steps += [dynamic(ids[:, t:t + 1], cache=cache) for t in range(WINDOW - 4, WINDOW + 12)]
        got = torch.cat(steps, dim=1)
        ref_long, ref_short = static(ids), plain(ids)
    torch.testing.assert_close(got[:, :WINDOW], ref_short[:, :WINDOW], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, WINDOW:], ref_long[:, WINDOW:], atol=1e-5, rtol=0)
    # A cache of rotated keys cannot follow: refused at the crossing, not silently wrong.
    with torch.no_grad():
        rotated = ContiguousKVCache(dynamic.config, 1, WINDOW + 12)
        dynamic(ids[:, :WINDOW], cache=rotated)
        with pytest.raises(NotImplementedError, match="native window of 32 tokens"):
            dynamic(ids[:, WINDOW:WINDOW + 1], cache=rotated)
    assert plain_attention_limit(dynamic.config) == WINDOW and plain_attention_limit(static.config) is None


def test_dynamic_regime_is_per_row(tmp_path):
    """A batch with one short and one long row: each row as it would run alone."""
    _, _, dynamic = _three_models(tmp_path)
    a, b = torch.randint(0, 384, (1, 2 * WINDOW)), torch.randint(0, 384, (1, WINDOW - 6))
    pad = a.shape[1] - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], dim=1)])
    mask = torch.ones(ids.shape, dtype=torch.bool)
    mask[1, :pad] = False
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = dynamic(ids, positions=positions, padding_mask=mask)
        alone_a, alone_b = dynamic(a), dynamic(b)
    torch.testing.assert_close(batched[0], alone_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1, pad:], alone_b[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("scaling,native", [(dict(YARN), True), (dict(YARN, dynamic=True), False)])
def test_native_forward_takes_static_yarn_only(scaling, native):
    """Static YaRN runs natively (test_native_forward.py checks its logits); dynamic YaRN rotates keys at
    attention time and stays on the PyTorch path."""
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_scaling=scaling)
    plain = config.replace(rope_scaling=None)
    assert NativeForward.supports(SimpleNamespace(config=plain), plain, "causal", torch.float32)
    assert NativeForward.supports(SimpleNamespace(config=config), config, "causal", torch.float32) == native


def test_static_yarn_on_the_paged_engine_equals_full_forward_greedy(tmp_path):
    """The engine's PyTorch path caches keys rotated with the YaRN frequencies: greedy tokens past the window equal
    a greedy loop of full forwards; `set_long_context` switches a loaded plain model to YaRN."""
    from qwen25.engine.engine import LLMEngine
    from qwen25.model.long_context import set_long_context
    from qwen25.sampling_params import SamplingParams

    _, path = _tiny_hf(tmp_path, None)
    model = _load(path)
    config = set_long_context(model, rope_scaling=dict(YARN))
    assert config.max_position_embeddings == 4 * WINDOW and model.model.rope_scale > 1
    prompt = torch.randint(0, 384, (WINDOW - 4,)).tolist()
    tokenizer = SimpleNamespace(special_ids=frozenset(), token_bytes=lambda t: b"x", decode=lambda ids: "x" * len(ids))
    out = LLMEngine(model, tokenizer, block_size=8, num_blocks=32).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=12))[0].token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]
