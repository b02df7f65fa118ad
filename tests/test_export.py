"""Export (qwen25.weights.save / gguf_writer / export, `qwen25 export`): HF directories that transformers loads with
qwen25's logits and token ids, GGUF files that qwen25's reader, the `gguf` package and llama.cpp read, atomic
outputs, one-line errors. Fast tests use the tiny HF directory; the real 0.5B runs are slow tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen25.checkpoint import load
from qwen25.cli import main
from qwen25.weights.export import export_model
from qwen25.weights.block_quant import quantize_q8_0
from qwen25.weights.gguf_writer import gguf_tensor_name
from qwen25.weights.save import parse_size, save_hf_directory

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[9707, 11, 1879, 0, 358, 1079, 151645, 42, 151644, 872, 198]])
TEXT = "Hello, 世界! <|im_start|>user\n12345 <tool_call>{\"a\": 1}</tool_call>  \t\n  def f(x):\n\treturn x**2 # ñ 🎉"


@pytest.fixture(scope="module")
def source(tiny_hf_dir):
    return load(tiny_hf_dir)


@pytest.fixture(scope="module")
def ref_logits(source):
    return source.model(IDS)


def _hf_logits(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


# --- HF directories ------------------------------------------------------------------------------------------
def test_hf_export_loads_in_transformers_with_same_logits_and_ids(tiny_hf_dir, tmp_path, source, ref_logits, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(tiny_hf_dir), "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["torch_dtype"] == "float32" and config["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    assert (_hf_logits(out) - ref_logits).abs().max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(TEXT)["input_ids"] == source.tokenizer.encode(TEXT)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False) == \
        source.tokenizer.encode(_render(source, messages))
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643] and generation["top_k"] == 20
    again = load(out)  # and qwen25 itself, with the same sampling defaults
    # An fp32 export is lossless: every weight bit-identical. Same weights, same code, same thread count (the
    # `qwen25` command puts the caller's back: qwen25.runtime.restored_runtime) -> the same logits bit for bit.
    # MKL's GEMM rounds differently at another thread count or with a misaligned activation, never with where the
    # weights lie (both models are zero-copy views of their files): measured on every 4-byte offset.
    weights = again.model.state_dict()
    assert all(torch.equal(weights[name], t) for name, t in source.model.state_dict().items())
    assert torch.equal(again.model(IDS), ref_logits)
    assert again.generation_defaults == source.generation_defaults


def _render(checkpoint, messages):
    from qwen25.chat import render_chat

    return render_chat(checkpoint.tokenizer.chat_template, messages, add_generation_prompt=True)


def test_untied_sharded_bf16_directory(tmp_path):
    from qwen25.config import ModelConfig
    from qwen25.model.init import model_from_config

    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = model_from_config(config, seed=0).eval()
    out = save_hf_directory(model, tmp_path / "m", max_shard_size="100KB", dtype="bf16",
                            generation_config={"do_sample": False, "eos_token_id": 151643})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "lm_head.weight" in index["weight_map"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from qwen25.weights.loader import load_weights

    ours = load_weights(out).model
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 512, (1, 12))
    expected = model.to(torch.bfloat16).float()(ids)  # the rounding bf16 storage implies
    assert (ours(ids) - expected).abs().max() < 1e-5
    assert (_hf_logits_for(out, ids) - expected).abs().max() < 1e-4


def _hf_logits_for(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


# --- GGUF files ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_export_reads_back_in_qwen25_and_gguf(tiny_hf_dir, tmp_path, source, ref_logits, dtype):
    out = tmp_path / f"tiny-{dtype}.gguf"
    assert main(["export", str(tiny_hf_dir), "--output", str(out), "--dtype", dtype]) == 0
    back = load(out)
    delta = (back.model(IDS) - ref_logits).abs().max().item()
    bound = {"f32": 0.0, "f16": 2e-3, "q8_0": 2e-2}[dtype] * ref_logits.abs().max().item()
    assert delta <= bound, (dtype, delta)
    same = dict(torch_dtype="x", max_window_layers=None)  # neither is in a GGUF
    assert back.config.replace(**same) == source.config.replace(**same)
    assert back.tokenizer.encode(TEXT) == source.tokenizer.encode(TEXT)
    assert back.tokenizer.chat_template == source.tokenizer.chat_template

    from qwen25.weights.gguf import GGUFFile

    with GGUFFile(out) as g:
        kinds = {name: t.ggml_type.name for name, t in g.tensors.items()}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.1.attn_q.bias"] == "F32"
    assert kinds["blk.0.ffn_down.weight"] == dtype.upper() and "output.weight" not in kinds  # tied
    if dtype != "q8_0":
        return
    gguf = pytest.importorskip("gguf")  # the reference reader (slow on a 152k vocabulary: one file is enough)
    reader = gguf.GGUFReader(out)
    assert {t.name: t.tensor_type.name for t in reader.tensors} == kinds
    field = reader.fields["qwen2.block_count"]
    assert field.types == [gguf.GGUFValueType.UINT32] and field.contents() == 2
    assert reader.fields["tokenizer.ggml.token_type"].types[-1] == gguf.GGUFValueType.INT32
    assert reader.fields["qwen2.rope.freq_base"].contents() == 1_000_000.0
    w = source.model.model.layers[1].mlp.up_proj.weight.detach().numpy()  # byte-identical to gguf's quantizer
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    expected = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), expected.view(np.uint8).reshape(-1))


def test_q8_0_matches_reference_quantizer_on_edge_values():
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (d = 0)
    x[1, :32] = np.linspace(-1, 1, 32) * 127 / 127  # exact halves after scaling
    x[2, 5] = 1e4
    expected = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).view(np.uint8).reshape(-1)
    assert np.array_equal(quantize_q8_0(x), expected)


def test_tensor_names_invert_the_readers_table():
    from qwen25.weights.gguf import hf_tensor_name

    for hf in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
               "model.layers.11.self_attn.k_proj.bias", "model.layers.0.mlp.down_proj.weight",
               "model.layers.3.post_attention_layernorm.weight"):
        assert hf_tensor_name(gguf_tensor_name(hf)) == hf
    with pytest.raises(ValueError, match="no GGUF name"):
        gguf_tensor_name("model.layers.0.self_attn.rotary.weight")


def test_tokenizer_metadata_from_hf_files_equals_llamacpp_converter(source, real_gguf):
    """The tiny directory's tokenizer (HF files) gives the vocabulary metadata llama.cpp's converter wrote for the
    real model: same tokens, the same token types (control / user-defined / unused padding), the same merges."""
    from qwen25.weights.gguf import GGUFFile
    from qwen25.weights.gguf_writer import tokenizer_metadata

    ours = tokenizer_metadata(source.tokenizer, source.config.vocab_size)
    with GGUFFile(real_gguf) as g:
        ref = g.metadata
        assert ours["tokenizer.ggml.tokens"] == ref["tokenizer.ggml.tokens"]
        assert ours["tokenizer.ggml.token_type"].value == ref["tokenizer.ggml.token_type"]
        assert ours["tokenizer.ggml.merges"] == ref["tokenizer.ggml.merges"]
        for key in ("bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token", "model", "pre"):
            assert ours[f"tokenizer.ggml.{key}"] == ref[f"tokenizer.ggml.{key}"], key
        assert ours["tokenizer.chat_template"] == ref["tokenizer.chat_template"]


def test_gguf_to_hf_round_trip_keeps_the_tokenizer(tiny_hf_dir, tmp_path, source, ref_logits):
    """A GGUF-sourced tokenizer (vocabulary from metadata) becomes HF files that AutoTokenizer loads."""
    gguf_path = tmp_path / "tiny.gguf"
    assert main(["export", str(tiny_hf_dir), "-o", str(gguf_path), "--dtype", "f32"]) == 0
    assert main(["export", str(gguf_path), "-o", str(tmp_path / "back")]) == 0
    assert (_hf_logits(tmp_path / "back") - ref_logits).abs().max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert tok(TEXT)["input_ids"] == source.tokenizer.encode(TEXT)


# --- LoRA merge --------------------------------------------------------------------------------------------
def test_export_merge_lora_equals_peft_merged(tiny_hf_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from qwen25.train.lora import LoraConfig, apply_lora, save_adapter

    model = load(tiny_hf_dir).model
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0)
    apply_lora(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    save_adapter(model, cfg, tmp_path / "adapter", str(tiny_hf_dir))
    out = tmp_path / "merged"
    assert main(["export", str(tiny_hf_dir), "--merge-lora", str(tmp_path / "adapter"), "-o", str(out)]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(IDS).logits
    assert (_hf_logits(out) - theirs).abs().max() < 1e-4
    # an adapter directory given as the checkpoint, and an adapter for another base, are one-line errors
    assert main(["export", str(tmp_path / "adapter"), "-o", str(tmp_path / "x")]) == 1
    assert "is a LoRA adapter, not a model; export its base with --merge-lora" in capsys.readouterr().err
    other = tmp_path / "other"
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=151936, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(other)
    load(tiny_hf_dir).tokenizer.save(other)
    capsys.readouterr()
    assert main(["export", str(other), "--merge-lora", str(tmp_path / "adapter"), "-o", str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qwen25: error:") and "adapter for another base model" in err and err.count("\n") == 1
    assert not (tmp_path / "y").exists()


# --- errors, atomic writes -------------------------------------------------------------------------------------
def _error(capsys, *argv):
    code = main(["export", *argv])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("qwen25: error:") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line_and_writes_nothing(tiny_hf_dir, tmp_path, capsys):
    assert "no such file or directory" in _error(capsys, str(tmp_path / "missing"), "-o", str(tmp_path / "o"))
    assert "cannot be written to GGUF" in _error(capsys, str(tiny_hf_dir), "-o", str(tmp_path / "m.gguf"),
                                                 "--dtype", "bf16")
    assert "cannot be written to HF" in _error(capsys, str(tiny_hf_dir), "-o", str(tmp_path / "m"), "--dtype", "q8_0")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert "already exists" in _error(capsys, str(tiny_hf_dir), "-o", str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert "not a LoRA adapter directory" in _error(capsys, str(tiny_hf_dir), "-o", str(tmp_path / "n"),
                                                    "--merge-lora", str(tmp_path))
    with pytest.raises(SystemExit) as e:  # argparse: unknown format
        main(["export", str(tiny_hf_dir), "-o", str(tmp_path / "z"), "--format", "onnx"])
    assert e.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_failed_write_leaves_nothing_and_keeps_the_old_output(source, tmp_path, monkeypatch):
    import qwen25.weights.export as export

    out = tmp_path / "model"
    export_model(source.model, out, "hf", tokenizer=source.tokenizer)
    before = sorted(p.name for p in out.iterdir())

    def crash(model, path, **kwargs):
        Path(path).mkdir()
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_hf_directory", crash)
    with pytest.raises(OSError, match="disk full"):
        export_model(source.model, out, "hf", tokenizer=source.tokenizer, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind
    assert sorted(p.name for p in out.iterdir()) == before
    monkeypatch.undo()
    export_model(source.model, out, "hf", tokenizer=source.tokenizer, dtype="f16", overwrite=True)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    for fragment in ("--merge-lora", "--format {hf,gguf}", "examples:", "q8_0", "--overwrite"):
        assert fragment in text


# --- the real 0.5B (slow) ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_hf_export(real_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "qwen-hf"
    assert main(["export", str(real_gguf), "-o", str(out)]) == 0
    return out


@pytest.mark.slow
@pytest.mark.real_model
def test_real_gguf_to_hf_matches_transformers(real_gguf, real_hf_export):
    ours = load(real_gguf)  # the dequantized fp32 reference path: the weights the export wrote
    ids = ours.tokenizer.encode(_render(ours, [{"role": "user", "content": "Write a Python function that adds."}]))
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        expected = ours.model(ids_t)
    del ours
    model = transformers.AutoModelForCausalLM.from_pretrained(real_hf_export, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(ids_t).logits
    assert (got - expected).abs().max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(real_hf_export)
    corpus = [TEXT, "import torch\n\nclass Net(torch.nn.Module):\n    pass\n", "Ünïcödé — 日本語のテキスト",
              "  \n\n\t x=1"]
    from qwen25.checkpoint import load_tokenizer

    real_tok = load_tokenizer(real_gguf)
    for text in corpus:
        assert tok(text)["input_ids"] == real_tok.encode(text)


@pytest.mark.slow
@pytest.mark.real_model
def test_real_gguf_export_keeps_tokenizer_metadata(real_gguf, tmp_path):
    """Written from qwen25's Tokenizer, the vocabulary metadata equals what llama.cpp's converter wrote."""
    from qwen25.weights.gguf import GGUFFile

    out = tmp_path / "real-q8.gguf"
    assert main(["export", str(real_gguf), "-o", str(out), "--dtype", "q8_0"]) == 0
    with GGUFFile(real_gguf) as a, GGUFFile(out) as b:
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                    "tokenizer.chat_template", "qwen2.context_length", "qwen2.rope.freq_base",
                    "qwen2.attention.layer_norm_rms_epsilon", "qwen2.attention.head_count_kv"):
            assert a.metadata[key] == b.metadata[key], key
        assert set(a.tensors) == set(b.tensors)


@pytest.mark.slow
@pytest.mark.real_model
def test_llamacpp_runs_the_export_with_qwen25s_greedy_text(real_hf_export, tmp_path):
    pytest.importorskip("llama_cpp")
    from qwen25 import LLM, SamplingParams
    from qwen25.eval.backends import LlamaCppBackend

    out = tmp_path / "real-f16.gguf"
    assert main(["export", str(real_hf_export), "-o", str(out), "--dtype", "f16"]) == 0
    ours = LLM(str(out), quantization="none")  # the file's f16 weights exactly, computed in fp32
    prompt = "<|im_start|>user\nWrite a Python function that returns the n-th Fibonacci number.<|im_end|>\n" \
             "<|im_start|>assistant\n"
    ids = ours.tokenizer.encode(prompt)
    stops = [ours.tokenizer.token_to_id("<|im_end|>")]
    mine = ours.generate([ids], SamplingParams(temperature=0, max_tokens=48, stop_token_ids=stops))[0].outputs[0]
    del ours
    [theirs] = LlamaCppBackend(str(out), n_ctx=512).generate([ids], 48, [], stops)
    assert theirs.text == mine.text and len(mine.token_ids) > 20
