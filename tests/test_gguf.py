"""GGUF reader and dequantizers against the `gguf` package (the reference), on random blocks, on tiny files written
with `gguf.GGUFWriter`, on corrupted files, and on the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M file."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GQ
from gguf import quants as gq

from qwen25.weights import quants
from qwen25.weights.gguf import GGUFError, GGUFFile, _Reader, config_from_gguf, hf_tensor_name, load_gguf_state_dict
from qwen25.weights.quants import GGMLType, UnsupportedQuantError, dequantize

# Byte offsets of the fp16 fields (d, m, dmin) of each block, from ggml-common.h. Random bytes there could be
# inf/nan, which would make the comparison meaningless, so the tests write finite values.
F16_FIELDS: dict[GGMLType, tuple[int, ...]] = {
    GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2), GGMLType.Q8_0: (0,),
    GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
}
QUANTIZABLE_BY_GGUF = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.BF16]


def random_blocks(t: GGMLType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """(n_blocks, type_size) uint8 of random quants with finite scales; plain floats for F32/F16/BF16."""
    block, type_size = quants.BLOCK_SIZES[t]
    if t == GGMLType.F32:
        return rng.standard_normal((n_blocks, 1)).astype(np.float32).view(np.uint8)
    if t == GGMLType.F16:
        return rng.standard_normal((n_blocks, 1)).astype(np.float16).view(np.uint8)
    if t == GGMLType.BF16:
        top = rng.standard_normal((n_blocks, 1)).astype(np.float32).view(np.uint32) >> 16
        return top.astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for at in F16_FIELDS[t]:
        scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        raw[:, at:at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


# --- dequantizers ------------------------------------------------------------------------------------------
def test_type_table_matches_gguf() -> None:
    for t in GGMLType:
        assert GQ[t.name] == t.value, t
        assert quants.BLOCK_SIZES[t] == gguf.GGML_QUANT_SIZES[GQ(t.value)], t
    wanted = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    assert {t.name for t in quants.SUPPORTED_TYPES} == wanted


@pytest.mark.parametrize("t", sorted(quants.SUPPORTED_TYPES), ids=lambda t: t.name)
def test_dequantize_random_blocks_matches_gguf(t: GGMLType) -> None:
    rng = np.random.default_rng(int(t))
    block, _ = quants.BLOCK_SIZES[t]
    n_blocks = 2 * quants._CHUNK_ELEMENTS // block + 24  # crosses chunk boundaries, ends in a partial chunk
    rows = random_blocks(t, n_blocks, rng).reshape(8, -1)  # 8 rows, each a whole number of blocks
    ref = gq.dequantize(rows, GQ(t.value))
    ours = dequantize(rows, t, ref.shape)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("t", QUANTIZABLE_BY_GGUF, ids=lambda t: t.name)
def test_dequantize_quantized_values(t: GGMLType) -> None:
    x = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    q = gq.quantize(x, GQ(t.value))
    ours = dequantize(q, t, x.shape)
    np.testing.assert_array_equal(ours, gq.dequantize(q, GQ(t.value)))
    assert np.sqrt(np.mean((ours - x) ** 2)) < 0.15  # and it is close to what was quantized (4-bit: ~0.1 rms)


def test_dequantize_rejects_bad_input() -> None:
    with pytest.raises(UnsupportedQuantError, match="IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), GGMLType.IQ2_XXS, (256,))
    with pytest.raises(UnsupportedQuantError, match="99"):
        dequantize(np.zeros(4, np.uint8), 99, (1,))
    with pytest.raises(ValueError, match="needs 34 bytes"):
        dequantize(np.zeros(33, np.uint8), GGMLType.Q8_0, (32,))
    with pytest.raises(ValueError, match="multiple"):
        dequantize(np.zeros(34, np.uint8), GGMLType.Q8_0, (2, 16))


# --- tiny files written with gguf.GGUFWriter --------------------------------------------------------------
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 256, 2, 4, 2, 256
TOKENS = [f"tok{i}" for i in range(VOCAB - 4)] + ["Ġhello", "你好", "🙂", "<|im_end|>"]
# one type per projection so every 32-block type and a k-quant go through the file path
LAYER_TYPES = {"attn_q": GGMLType.Q8_0, "attn_k": GGMLType.Q5_0, "attn_v": GGMLType.Q4_1,
               "attn_output": GGMLType.F16, "ffn_gate": GGMLType.Q5_1, "ffn_up": GGMLType.Q4_0,
               "ffn_down": GGMLType.Q6_K}


def _tensor_specs(untied: bool) -> dict[str, tuple[tuple[int, ...], GGMLType]]:
    kv = HIDDEN // HEADS * KV_HEADS
    specs: dict[str, tuple[tuple[int, ...], GGMLType]] = {
        "token_embd.weight": ((VOCAB, HIDDEN), GGMLType.Q8_0), "output_norm.weight": ((HIDDEN,), GGMLType.F32)}
    if untied:
        specs["output.weight"] = ((VOCAB, HIDDEN), GGMLType.BF16)
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN),
              "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN),
              "ffn_down": (HIDDEN, INTER)}
    for i in range(LAYERS):
        specs[f"blk.{i}.attn_norm.weight"] = ((HIDDEN,), GGMLType.F32)
        specs[f"blk.{i}.ffn_norm.weight"] = ((HIDDEN,), GGMLType.F32)
        for base, shape in shapes.items():
            specs[f"blk.{i}.{base}.weight"] = (shape, LAYER_TYPES[base])
        for base in ("attn_q", "attn_k", "attn_v"):
            specs[f"blk.{i}.{base}.bias"] = ((shapes[base][0],), GGMLType.F32)
    return specs


def _encode(shape: tuple[int, ...], t: GGMLType, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(bytes as GGUFWriter wants them, the float32 values they decode to according to gguf)."""
    if t == GGMLType.F32:
        x = rng.standard_normal(shape).astype(np.float32)
        return x, x
    if t in QUANTIZABLE_BY_GGUF or t == GGMLType.F16:
        x = rng.standard_normal(shape).astype(np.float32)
        q = x.astype(np.float16) if t == GGMLType.F16 else gq.quantize(x, GQ(t.value))
        return q, gq.dequantize(q.view(np.uint8) if t == GGMLType.F16 else q, GQ(t.value)).reshape(shape)
    block, _ = quants.BLOCK_SIZES[t]
    q = random_blocks(t, int(np.prod(shape)) // block, rng).reshape(shape[0], -1)
    return q, gq.dequantize(q, GQ(t.value))


def write_tiny_gguf(path: Path, *, arch: str = "qwen2", untied: bool = True, yarn: bool = False,
                    alignment: int | None = None, extra: dict[str, GGMLType] | None = None,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Write a 2-layer qwen2 GGUF of random weights; returns the expected float32 value of each tensor."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_name("tiny qwen2")
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if yarn:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(32768)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * (VOCAB - 1) + [3])
    w.add_token_merges(["t o", "to k"])
    w.add_bos_token_id(VOCAB - 4)
    w.add_eos_token_id(VOCAB - 1)
    w.add_add_bos_token(False)
    w.add_chat_template("{{ messages }}")
    w.add_uint64("test.u64", 2**40 + 1)
    w.add_float64("test.f64", 0.1)
    w.add_int8("test.i8", -5)
    w.add_array("test.floats", [0.5, 1.5])
    expected = {}
    specs = _tensor_specs(untied)
    for name, t in (extra or {}).items():
        specs[name] = ((4, 256), t)
    for name, (shape, t) in specs.items():
        data, expected[name] = _encode(shape, t, rng)
        if data.dtype == np.uint8:
            w.add_tensor(name, data, raw_dtype=GQ(t.value))
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_tiny_metadata(tiny: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = tiny
    with GGUFFile(path) as g:
        md = g.metadata
        assert g.version == 3 and g.architecture == "qwen2" and g.path == path
        assert md["general.name"] == "tiny qwen2"
        assert md["qwen2.block_count"] == LAYERS and isinstance(md["qwen2.block_count"], int)
        assert md["qwen2.attention.layer_norm_rms_epsilon"] == 1e-6  # float32 shown as its shortest decimal
        assert md["qwen2.rope.freq_base"] == 10000.0
        assert md["tokenizer.ggml.tokens"] == TOKENS
        assert md["tokenizer.ggml.token_type"] == [1] * (VOCAB - 1) + [3]
        assert md["tokenizer.ggml.merges"] == ["t o", "to k"]
        assert md["tokenizer.ggml.add_bos_token"] is False
        assert md["tokenizer.chat_template"] == "{{ messages }}"
        assert (md["test.u64"], md["test.f64"], md["test.i8"], md["test.floats"]) == (2**40 + 1, 0.1, -5, [0.5, 1.5])


def test_tiny_tensors(tiny: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, expected = tiny
    with GGUFFile(path) as g:
        assert set(g.tensors) == set(expected)
        for name, want in expected.items():
            info = g.tensors[name]
            assert info.shape == want.shape, name  # torch order: (out_features, in_features)
            got = g.dequantize(name)
            assert got.dtype == np.float32 and got.flags.writeable
            np.testing.assert_array_equal(got, want, err_msg=name)
        assert g.tensors["blk.0.attn_k.weight"].shape == (HIDDEN // HEADS * KV_HEADS, HIDDEN)
        assert g.tensors["blk.1.ffn_down.weight"].ggml_type == GGMLType.Q6_K
        raw = g.raw("blk.0.attn_q.weight")
        assert raw.dtype == np.uint8 and raw.nbytes == g.tensors["blk.0.attn_q.weight"].nbytes
        assert not raw.flags.owndata and not raw.flags.writeable  # a view of the read-only map
        with pytest.raises(KeyError, match="no tensor named"):
            g.raw("nope.weight")
    with pytest.raises(ValueError, match="closed"):
        g.raw("token_embd.weight")


def test_tiny_config(tiny: tuple[Path, dict[str, np.ndarray]]) -> None:
    cfg = config_from_gguf(GGUFFile(tiny[0]))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (VOCAB, HIDDEN, INTER, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (HEADS, KV_HEADS, HIDDEN // HEADS)
    assert (cfg.max_position_embeddings, cfg.rope_theta, cfg.rms_norm_eps) == (4096, 10000.0, 1e-6)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.tie_word_embeddings) == (VOCAB - 4, VOCAB - 1, False)
    assert cfg.rope_scaling is None


def test_tiny_state_dict(tiny: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, expected = tiny
    g = GGUFFile(path)
    sd = load_gguf_state_dict(g)
    assert set(sd) == {hf_tensor_name(n) for n in expected}
    assert "lm_head.weight" in sd and "model.layers.1.self_attn.v_proj.bias" in sd
    for name, want in expected.items():
        got = sd[hf_tensor_name(name)]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, torch.from_numpy(want), rtol=0, atol=0)
    bf16 = load_gguf_state_dict(g, dtype=torch.bfloat16)
    assert bf16["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_tied_yarn_and_alignment(tmp_path: Path) -> None:
    path = tmp_path / "tied.gguf"
    expected = write_tiny_gguf(path, untied=False, yarn=True, alignment=64, seed=3)
    g = GGUFFile(path)
    assert g.metadata["general.alignment"] == 64 and g.data_offset % 64 == 0
    assert all(t.offset % 64 == 0 for t in g.tensors.values())
    np.testing.assert_array_equal(g.dequantize("blk.1.ffn_up.weight"), expected["blk.1.ffn_up.weight"])
    cfg = config_from_gguf(g)
    assert cfg.tie_word_embeddings is True
    assert cfg.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert "lm_head.weight" not in load_gguf_state_dict(g)


def test_hf_tensor_name() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.0.attn_norm.weight") == "model.layers.0.input_layernorm.weight"
    assert hf_tensor_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert hf_tensor_name("blk.3.attn_k.weight") == "model.layers.3.self_attn.k_proj.weight"
    assert hf_tensor_name("blk.3.attn_v.bias") == "model.layers.3.self_attn.v_proj.bias"
    assert hf_tensor_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.5.ffn_norm.weight") == "model.layers.5.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.5.ffn_gate.weight") == "model.layers.5.mlp.gate_proj.weight"
    assert hf_tensor_name("blk.5.ffn_up.weight") == "model.layers.5.mlp.up_proj.weight"
    assert hf_tensor_name("blk.23.ffn_down.weight") == "model.layers.23.mlp.down_proj.weight"
    for bad in ("blk.0.attn_output.bias", "blk.0.token_embd.weight", "attn_q.weight", "rope_freqs.weight",
                "blk.x.attn_q.weight", "output.weight.extra"):
        with pytest.raises(GGUFError, match="unknown tensor"):
            hf_tensor_name(bad)


# --- bad files ---------------------------------------------------------------------------------------------
def _raises(path: Path, match: str, **kwargs: Any) -> GGUFError:
    with pytest.raises(GGUFError, match=match) as e:
        GGUFFile(path, **kwargs)
    assert str(e.value).startswith(str(path)), str(e.value)
    return e.value


def test_missing_empty_and_not_gguf(tmp_path: Path) -> None:
    _raises(tmp_path / "absent.gguf", "no such file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _raises(tmp_path / "empty.gguf", "not a GGUF file")
    (tmp_path / "json.gguf").write_bytes(b'{"model_type": "qwen2"}')
    _raises(tmp_path / "json.gguf", r"not a GGUF file \(magic b'\{\"mo'")


def test_unsupported_version(tiny: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    data = bytearray(tiny[0].read_bytes())
    for version in (1, 4, 3 << 24):  # 3 << 24 is what a big-endian v3 file reads as
        data[4:8] = version.to_bytes(4, "little")
        (tmp_path / "v.gguf").write_bytes(data)
        _raises(tmp_path / "v.gguf", f"unsupported GGUF version {version}")


@pytest.mark.parametrize(("strings", "one_decode"), [
    (["", "Ġtok", "你好", "🙂", "x" * 300, b"\xc4", b"\xe2\x82", b"\x80end", "a b", ""], True),
    (["a\x00b", "", b"\xff\x00\xfe", "\x00"], False),  # NULs of their own: read string by string
    (["Ġtok", "你好", "a b", "🙂", b"\xc4", b"\x80end", "x" * 255] * 40, True),
    (["ab", "", "cd", "e" * 256, "f", "g" * 70000, "", ""], True),  # a false candidate before each "", 2 long
])
def test_string_arrays_read_as_gguf_reads_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               strings: list[str | bytes], one_decode: bool) -> None:
    """Length-prefixed string arrays (the vocabulary, the merges): empty strings, 256+ bytes, invalid UTF-8 (kept
    byte-exact by surrogateescape) and embedded NULs, against the gguf package's reader. The offsets are found in
    bulk (`_starts_of_short_strings`), never by walking the lengths one by one: that path is the truncated-file
    tests'."""
    if one_decode:  # the joined decode must carry these alone
        monkeypatch.setattr(_Reader, "_strings_one_by_one", lambda *a: pytest.fail("read string by string"))
    monkeypatch.setattr(_Reader, "_walk_lengths", lambda *a: pytest.fail("walked the lengths"))
    path = tmp_path / "strings.gguf"
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_key_value("test.strings", strings, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    w.add_uint32("test.after", 7)  # the cursor ends exactly after the array
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    got = GGUFFile(path, expect_arch=None).metadata
    ref = gguf.GGUFReader(path).fields["test.strings"]
    assert [s.encode("utf-8", "surrogateescape") for s in got["test.strings"]] == \
        [bytes(ref.parts[i]) for i in ref.data]
    assert got["test.after"] == 7


def test_an_empty_string_array(tmp_path: Path) -> None:
    path = tmp_path / "strings.gguf"
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_array("test.strings", ["x"])  # gguf writes no empty array: made empty below
    w.add_uint32("test.after", 7)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    data = path.read_bytes()
    count = data.index(b"test.strings") + len("test.strings") + 8
    assert data[count:count + 17] == (1).to_bytes(8, "little") + (1).to_bytes(8, "little") + b"x"
    path.write_bytes(data[:count] + bytes(8) + data[count + 17:])
    got = GGUFFile(path, expect_arch=None).metadata
    assert got["test.strings"] == [] and got["test.after"] == 7


def test_truncated(tiny: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    data = tiny[0].read_bytes()
    g = GGUFFile(tiny[0])
    in_tokens = data.index(b"tokenizer.ggml.tokens") + 300
    in_infos = data.index(b"blk.1.ffn_down.weight") + 10
    cuts = {"version": 6, "counts": 20, "first key": 30, "token strings": in_tokens, "tensor infos": in_infos,
            "tensor data": g.data_offset + 100, "last byte": len(data) - 1}
    for where, n in cuts.items():
        path = tmp_path / f"cut_{n}.gguf"
        path.write_bytes(data[:n])
        err = _raises(path, "truncated file")
        assert f"{n} bytes" in str(err), (where, str(err))
    path.write_bytes(data[:-1])
    _raises(path, "truncated file: tensor '.+' data ends at byte")


def test_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    write_tiny_gguf(path, arch="llama")
    _raises(path, "unknown architecture 'llama'")
    g = GGUFFile(path, expect_arch=None)  # a generic reader still works
    assert g.architecture == "llama" and "token_embd.weight" in g.tensors
    with pytest.raises(GGUFError, match="unknown architecture 'llama'"):
        config_from_gguf(g)
    with pytest.raises(GGUFError, match="unknown architecture 'llama'"):
        load_gguf_state_dict(g)


def test_unsupported_and_unknown_types(tmp_path: Path) -> None:
    path = tmp_path / "iq.gguf"
    write_tiny_gguf(path, extra={"blk.0.ffn_up.bias": GGMLType.F32})
    # known-but-unsupported type: the file opens, dequantizing names the tensor and the type
    data = bytearray(path.read_bytes())
    name = b"output_norm.weight"
    at = data.index(name) + len(name) + 4 + 8  # after name, n_dims (u32) and ne0 (u64): the type id
    assert int.from_bytes(data[at:at + 4], "little") == GGMLType.F32
    data[at:at + 4] = int(GGMLType.I32).to_bytes(4, "little")  # same size as F32, so offsets stay valid
    path.write_bytes(data)
    g = GGUFFile(path)
    with pytest.raises(GGUFError, match=r"tensor 'output_norm.weight' has unsupported quant type I32") as e:
        g.dequantize("output_norm.weight")
    assert str(e.value).startswith(str(path))
    with pytest.raises(GGUFError, match="unknown tensor 'blk.0.ffn_up.bias'"):
        load_gguf_state_dict(g)
    # unknown type id: cannot even size the tensor
    data[at:at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(data)
    _raises(path, "tensor 'output_norm.weight' has unsupported ggml type id 99")


# --- the real file ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(real_gguf: Path) -> GGUFFile:
    return GGUFFile(real_gguf)


@pytest.mark.real_model
def test_real_metadata_and_config(real: GGUFFile) -> None:
    md = real.metadata
    assert real.version == 3 and real.architecture == "qwen2" and len(real.tensors) == 291
    counts = Counter(t.ggml_type.name for t in real.tensors.values())
    assert counts == {"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12}
    assert real.tensors["token_embd.weight"].ggml_type == GGMLType.Q5_0
    assert real.tensors["output.weight"].ggml_type == GGMLType.Q8_0
    assert real.tensors["blk.0.attn_q.weight"].shape == (896, 896)
    assert real.tensors["blk.0.attn_k.weight"].shape == (128, 896)
    assert real.tensors["blk.0.ffn_down.weight"].shape == (896, 4864)
    # the tensor table tiles the data region up to the last byte of the file
    assert max(t.offset + t.nbytes for t in real.tensors.values()) == os.path.getsize(real.path)
    assert len(md["tokenizer.ggml.tokens"]) == 151936 and len(md["tokenizer.ggml.merges"]) == 151387
    assert md["tokenizer.ggml.pre"] == "qwen2" and md["tokenizer.ggml.add_bos_token"] is False
    cfg = config_from_gguf(real)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (896, 4864, 24)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (14, 2, 64, 151936)
    assert cfg.tie_word_embeddings is False  # output.weight is present in this file
    assert cfg.rms_norm_eps == md["qwen2.attention.layer_norm_rms_epsilon"] == 1e-6
    assert cfg.rope_theta == md["qwen2.rope.freq_base"] == 1_000_000.0
    assert (cfg.max_position_embeddings, cfg.bos_token_id, cfg.eos_token_id) == (32768, 151643, 151645)


@pytest.mark.real_model
def test_real_dequantize_matches_gguf(real: GGUFFile) -> None:
    by_type: dict[GGMLType, list[str]] = {}
    for name, t in real.tensors.items():
        by_type.setdefault(t.ggml_type, []).append(name)
    for t, names in by_type.items():
        for name in names[:2] + names[-1:]:
            info = real.tensors[name]
            rows = real.raw(name).reshape(info.shape[0] if len(info.shape) > 1 else 1, -1)
            rows = np.concatenate([rows[:256], rows[-256:]]) if len(rows) > 512 else rows  # the two big ones
            ref = gq.dequantize(rows, GQ(t.value))
            np.testing.assert_array_equal(dequantize(rows, t, ref.shape), ref, err_msg=name)


@pytest.mark.slow
@pytest.mark.real_model
def test_real_state_dict_matches_transformers(real: GGUFFile) -> None:
    """Every tensor equals transformers' own GGUF load, so names line up and attn_q/attn_k are not permuted
    (transformers un-permutes q/k only for llama-type GGUFs; llama.cpp's Qwen2Model converter never permutes)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = load_gguf_checkpoint(str(real.path))["config"]
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**config))
    theirs = load_gguf_checkpoint(str(real.path), return_tensors=True, model_to_load=model)["tensors"]
    ours = load_gguf_state_dict(real)
    assert set(ours) == set(theirs) and len(ours) == 291
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name
    assert config["num_hidden_layers"] == config_from_gguf(real).num_hidden_layers
