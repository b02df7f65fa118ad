"""Long context through the faces: `--rope-scaling`, `--dual-chunk-attention` and `--max-model-len` on generate,
chat, serve and eval reach the model and the engine (`resolve_long_context` turns the flags into the config);
bad values are one-line errors naming the field, before the model loads where they can be; a prompt beyond
max_model_len is refused with both counts (HTTP 400 on the server, which keeps serving)."""

from __future__ import annotations

import pytest
import torch

from qwen25.config import ModelConfig
from qwen25.engine.engine import LLMEngine
from qwen25.engine.errors import ContextLengthError
from qwen25.model.dca import DualChunkAttention
from qwen25.model.long_context import DynamicYarnAttention, resolve_long_context
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.sampling_params import SamplingParams

YARN = '{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}'


def config() -> ModelConfig:
    return ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def test_flag_texts_set_keep_and_remove_the_settings():
    c = resolve_long_context(config(), YARN, "on")
    assert c.rope_scaling["factor"] == 4.0 and c.max_position_embeddings == 128  # factor x native window
    assert c.dual_chunk_attention_config == {"chunk_size": 32, "local_size": 1, "original_max_position_embeddings": 32}
    assert resolve_long_context(c) == c  # None keeps the checkpoint's
    plain = resolve_long_context(c, "none", "off")
    assert plain.rope_scaling is None and plain.dual_chunk_attention_config is None
    assert plain.max_position_embeddings == 32  # back to the native window
    dynamic = resolve_long_context(config(), {"rope_type": "yarn", "factor": 2.0,
                                              "original_max_position_embeddings": 32, "dynamic": True})
    assert dynamic.max_position_embeddings == 64
    assert isinstance(Qwen2ForCausalLM(dynamic).model.attention, DynamicYarnAttention)


@pytest.mark.parametrize("rope,dca,message", [
    ("{bad", None, "--rope-scaling: not valid JSON"),
    ('{"rope_type": "yarn", "factor": 4.0}', None, "missing field 'original_max_position_embeddings'"),
    ('{"rope_type": "linear", "factor": 4.0}', None, "rope_type 'linear' is not supported"),
    ('{"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 32}', None, "'factor' must be"),
    (None, '{"chunk_size": 64, "local_size": 4}', "exceeds the positions this model takes"),
    (None, '{"chunk_size": 16}', "missing field 'local_size'"),
    (None, "[1]", "must be a JSON object"),
    ('{"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "dynamic": true}', "on",
     "cannot be combined with dynamic YaRN"),
])
def test_bad_settings_name_the_field(rope, dca, message):
    with pytest.raises(ValueError, match=message):
        resolve_long_context(config(), rope, dca)


def test_engine_refuses_a_max_model_len_beyond_the_model():
    model = Qwen2ForCausalLM(config()).eval()
    with pytest.raises(ValueError, match=r"max_model_len=33 must be in \[2, 32\]"):
        LLMEngine(model, None, num_blocks=8, max_model_len=33)


# --- the faces, on a tiny checkpoint with the real tokenizer ------------------------------------------------------
def long_words(n: int) -> str:
    """n tokens of text for the Qwen tokenizer (each word is one token)."""
    return " ".join(["cat", "sat", "on", "the", "mat"] * (n // 5) + ["cat"] * (n % 5))


@pytest.mark.real_model
def test_cli_flags_reach_the_model_and_the_engine(tiny_hf_dir):
    from qwen25.cli import GenerateConfig

    window = 96  # tiny_hf_dir's max_position_embeddings
    rope = f'{{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": {window}}}'
    llm = GenerateConfig(model=str(tiny_hf_dir), rope_scaling=rope, dual_chunk_attention="on",
                         max_model_len=300).load()
    assert llm.config.rope_scaling["factor"] == 4.0 and llm.config.max_position_embeddings == 4 * window
    assert llm.checkpoint.config is llm.config and isinstance(llm.model.model.attention, DualChunkAttention)
    assert llm.engine.max_model_len == 300
    ids = llm.tokenizer.encode(long_words(150))
    assert window < len(ids) < 300  # past the native window and DCA's plain length: DCA on the paged cache
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    ref = list(ids)
    with torch.no_grad():
        for _ in range(3):
            ref.append(int(llm.model(torch.tensor([ref]))[0, -1].argmax()))
    assert out.outputs[0].token_ids == ref[len(ids):]
    too_long = llm.tokenizer.encode(long_words(400))
    with pytest.raises(ContextLengthError, match=rf"prompt has {len(too_long)} tokens; .* 300 tokens"):
        llm.generate([too_long])


@pytest.mark.real_model
@pytest.mark.parametrize("flags,message", [
    (["--rope-scaling", "{bad"], "--rope-scaling: not valid JSON"),
    (["--rope-scaling", '{"type": "yarn", "factor": 4}'], "missing field 'original_max_position_embeddings'"),
    (["--max-model-len", "1"], "--max-model-len must be >= 2"),
    (["--max-model-len", "500"], "max_model_len=500 must be in [2, 96]"),
    (["--dual-chunk-attention", '{"chunk_size": 4096, "local_size": 64}'], "exceeds the positions this model"),
])
def test_bad_flags_are_one_line_errors(tiny_hf_dir, capsys, flags, message):
    from qwen25.cli import main

    for command in (["generate", "--prompt", "hi"], ["chat", "--prompt", "hi"]):
        rc = main([command[0], "-m", str(tiny_hf_dir), *flags, *command[1:], "--max-tokens", "2"])
        err = capsys.readouterr().err
        assert rc != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert message in err, err


@pytest.mark.real_model
def test_generate_runs_past_the_native_window_with_yarn_and_dca(tiny_hf_dir, capsys):
    from qwen25.cli import main

    rope = '{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 96}'
    rc = main(["generate", "-m", str(tiny_hf_dir), "--rope-scaling", rope, "--dual-chunk-attention", "on",
               "--prompt", long_words(150), "--max-tokens", "2", "--temperature", "0"])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.real_model
def test_eval_passes_the_flags_to_the_qwen25_backend_only(tiny_hf_dir, monkeypatch, tmp_path):
    from qwen25.eval import backends
    from qwen25.eval.cli import PerplexityConfig, main

    seen = {}

    def fake_make_backend(name, model, **kwargs):  # noqa: ANN001, ANN003
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(backends, "make_backend", fake_make_backend)
    cfg = PerplexityConfig(model=str(tiny_hf_dir), rope_scaling=YARN, max_model_len=64, no_progress=True,
                           output=str(tmp_path / "results.jsonl"))
    with pytest.raises(RuntimeError, match="stop here"):
        main(cfg)
    assert seen["llm_kwargs"] == {"quantization": "auto", "engine_kwargs": {"max_model_len": 64}, "rope_scaling": YARN}
    with pytest.raises(ValueError, match="apply to --backend qwen25"):
        main(PerplexityConfig(model=str(tiny_hf_dir), backend="llamacpp", rope_scaling=YARN))


@pytest.mark.real_model
def test_server_refuses_a_prompt_beyond_max_model_len_with_both_counts_and_keeps_serving(tiny_hf_dir):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from qwen25.checkpoint import load
    from qwen25.model.long_context import set_long_context
    from qwen25.server.app import create_app_from_checkpoint

    checkpoint = load(tiny_hf_dir)
    checkpoint.config = set_long_context(checkpoint.model, YARN.replace("32", "96"), "on")
    app = create_app_from_checkpoint(checkpoint, served_model_name="tiny", max_model_len=200)
    with TestClient(app) as client:
        long_ids = list(range(1000, 1250))
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": long_ids, "max_tokens": 2})
        assert r.status_code == 400 and "250" in r.text and "200" in r.text, r.text
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": list(range(1000, 1150)), "max_tokens": 2,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 150
