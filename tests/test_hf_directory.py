"""Loading an HF model directory (config.json, safetensors, tokenizer files, generation_config.json)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qwen25 import LLM, SamplingParams  # noqa: E402
from qwen25.weights.safetensors import SafetensorsError, load_safetensors  # noqa: E402


def test_llm_loads_hf_directory_and_greedy_matches_transformers(tiny_hf_dir):
    llm = LLM(str(tiny_hf_dir))
    assert llm.config.max_position_embeddings == 96 and llm.config.tie_word_embeddings
    defaults = llm.get_default_sampling_params()  # from generation_config.json
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    ids = llm.tokenizer.encode(llm.apply_chat_template([{"role": "user", "content": "hi"}]))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=151643)[0, len(ids):].tolist()
    got = llm.generate([ids], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
    assert got == ref


def test_hf_tokenizer_files_load_identically_in_transformers(tiny_hf_dir, real_tokenizer):
    ref = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    text = "Hello, 世界! <|im_start|>user\n12345 <tool_call>{\"a\": 1}</tool_call>  \t\n"
    assert ref(text)["input_ids"] == real_tokenizer.encode(text)


def test_sharded_index_loads_every_tensor(tmp_path, tiny_hf_dir):
    from safetensors.torch import save_file

    tensors = load_safetensors(tiny_hf_dir)
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n].clone() for n in names[:half]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n].clone() for n in names[half:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {n: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = load_safetensors(tmp_path)
    assert sorted(sharded) == names
    assert all(torch.equal(sharded[n], tensors[n]) for n in names)


def test_safetensors_is_memory_mapped_not_copied(tiny_hf_dir):
    """Tensors requested in their stored dtype are views of one mapping: their addresses differ exactly by
    their offsets in the file, which no per-tensor copy would reproduce."""
    path = tiny_hf_dir / "model.safetensors"
    raw = path.read_bytes()
    header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])
    tensors = load_safetensors(path)
    base_name = min(tensors, key=lambda n: header[n]["data_offsets"][0])
    base_ptr = tensors[base_name].data_ptr() - header[base_name]["data_offsets"][0]
    for name, t in tensors.items():
        assert t.data_ptr() - base_ptr == header[name]["data_offsets"][0], name


def test_truncated_and_corrupt_safetensors_are_named(tmp_path, tiny_hf_dir):
    data = (tiny_hf_dir / "model.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match="trunc.safetensors: truncated"):
        load_safetensors(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(SafetensorsError, match="junk.safetensors: corrupt header"):
        load_safetensors(tmp_path / "junk.safetensors")
