"""Tokenizer tests: ours (built from the real GGUF's metadata) against reference implementations.

References: transformers' own GGUF tokenizer conversion, the directory our `save` writes loaded back by
`transformers.AutoTokenizer`, and llama.cpp's Qwen2 tokenizer test vectors (from the llama-cpp-python sdist).
No expected ids are written by hand. Slow reference objects are session fixtures.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import random
import subprocess
import sys
import tarfile
import time
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen25.tokenizer import StreamDecoder, Tokenizer
from qwen25.tokenizer.bpe import QWEN2_NON_SPECIAL

pytestmark = pytest.mark.real_model

DATA = Path(__file__).parent / "data"
LLAMA_CPP_SDIST = "llama_cpp_python-0.3.36.tar.gz"
LLAMA_CPP_VECTORS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"

# The 22 Qwen2.5 control tokens (SPEC §2), by name only; their ids come from the file.
CONTROL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]

# Cases that would not survive a text file (whitespace, CR, exact special-token spellings).
EXTRA_CASES: dict[str, str] = {
    "empty": "",
    "spaces": "a  b   c    d                e",
    "trailing_spaces": "trailing   \nlines  \n   ",
    "leading_spaces": "   leading",
    "tabs": "\tone\t\ttwo\t \t three\t",
    "crlf": "line one\r\nline two\r\n\r\nline four\r",
    "newline_runs": "\n\n\na\n \n  \n\n\n\n b\n",
    "unicode_spaces": "nbsp\u00a0here, thin\u2009space, ideographic\u3000space, zwsp\u200bhere",
    "control_chars": "nul\x00 bell\x07 esc\x1b[0m del\x7f",
    "chatml": "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "tool_call": 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
    "fim": "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n    return c<|fim_middle|>",
    "repo": "<|repo_name|>qwen25<|file_sep|>src/main.py\nprint('hi')<|file_sep|>README.md\n# x<|endoftext|>",
    "all_controls_glued": "".join(CONTROL_TOKENS),
    "all_controls_spaced": " ".join(f"x{t}y" for t in CONTROL_TOKENS),
    "lookalikes": "<|im_end |> <| im_end|> <|IM_END|> <|im_end| > <im_end> <|im_end <tool_call > </tool_call "
                  "[PAD151665] [PAD151935] <|endoftext||> <<|im_start|>> \\<|im_end|> |im_end| <|fim-prefix|>",
    "repeated_controls": "<|im_start|><|im_start|><|im_end|><|im_end|><|endoftext|><|endoftext|>",
    "nfd_input": "Cafe\u0301 nai\u0308ve A\u030angstro\u0308m \u1100\u1161\u11a8",  # NFC composes these
    "long_word": "supercalifragilisticexpialidocious" * 8,
    "long_digits": "1234567890" * 20,
    "punct_runs": "!!!!!!?????......------=======''''''```````\"\"\"\"",
}


def _corpus() -> dict[str, str]:
    """`@@@ name` sections of tests/data/tokenizer_corpus.txt (multi-line bodies), then EXTRA_CASES."""
    cases: dict[str, str] = {}
    name, body = None, []
    for line in (DATA / "tokenizer_corpus.txt").read_text(encoding="utf-8").split("\n"):
        if line.startswith("@@@ "):
            if name is not None:
                cases[name] = "\n".join(body)
            name, body = line[4:].strip(), []
        else:
            body.append(line)
    if name is not None:
        cases[name] = "\n".join(body).rstrip("\n")
    cases.update(EXTRA_CASES)
    return cases


CORPUS = _corpus()


# --- fixtures


@pytest.fixture(scope="session")
def gguf_metadata(real_gguf: Path) -> dict:
    """The GGUF's metadata through the project's own parser."""
    from qwen25.weights.gguf import GGUFFile

    with GGUFFile(real_gguf) as g:
        return dict(g.metadata)


@pytest.fixture(scope="session")
def tok(gguf_metadata: dict) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata)


@pytest.fixture(scope="session")
def hf_gguf(real_gguf: Path):
    """transformers' own tokenizer conversion of the same GGUF (the slow reference: ~15-40 s)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)


@pytest.fixture(scope="session")
def saved_dir(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tok.save(tmp_path_factory.mktemp("qwen25-tokenizer"))


@pytest.fixture(scope="session")
def hf_saved(saved_dir: Path):
    """What transformers makes of the directory our `save` wrote."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(saved_dir))


@pytest.fixture(scope="session")
def llama_cpp_vectors() -> list[tuple[str, list[int]]]:
    """llama.cpp's Qwen2 tokenizer test cases, extracted from the llama-cpp-python 0.3.36 sdist (cached)."""
    from qwen25.weights.registry import cache_dir

    testdata = cache_dir() / "testdata"
    inp, out = testdata / "ggml-vocab-qwen2.gguf.inp", testdata / "ggml-vocab-qwen2.gguf.out"
    if not (inp.is_file() and out.is_file()):
        sdist = Path.home() / ".cache" / "qwen25-ref-build" / LLAMA_CPP_SDIST
        if not sdist.is_file():
            sdist = testdata / LLAMA_CPP_SDIST
        if not sdist.is_file():
            testdata.mkdir(parents=True, exist_ok=True)
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                 "--disable-pip-version-check", "llama-cpp-python==0.3.36", "-d", str(testdata)],
                capture_output=True, text=True)
            if result.returncode != 0 or not sdist.is_file():
                pytest.skip(f"could not download the llama-cpp-python sdist: {result.stderr.strip()[-300:]}")
        testdata.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            for suffix, target in ((".inp", inp), (".out", out)):
                member = tar.extractfile(LLAMA_CPP_VECTORS + suffix)
                assert member is not None
                target.write_bytes(member.read())
    # Same parsing as llama.cpp tests/test-tokenizer-0.cpp: inputs end with "\n__ggml_vocab_test__\n".
    raw = inp.read_bytes().decode("utf-8")
    sep = "\n__ggml_vocab_test__\n"
    texts, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(sep)
    lines = out.read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert len(texts) == len(lines), (len(texts), len(lines))
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def _hf_special_ids(hf) -> set[int]:
    """Ids a transformers tokenizer drops with skip_special_tokens (its added tokens flagged special)."""
    return {i for i, t in hf.added_tokens_decoder.items() if t.special}


# llama.cpp itself (llama-cpp-python, built in a separate reference venv) tokenizing the same GGUF.
_LLAMA_CPP_SCRIPT = """
import json, sys
import llama_cpp
m = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
texts, id_lists = json.load(sys.stdin)
json.dump([[m.tokenize(t.encode(), add_bos=False, special=True) for t in texts],
           [m.detokenize(ids, special=True).decode("utf-8", "replace") for ids in id_lists]], sys.stdout)
"""


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Reproducible random texts: arbitrary code points mixed with the tricky pieces the fuzzers use."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 10)):
            r = rng.random()
            if r < 0.3:
                parts.append(rng.choice(_PIECES + CONTROL_TOKENS))
            elif r < 0.6:
                parts.append("".join(chr(rng.randint(0x20, 0x24F)) for _ in range(rng.randint(1, 8))))
            else:
                parts.append("".join(chr(c) for c in (rng.randint(0, 0x10FFFF) for _ in range(rng.randint(1, 6)))
                                     if not 0xD800 <= c <= 0xDFFF))
        texts.append("".join(parts))
    return texts


@pytest.fixture(scope="session")
def llama_cpp_tokenize(real_gguf: Path):
    """`run(texts, id_lists) -> (ids per text, text per id list)` from llama.cpp, or skip without the ref venv."""
    python = Path(os.environ.get("QWEN25_REF_PYTHON", Path.home() / ".cache" / "qwen25-ref" / "bin" / "python"))
    if not python.is_file():
        pytest.skip(f"no llama-cpp-python reference interpreter at {python} (set QWEN25_REF_PYTHON)")

    def run(texts: list[str], id_lists: list[list[int]]) -> tuple[list[list[int]], list[str]]:
        result = subprocess.run([str(python), "-c", _LLAMA_CPP_SCRIPT, str(real_gguf)], capture_output=True,
                                input=json.dumps([texts, id_lists]), text=True, encoding="utf-8",
                                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        if result.returncode != 0:
            pytest.skip(f"llama-cpp-python reference failed: {result.stderr.strip()[-300:]}")
        ids, decoded = json.loads(result.stdout)
        return ids, decoded

    return run


# --- construction and vocabulary


def test_build_time_from_gguf(gguf_metadata: dict) -> None:
    start = time.perf_counter()
    Tokenizer.from_gguf_metadata(gguf_metadata)
    elapsed = time.perf_counter() - start
    print(f"Tokenizer.from_gguf_metadata: {elapsed:.2f} s")
    assert elapsed < 5.0  # target is < 2 s; slack for a loaded 2-core machine


def test_vocab_matches_transformers(tok: Tokenizer, hf_gguf) -> None:
    assert tok.vocab_size == len(hf_gguf) == len(tok)
    assert tok.backend.get_vocab(with_added_tokens=True) == hf_gguf.get_vocab()
    for i in (0, 1000, 151642, 151643, 151664, 151665, 151935):
        assert tok.id_to_token(i) == hf_gguf.convert_ids_to_tokens(i)


def test_special_flags(tok: Tokenizer, hf_gguf) -> None:
    ids = {name: tok.token_to_id(name) for name in CONTROL_TOKENS}
    assert None not in ids.values()
    assert set(ids.values()) == tok.added_ids
    assert {n for n, i in ids.items() if i in tok.special_ids} == set(CONTROL_TOKENS) - QWEN2_NON_SPECIAL
    # transformers' GGUF path takes `special` from the GGUF token type, where llama.cpp typed the FIM/repo tokens
    # CONTROL; the HF tokenizer_config.json (SPEC §2) says they are not special. Exactly those six differ.
    differ = {tok.id_to_token(i) for i in _hf_special_ids(hf_gguf) ^ tok.special_ids}
    assert differ == QWEN2_NON_SPECIAL - {"<tool_call>", "</tool_call>"}


def test_metadata_ids(tok: Tokenizer, gguf_metadata: dict, hf_gguf) -> None:
    assert tok.eos_token_id == int(gguf_metadata["tokenizer.ggml.eos_token_id"]) == hf_gguf.eos_token_id
    assert tok.pad_token_id == int(gguf_metadata["tokenizer.ggml.padding_token_id"]) == hf_gguf.pad_token_id
    assert tok.bos_token_id == int(gguf_metadata["tokenizer.ggml.bos_token_id"])
    assert tok.chat_template == gguf_metadata["tokenizer.chat_template"]
    assert tok.stop_token_ids == {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}


# --- encode / decode parity with transformers' GGUF tokenizer


def test_corpus_covers_the_brief() -> None:
    languages = [n for n in CORPUS if n not in EXTRA_CASES and n not in (
        "python", "javascript", "rust", "c", "go", "sql_html_shell", "json", "emoji", "digits", "contractions",
        "symbols", "mixed_script")]
    assert len(languages) >= 29, languages
    assert all(t in CORPUS["all_controls_glued"] for t in CONTROL_TOKENS)


@pytest.mark.parametrize("name", list(CORPUS))
def test_encode_matches_transformers(tok: Tokenizer, hf_gguf, name: str) -> None:
    text = CORPUS[name]
    ours = tok.encode(text)
    # transformers' GGUF tokenizer has no NFC normalizer (Qwen's tokenizer.json does); compare on NFC text.
    assert ours == hf_gguf.encode(unicodedata.normalize("NFC", text), add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == ours  # Qwen adds no BOS/EOS


@pytest.mark.parametrize("name", list(CORPUS))
def test_decode_matches_transformers(tok: Tokenizer, hf_gguf, hf_saved, name: str) -> None:
    ids = tok.encode(CORPUS[name])
    assert tok.decode(ids) == hf_gguf.decode(ids) == hf_saved.decode(ids) == unicodedata.normalize("NFC",
                                                                                                     CORPUS[name])
    # hf_saved carries the SPEC flags (tool/FIM not special); hf_gguf agrees wherever no FIM/repo token is present.
    assert tok.decode(ids, skip_special_tokens=True) == hf_saved.decode(ids, skip_special_tokens=True)
    if not any(tok.id_to_token(i) in QWEN2_NON_SPECIAL for i in ids):
        assert tok.decode(ids, skip_special_tokens=True) == hf_gguf.decode(ids, skip_special_tokens=True)


def test_whole_corpus_and_batch(tok: Tokenizer, hf_gguf) -> None:
    texts = list(CORPUS.values())
    whole = "\n\n".join(texts)
    assert tok.encode(whole) == hf_gguf.encode(unicodedata.normalize("NFC", whole), add_special_tokens=False)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode_batch(tok.encode_batch(texts)) == [unicodedata.normalize("NFC", t) for t in texts]


def test_decode_padding_and_unknown_ids(tok: Tokenizer, hf_gguf) -> None:
    ids = [tok.token_to_id("<|im_end|>"), 151665, 151935, tok.vocab_size + 5, tok.encode("ok")[0]]
    assert tok.decode(ids) == hf_gguf.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf_gguf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", CONTROL_TOKENS)
def test_skip_special_tokens(tok: Tokenizer, name: str) -> None:
    ids = tok.encode(f"a{name}b")
    assert len(ids) == 3 and tok.id_to_token(ids[1]) == name  # matched whole
    expected = f"a{name}b" if name in QWEN2_NON_SPECIAL else "ab"
    assert tok.decode(ids, skip_special_tokens=True) == expected
    assert tok.decode(ids) == f"a{name}b"


def test_llama_cpp_vectors(tok: Tokenizer, llama_cpp_vectors: list[tuple[str, list[int]]]) -> None:
    assert len(llama_cpp_vectors) > 30
    failures = [(text, ids, tok.encode(text)) for text, ids in llama_cpp_vectors if tok.encode(text) != ids]
    assert not failures


def test_matches_llama_cpp(tok: Tokenizer, llama_cpp_tokenize) -> None:
    """Corpus plus 400 random texts through llama.cpp's own tokenizer on the same file (it has no NFC step)."""
    texts = [unicodedata.normalize("NFC", t) for t in [*CORPUS.values(), *_random_texts(400)]]
    ours = tok.encode_batch(texts)
    theirs, decoded = llama_cpp_tokenize(texts, ours)
    mismatches = [(t, a, b) for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatches, mismatches[:3]
    assert decoded == tok.decode_batch(ours)


# --- save / load round trips


def test_save_loads_in_transformers(tok: Tokenizer, hf_saved) -> None:
    for name, text in CORPUS.items():
        assert hf_saved.encode(text, add_special_tokens=False) == tok.encode(text), name
    assert hf_saved.eos_token_id == tok.eos_token_id and hf_saved.pad_token_id == tok.pad_token_id
    assert hf_saved.chat_template == tok.chat_template
    assert _hf_special_ids(hf_saved) == tok.special_ids


def test_from_pretrained_dir_roundtrip(tok: Tokenizer, saved_dir: Path) -> None:
    again = Tokenizer.from_pretrained_dir(saved_dir)
    assert (again.vocab_size, again.special_ids, again.added_ids) == (tok.vocab_size, tok.special_ids, tok.added_ids)
    assert (again.eos_token_id, again.pad_token_id, again.bos_token_id) == (
        tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    assert again.chat_template == tok.chat_template
    for text in CORPUS.values():
        assert again.encode(text) == tok.encode(text)


def test_from_file_config_overrides_flags(tok: Tokenizer, hf_gguf, tmp_path: Path) -> None:
    """A transformers-saved directory (flags from the GGUF types, template in chat_template.jinja)."""
    hf_gguf.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained_dir(tmp_path)
    assert loaded.special_ids == _hf_special_ids(hf_gguf)
    assert loaded.chat_template == tok.chat_template and loaded.eos_token_id == tok.eos_token_id
    bare = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert bare.chat_template is None and bare.eos_token_id is None
    text = CORPUS["fim"] + CORPUS["chatml"]
    assert loaded.decode(loaded.encode(text), skip_special_tokens=True) == hf_gguf.decode(
        hf_gguf.encode(text, add_special_tokens=False), skip_special_tokens=True)


def test_config_flags_override_tokenizer_json(tok: Tokenizer, saved_dir: Path, tmp_path: Path) -> None:
    """Qwen's released tokenizer.json flags all 22 added tokens special; tokenizer_config.json corrects that."""
    spec = json.loads((saved_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for added in spec["added_tokens"]:
        added["special"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    assert len(Tokenizer.from_file(tmp_path / "tokenizer.json").special_ids) == 22
    fixed = Tokenizer.from_file(tmp_path / "tokenizer.json", saved_dir / "tokenizer_config.json")
    assert fixed.special_ids == tok.special_ids
    text = CORPUS["tool_call"] + CORPUS["fim"]
    assert fixed.decode(fixed.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text), True)


def test_load_tokenizer_from_gguf_path(tok: Tokenizer, real_gguf: Path) -> None:
    from qwen25.checkpoint import load_tokenizer

    direct = load_tokenizer(real_gguf)
    assert direct.backend.to_str() == tok.backend.to_str()
    assert (direct.special_ids, direct.eos_token_id, direct.chat_template) == (
        tok.special_ids, tok.eos_token_id, tok.chat_template)


def test_rejects_other_tokenizers(gguf_metadata: dict) -> None:
    with pytest.raises(ValueError, match="gpt2"):
        Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="qwen2"):
        Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.pre": "llama3"})



@pytest.mark.parametrize("bad", ["ab", "a b c", "", "a  b"])
def test_rejects_a_malformed_merge_naming_it(gguf_metadata: dict, bad: str) -> None:
    merges = list(gguf_metadata["tokenizer.ggml.merges"])
    merges[1000] = bad
    with pytest.raises(ValueError, match=f"malformed merge {bad!r}"):
        Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.merges": merges})


# --- fuzzing

_PIECES = ["👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "👍🏽", "1️⃣", "你好世界", "ｶﾀｶﾅ", "한국어", "e\u0301", "\u0338", "\r\n", "\n\n",
           "   ", "\t", "'S", "'ll", "12345", "<|", "|>", "<tool_call", "[PAD151665]", "\u200d", "\ufeff", "\ufffd"]
_CHARS = st.characters(codec="utf-8")  # any scalar value but surrogates
_TEXT = st.lists(st.one_of(st.text(_CHARS, max_size=12), st.sampled_from(_PIECES)), max_size=12).map("".join)
_TEXT_WITH_CONTROLS = st.lists(st.one_of(_TEXT, st.sampled_from(CONTROL_TOKENS)), max_size=5).map("".join)
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(text=_TEXT_WITH_CONTROLS)
def test_roundtrip_is_nfc(tok: Tokenizer, text: str) -> None:
    # Control tokens are matched on the raw text before NFC, so NFC applies to the pieces between them.
    pieces, rest = [], text
    while rest:
        hits = [(rest.find(t), t) for t in CONTROL_TOKENS if t in rest]
        if not hits:
            pieces.append(unicodedata.normalize("NFC", rest))
            break
        at, t = min(hits)
        pieces += [unicodedata.normalize("NFC", rest[:at]), t]
        rest = rest[at + len(t):]
    assert tok.decode(tok.encode(text)) == "".join(pieces)


@_FUZZ
@given(text=_TEXT)
def test_fuzz_matches_transformers(tok: Tokenizer, hf_gguf, text: str) -> None:
    nfc = unicodedata.normalize("NFC", text)
    assert tok.encode(text) == hf_gguf.encode(nfc, add_special_tokens=False)


@_FUZZ
@given(text=_TEXT_WITH_CONTROLS, skip=st.booleans())
def test_stream_decoder_matches_decode(tok: Tokenizer, text: str, skip: bool) -> None:
    ids = tok.encode(text)
    stream = StreamDecoder(tok, skip_special_tokens=skip)
    pieces = [stream.push(i) for i in ids]
    assert not stream.has_pending
    pieces.append(stream.flush())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)


@_FUZZ
@given(ids=st.lists(st.one_of(st.integers(0, 255), st.integers(0, 151935), st.integers(151643, 151664)),
                    max_size=40), skip=st.booleans())
def test_stream_decoder_on_arbitrary_ids(tok: Tokenizer, ids: list[int], skip: bool) -> None:
    """Random byte tokens make invalid UTF-8: the stream must replace it exactly as the one-shot decode does."""
    stream = StreamDecoder(tok, skip_special_tokens=skip)
    assert stream.push_many(ids) + stream.flush() == tok.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_holds_partial_characters(tok: Tokenizer) -> None:
    text = "🫠 melting, 𝔘 fraktur, 👨‍👩‍👧 family"  # 🫠 and 𝔘 are each split over several byte tokens
    ids = tok.encode(text)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "" in pieces  # at least one token ended mid-character and was held back
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text
    lone = tok.encode("🫠")[:1]  # first bytes of a 4-byte character, never completed
    stream = StreamDecoder(tok)
    assert stream.push_many(lone) == "" and stream.has_pending
    assert stream.flush() == tok.decode(lone) == "\ufffd"


def test_accepts_tensor_ids(tok: Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    ids = tok.encode("héllo 🫠<|im_end|>")
    assert tok.decode(torch.tensor(ids), skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    stream = StreamDecoder(tok, skip_special_tokens=True)
    assert "".join(stream.push(i) for i in torch.tensor(ids)) + stream.flush() == "héllo 🫠"
