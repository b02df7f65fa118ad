"""Heuristic filters and ingest.

Gopher quality and repetition are checked against datatrove's GopherQualityFilter / GopherRepetitionFilter (the
reference, when installed with spaCy) on real prose (the licence texts every Debian system ships) and on
planted junk: the keep/remove decisions agree. C4 line rules, code rules and language ID are checked on
documents built to trip one rule each, with the expected outcome worked out from the rule's definition.
Ingest: ids, sources and metadata from text, jsonl and parquet; malformed records reported with file and line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from qwen25.data.filters import (FilterConfig, apply_filters, c4_lines, code_rules, gopher_quality,
                                 gopher_repetition, load_langid)
from qwen25.data.ingest import Document, Malformed, iter_documents

LICENSES = sorted(Path("/usr/share/common-licenses").glob("*"))


def _junk() -> list[str]:
    rng = random.Random(0)
    return [
        "Buy cheap watches online at the best price. " * 40,  # top n-grams
        " ".join("".join(rng.choice("qxzvkjw") for _ in range(rng.randint(1, 3))) for _ in range(300)),  # short
        "\n".join(f"- item number {i} in the list of things" for i in range(80)),  # bullets
        "\n".join(f"and then the story continues with more {i}..." for i in range(80)),  # ellipsis lines
        " ".join(f"#tag{i} #viral #follow the best of it" for i in range(60)),  # hashes
        ("The quick brown fox jumps over the lazy dog near the river bank today.\n\n" * 30),  # repeated paragraphs
        " ".join(f"{rng.randrange(10**6)} {rng.randrange(10**6)} the of" for _ in range(100)),  # non-alphabetic
    ]


def test_gopher_filters_decide_like_datatrove():
    pytest.importorskip("spacy")
    filters = pytest.importorskip("datatrove.pipeline.filters")
    from datatrove.data import Document as DTDocument

    prose = [p.read_text(errors="replace")[:20000] for p in LICENSES if p.is_file()]
    docs = [t for t in prose if len(t.split()) > 60] + _junk()
    assert len(docs) >= 10
    cfg = FilterConfig()
    q, r = filters.GopherQualityFilter(), filters.GopherRepetitionFilter()
    disagree = []
    for i, text in enumerate(docs):
        doc = DTDocument(text=text, id=str(i))
        theirs = q.filter(doc) is True and r.filter(doc) is True
        ours = gopher_quality(text, cfg) is None and gopher_repetition(text, cfg) is None
        if theirs != ours:
            disagree.append(text[:60])
    print(f"\nGopher decisions: {len(docs) - len(disagree)}/{len(docs)} agree with datatrove; differ on {disagree}")
    # the one known difference: datatrove counts punctuation tokens as words (an '=====' rule line is 5 words
    # with no letter), so a licence underlined with '=' fails its alphabetic-words rule
    assert len(disagree) <= 1 and all("=" in t or "Mozilla" in t for t in disagree)
    assert all(gopher_quality(t, cfg) is not None or gopher_repetition(t, cfg) is not None for t in _junk())


def test_each_gopher_rule_by_construction():
    cfg = FilterConfig()
    words49 = " ".join(["the cat sat"] * 16) + " down"
    assert gopher_quality(words49, cfg) == "min_doc_words"  # 49 words < 50
    assert gopher_quality(" ".join(["the", "of"] * 40), cfg) == "min_avg_word_length"  # mean 2.5 < 3
    assert gopher_quality(" ".join(["incomprehensibilities", "the"] * 30), cfg) == "max_avg_word_length"  # 12
    assert gopher_quality("the house of the rising sun # " * 20, cfg) == "max_symbol_word_ratio"  # 1 in 7 > 0.1
    assert gopher_quality(" ".join(["running", "jumping", "walking"] * 30), cfg) == "min_stop_words"
    repeated_lines = "\n".join(["this line is repeated over and over", "another line of the text"] * 10)
    assert gopher_repetition(repeated_lines, cfg) == "dup_line_frac"  # 18 of 20 lines repeat


def test_c4_line_rules():
    cfg = FilterConfig()
    page = "\n".join([
        "Home | About | Contact",  # no terminal punctuation: dropped
        "Please enable JavaScript to view the comments.",  # javascript: dropped
        "This site uses cookies to improve your experience.",  # policy: dropped
        "Ok.",  # fewer than 3 words: dropped
    ] + [f"Sentence number {i} of the article says something useful." for i in range(6)])
    text, why = c4_lines(page, cfg)
    assert why is None and text.splitlines() == [f"Sentence number {i} of the article says something useful."
                                                 for i in range(6)]
    assert c4_lines("Four sentences here. Two. Three. Four.", cfg)[1] == "min_sentences"
    assert c4_lines(page + "\nLorem ipsum dolor sit amet.", cfg)[1] == "lorem_ipsum"
    assert c4_lines(page + "\nfunction f() { return 1; }.", FilterConfig(c4_curly_bracket=True))[1] == "curly_bracket"


def test_code_rules_and_routing():
    cfg = FilterConfig()
    assert code_rules("x = 1\n" + "y" * 1001 + "\n", cfg) == "max_line_length"
    assert code_rules("\n".join(["z" * 150] * 10), cfg) == "mean_line_length"
    assert code_rules("x = 1\n" + "}{)(][;:,.\n" * 20, cfg) == "alnum_frac"  # 2 of 226 characters
    assert code_rules("# Code generated by protoc. DO NOT EDIT.\nx = 1\n", cfg) == "auto_generated"
    assert code_rules("def f(x):\n    return x + 1\n", cfg) is None
    # a .py file goes through the code rules only: prose rules would reject this short file
    assert apply_filters("pkg/mod.py", "def f(x):\n    return x + 1\n", {}, cfg, None) == (
        "def f(x):\n    return x + 1\n", None)
    assert apply_filters("notes.txt", "def f(x):\n    return x + 1\n", {}, cfg, None)[1].startswith("c4:")


def test_language_id_with_the_model_from_its_wheel():
    langid = load_langid()
    if langid is None:
        pytest.skip("py3langid is not installed: the language-ID filter is skipped (the report says so)")
    english = ("The committee met on Tuesday to review the budget for the coming year. Several members raised "
               "concerns about the cost of repairing the old bridge. After a long discussion, they agreed to ask "
               "engineers for a second opinion. The mayor thanked everyone for their patience and hard work. A "
               "final decision is expected next month, once the new estimates have been published. Residents "
               "may send their comments by letter or attend the public hearing in the town hall.")
    french = ("Le conseil municipal s'est réuni mardi pour examiner le budget de l'année prochaine. Plusieurs "
              "membres ont exprimé des inquiétudes sur le coût de la réparation du vieux pont. Après une longue "
              "discussion, ils ont décidé de demander un second avis aux ingénieurs. Le maire a remercié tout le "
              "monde pour sa patience et son travail. Une décision finale est attendue le mois prochain, une fois "
              "les nouvelles estimations publiées. Les habitants peuvent envoyer leurs remarques par courrier.")
    cfg = FilterConfig()
    assert langid(english)[0] == "en" and langid(french)[0] == "fr"
    assert apply_filters("a.txt", english, {}, cfg, langid)[1] is None
    assert apply_filters("b.txt", french, {}, cfg, langid)[1] == "gopher_quality:min_stop_words"  # English stop words
    no_stop = FilterConfig(min_stop_words=0)
    assert apply_filters("b.txt", french, {}, no_stop, langid)[1] == "langid:language"
    assert apply_filters("b.txt", french, {}, FilterConfig(min_stop_words=0, languages=["en", "fr"]), langid)[1] is None


def test_ingest_keeps_ids_sources_metadata_and_reports_malformed_records(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first text file")
    (tmp_path / "d" / "empty.txt").write_text("  \n")
    (tmp_path / "d" / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "x.jsonl").write_text("\n".join([
        json.dumps({"text": "one", "id": 7, "source": "web", "url": "u"}), "{broken", json.dumps([1, 2]),
        json.dumps({"text": 5}), json.dumps({"text": "two"})]) + "\n")
    pq.write_table(pa.table({"text": ["p1", None], "lang": ["en", "fr"]}), tmp_path / "t.parquet")
    items = [item for item, _ in iter_documents([{"path": str(tmp_path / "d"), "source": "notes"},
                                                 str(tmp_path / "x.jsonl"), str(tmp_path / "t.parquet")])]
    docs = [i for i in items if isinstance(i, Document)]
    bad = [str(i) for i in items if isinstance(i, Malformed)]
    assert [(d.id, d.source, d.text) for d in docs] == [("a.txt", "notes", "first text file"), ("7", "web", "one"),
                                                        ("x.jsonl:5", "x", "two"), ("t.parquet:1", "t", "p1")]
    assert docs[1].metadata == {"url": "u"} and docs[3].metadata == {"lang": "en"}
    assert items.count(None) == 1  # the empty file
    assert bad[0].endswith("bin.txt: not UTF-8 text (invalid start byte)")
    assert [b.split(str(tmp_path))[1] for b in bad[1:]] == [
        "/x.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "/x.jsonl:3: expected a JSON object, got list", "/x.jsonl:4: no 'text' string field (it holds int)",
        "/t.parquet:2: 'text' is NoneType"]
