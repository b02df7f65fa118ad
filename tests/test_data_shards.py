"""Token shards and `qwen25 data pack`: round trips, the on-disk format, the manifest, and bad input.

The writer/reader tests use synthetic ids (above 65,535, so a uint16 format would fail them); the pack tests use
the real Qwen2.5 tokenizer on small text, jsonl and parquet files written here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from qwen25.cli import main as cli_main
from qwen25.data.shards import HEADER_BYTES, ShardError, ShardReader, ShardWriter

EOT = 151643
VOCAB = 151936


def _docs(seed: int = 0, n: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=int(rng.integers(0, 50))).tolist() for _ in range(n)]


def _write(directory: Path, docs: list[list[int]], **kw) -> dict:
    with ShardWriter(directory, EOT, VOCAB, **kw) as w:
        for d in docs:
            w.add(d)
        return w.close({"note": "test"})


# --- writer / reader ------------------------------------------------------------------------------------------
def test_round_trip_across_rolled_files(tmp_path):
    docs = _docs()
    manifest = _write(tmp_path, docs, max_tokens_per_file=100)
    r = ShardReader(tmp_path)
    assert len(r) == r.num_documents == len(docs)
    assert len(manifest["files"]) > 3  # rolled
    assert all(f["num_tokens"] <= 100 for f in manifest["files"])
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(r[i], np.array(d + [EOT], dtype=np.uint32))
    assert r.num_tokens == sum(len(d) + 1 for d in docs) == manifest["num_tokens"]
    np.testing.assert_array_equal(r.document_lengths(), [len(d) + 1 for d in docs])
    assert r[-1].tolist() == docs[-1] + [EOT]
    assert max(max(d) for d in docs if d) > 65535  # the ids really need 32 bits
    assert manifest["note"] == "test" and json.loads((tmp_path / "manifest.json").read_text()) == manifest


def test_a_document_larger_than_a_file_gets_a_file_of_its_own(tmp_path):
    _write(tmp_path, [[1, 2], list(range(30)), [3]], max_tokens_per_file=10)
    r = ShardReader(tmp_path)
    assert [f["num_tokens"] for f in r.manifest["files"]] == [3, 31, 2]
    assert r[1].tolist() == list(range(30)) + [EOT]


def test_file_layout_is_the_documented_one(tmp_path):
    _write(tmp_path, [[70000, 5], [6]])
    raw = (tmp_path / "tokens-00000.bin").read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert HEADER_BYTES == 1024 and raw[:4] == b"Q25T"
    assert header[1:6].tolist() == [1, 5, 4, 2, VOCAB] and not header[6:].any()  # version, tokens, width, docs, vocab
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u4").tolist() == [70000, 5, EOT, 6, EOT]
    idx = (tmp_path / "tokens-00000.idx").read_bytes()
    assert idx[:4] == b"Q25I" and np.frombuffer(idx[4:8], "<i4")[0] == 1
    assert np.frombuffer(idx[HEADER_BYTES:], dtype="<u8").tolist() == [0, 3, 5]


def test_writer_rejects_bad_ids(tmp_path):
    with pytest.raises(ValueError, match="token ids must be in"):
        ShardWriter(tmp_path, EOT, VOCAB).add([VOCAB])
    with pytest.raises(ValueError, match="token ids must be in"):
        ShardWriter(tmp_path / "b", EOT, VOCAB).add([-1])
    with pytest.raises(ValueError, match="max_tokens_per_file"):
        ShardWriter(tmp_path / "c", EOT, VOCAB, max_tokens_per_file=0)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "tokens-00000.bin").write_bytes(b"\x00" * 4 + (d / "tokens-00000.bin").read_bytes()[4:]),
     "not a qwen25 token file"),
    (lambda d: (d / "tokens-00000.bin").write_bytes(b"GPT2" + b"\x00" * 2000), "not a qwen25 token file"),
    (lambda d: (d / "tokens-00000.bin").write_bytes(b"Q25T\x02\0\0\0" + (d / "tokens-00000.bin").read_bytes()[8:]),
     "version 2"),
    (lambda d: (d / "tokens-00000.bin").write_bytes((d / "tokens-00000.bin").read_bytes()[:-4]), "truncated"),
    (lambda d: (d / "tokens-00000.bin").write_bytes(b"short"), "only 5 bytes"),
    (lambda d: (d / "tokens-00000.idx").write_bytes((d / "tokens-00000.bin").read_bytes()), "not a qwen25 document"),
    (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    (lambda d: (d / "manifest.json").write_text('{"format": "other"}'), "not a qwen25 shard manifest"),
    (lambda d: (d / "manifest.json").write_text("{"), "unreadable manifest"),
    (lambda d: (d / "tokens-00000.idx").unlink(), "cannot read document index"),
])
def test_reader_names_a_wrong_or_damaged_file(tmp_path, damage, message):
    _write(tmp_path, _docs(n=5))
    damage(tmp_path)
    with pytest.raises(ShardError, match=message):
        ShardReader(tmp_path)


def test_reader_on_a_missing_directory(tmp_path):
    with pytest.raises(ShardError, match="no such shard directory"):
        ShardReader(tmp_path / "nope")


# --- qwen25 data pack -----------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _one_tokenizer_load(request, monkeypatch):
    """The pack tests reuse the session's tokenizer: loading it from the GGUF costs a second per command."""
    if "capsys" in request.fixturenames:
        tokenizer = request.getfixturevalue("real_tokenizer")
        monkeypatch.setattr("qwen25.checkpoint.load_tokenizer", lambda path: tokenizer)


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("The first document.\nIt has two lines.\n")
    (root / "sub" / "b.txt").write_text("Second: <|endoftext|> written inside the text.")
    (root / "sub" / "skip.py").write_text("print('not included')")
    (root / ".hidden.txt").write_text("hidden files are skipped")
    (root / "empty.txt").write_text("  \n")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    lines = [json.dumps({"text": "jsonl one"}), "{not json", json.dumps({"body": "wrong field"}), "",
             json.dumps({"text": "jsonl two, unicode: 日本語 🎉"}), json.dumps(["not", "an", "object"])]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def _pack(capsys, *args) -> tuple[int, str, str]:
    rc = cli_main(["data", "pack", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_pack_text_and_jsonl(corpus, capsys, real_tokenizer):
    out_dir = corpus / "shards"
    rc, out, err = _pack(capsys, corpus / "in", corpus / "docs.jsonl", "--output", out_dir, "--include", "*.txt")
    assert rc == 0, err
    assert out.startswith("packed 4 documents")
    assert out.rstrip().endswith("skipped 3 malformed lines, 1 empty document, 1 undecodable file")
    assert f"{corpus / 'docs.jsonl'}:2: not valid JSON" in err
    assert f"{corpus / 'docs.jsonl'}:3: no 'text' string field" in err and f"{corpus / 'docs.jsonl'}:6:" in err
    assert "latin1.txt: not UTF-8 text" in err

    r = ShardReader(out_dir)
    texts = ["The first document.\nIt has two lines.\n", "Second: <|endoftext|> written inside the text.",
             "jsonl one", "jsonl two, unicode: 日本語 🎉"]
    assert len(r) == 4
    for i, text in enumerate(texts):
        ids = r[i].tolist()
        assert ids[-1] == EOT and EOT not in ids[:-1]  # a literal <|endoftext|> is text, not a boundary
        assert real_tokenizer.decode(ids[:-1]) == text
    assert r[0].tolist()[:-1] == real_tokenizer.encode(texts[0])

    m = r.manifest
    assert m["tokenizer"]["name"] == "qwen2.5-coder-0.5b-instruct" and m["tokenizer"]["vocab_size"] == VOCAB
    assert m["tokenizer"]["eot_token_id"] == EOT == m["eot_token_id"]
    assert m["settings"]["include"] == ["*.txt"] and m["settings"]["text_field"] == "text"
    assert m["skipped"] == {"malformed_lines": 3, "empty_documents": 1, "undecodable_files": 1}
    by_name = {Path(s["path"]).name: s for s in m["sources"]}
    assert set(by_name) == {"a.txt", "b.txt", "empty.txt", "latin1.txt", "docs.jsonl"}  # sorted walk, no .py/hidden
    for s in m["sources"]:
        assert s["sha256"] == hashlib.sha256(Path(s["path"]).read_bytes()).hexdigest()
    assert by_name["docs.jsonl"]["documents"] == 2 and by_name["docs.jsonl"]["skipped"] == 3
    assert sum(s["tokens"] for s in m["sources"]) == m["num_tokens"] == r.num_tokens
    assert not [p for p in corpus.iterdir() if ".partial-" in p.name]


def test_pack_parquet(tmp_path, capsys, real_tokenizer):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["row one", None, "row three"], "n": [1, 2, 3]}), tmp_path / "t.parquet",
                   row_group_size=2)
    rc, out, err = _pack(capsys, tmp_path / "t.parquet", "-o", tmp_path / "out", "--text-field", "content")
    assert rc == 0, err
    r = ShardReader(tmp_path / "out")
    assert [real_tokenizer.decode(r[i].tolist()) for i in range(len(r))] == ["row one<|endoftext|>",
                                                                           "row three<|endoftext|>"]
    assert r.manifest["skipped"]["empty_documents"] == 1

    rc, out, err = _pack(capsys, tmp_path / "t.parquet", "-o", tmp_path / "out2")  # default field: text
    assert rc == 1 and "no column 'text' (columns: content, n)" in err and "--text-field" in err
    assert not (tmp_path / "out2").exists()


def test_rerun_is_a_no_op_and_a_different_pack_needs_overwrite(corpus, capsys):
    out_dir = corpus / "shards"
    assert _pack(capsys, corpus / "docs.jsonl", "-o", out_dir)[0] == 0
    before = (out_dir / "manifest.json").read_text()
    rc, out, _ = _pack(capsys, corpus / "docs.jsonl", "-o", out_dir)
    assert rc == 0 and "already holds this pack" in out

    rc, _, err = _pack(capsys, corpus / "in", "-o", out_dir)
    assert rc == 1 and "holds a different pack" in err and "--overwrite" in err
    assert (out_dir / "manifest.json").read_text() == before  # untouched
    rc, out, _ = _pack(capsys, corpus / "in", "-o", out_dir, "--overwrite", "--max-tokens-per-file", "8")
    assert rc == 0 and ShardReader(out_dir).manifest["settings"]["max_tokens_per_file"] == 8
    assert len(ShardReader(out_dir).manifest["files"]) > 1

    other = corpus / "other"
    other.mkdir()
    (other / "keep.txt").write_text("not a pack")
    rc, _, err = _pack(capsys, corpus / "docs.jsonl", "-o", other)
    assert rc == 1 and "holds other files" in err and (other / "keep.txt").exists()


def test_an_error_midway_leaves_nothing_behind(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "a.txt").write_text("fine")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "z.parquet")  # packed after a.txt, fails
    rc, _, err = _pack(capsys, tmp_path / "a.txt", tmp_path / "z.parquet", "-o", tmp_path / "out")
    assert rc == 1 and "z.parquet: no column 'text'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "z.parquet"]


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    rc, _, err = _pack(capsys, tmp_path / "missing.jsonl", "-o", tmp_path / "out")
    assert rc == 1 and err.strip() == f"qwen25: error: {tmp_path / 'missing.jsonl'}: no such file or directory"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"\x00")
    rc, _, err = _pack(capsys, tmp_path / "d", "-o", tmp_path / "out")
    assert rc == 1 and "no files match --include" in err
    (tmp_path / "f.txt").write_text("x")
    rc, _, err = _pack(capsys, tmp_path / "d", "-o", tmp_path / "f.txt", "--include", "*.bin")
    assert rc == 1 and "is not a directory" in err
    rc, _, err = _pack(capsys, tmp_path / "f.txt", "-o", tmp_path / "out", "--tokenizer", str(tmp_path / "nope"))
    assert rc == 1 and "nope" in err and "\n" not in err.strip()
    assert not (tmp_path / "out").exists()


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit):
        cli_main(["data", "pack", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "--text-field" in text and "--overwrite" in text and "qwen25 data pack" in text
