"""Model-based quality: a Qwen2.5 instruct model on qwen25's engine rates documents 0-5, and a fast classifier
(`qwen25.data.classifier`) learns its scores and rates the whole corpus.

The judge sees a fixed rubric (`RUBRIC`, below) with the document cut to `judge_doc_tokens` tokens, rendered with
the model's chat template (content kept as plain text), and is asked for one digit. Its score is read from the
logits of the first answer token: the engine runs each prompt's prefill and, with greedy settings and
max_tokens=1, a per-request logits processor records the logits of the tokens "0".."5" before the (discarded)
greedy pick; the score is the expectation over those six under their softmax. No sampling, one prefill per
document, the engine batching them (continuous batching, chunked prefill).

In a run (`prepare_classifier`), a seeded sample of `judge_samples` documents kept by dedup is judged; 80% of it
trains the classifier, the other 20% measures its Spearman correlation with the judge (reported, with the
judge's documents/s). The judged scores and the classifier are kept in the work directory, so a resumed run
does not judge again; a `classifier` path in the config skips the judge altogether.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen25.data import stages
from qwen25.data.classifier import HashedLinear, spearman

__all__ = ["RUBRIC", "Judge", "prepare_classifier"]

RUBRIC = """You rate text extracts as training data for a language model that should write clearly, explain well \
and program well. Reply to each extract with a single digit from 0 to 5 and nothing else:
0: gibberish, spam, keyword lists, or navigation and boilerplate with no real content.
1: mostly boilerplate, advertising or fragments, with little readable content.
2: readable but shallow, disorganised or trivial.
3: coherent and informative prose, or working code of ordinary quality.
4: clear, well-structured explanation, good literature, or clean documented code.
5: outstanding: textbook-quality teaching, classic literature, or exemplary code."""

# Worked examples shown before each document, as earlier turns of the conversation (written for this rubric;
# a 0.5B judge follows demonstrated scores far better than the scale alone).
EXAMPLES = [
    ("Home | Products | Cart | Login | Register | Terms | Privacy | Sitemap | Follow us | Subscribe", 0),
    ("best cheap shoes sale cheap shoes online shoes discount buy shoes now free shipping shoes shoes", 0),
    ("x7#kq 0pz!! mmv r9 aa aa qq 4 /// lkj8 zz", 0),
    ("Great post!! thanks for sharing. click the link in my profile to win a free phone", 1),
    ("def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b", 3),
    ("Photosynthesis converts light energy into chemical energy. In the chloroplasts, water is split and "
     "carbon dioxide is fixed into sugars, releasing oxygen as a by-product.", 4),
    ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
     "foolishness, it was the epoch of belief, it was the epoch of incredulity.", 5),
]


class Judge:
    """A Qwen2.5 instruct model scoring documents 0-5 from the logits of the digit tokens."""

    def __init__(self, model: str, dtype: str = "float32", doc_tokens: int = 384, max_num_seqs: int = 8):
        from qwen25 import LLM

        self.llm = LLM(model, dtype=dtype, engine_kwargs={"max_num_seqs": max_num_seqs})
        self.tokenizer = self.llm.tokenizer
        self.doc_tokens = doc_tokens
        self.score_ids = [self.tokenizer.token_to_id(str(d)) for d in range(6)]
        if None in self.score_ids:
            raise ValueError(f"{model}: the tokenizer has no single token for each digit 0-5")

    def prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)[: self.doc_tokens]
        document = self.tokenizer.decode(ids)
        messages = [{"role": "system", "content": RUBRIC}]
        for example, score in EXAMPLES:
            messages += [{"role": "user", "content": f"Extract:\n{example}"},
                         {"role": "assistant", "content": str(score)}]
        messages.append({"role": "user", "content": f"Extract:\n{document}"})
        prompt = self.llm.chat_prompt(messages)
        return prompt.token_ids(self.tokenizer)

    @torch.inference_mode()
    def probabilities(self, texts: list[str], on_done: Any = None) -> np.ndarray:
        """(len(texts), 6): the softmax over the digit tokens' logits of each document's first answer token."""
        from qwen25 import SamplingParams

        engine = self.llm.engine
        out = np.full((len(texts), 6), np.nan)
        score_ids = torch.tensor(self.score_ids)

        def capture(i: int) -> Any:
            def processor(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
                out[i] = torch.softmax(logits.reshape(-1)[score_ids].float(), 0).numpy()
                return logits
            return processor

        for i, text in enumerate(texts):
            params = SamplingParams(temperature=0.0, max_tokens=1, logits_processors=[capture(i)])
            engine.add_request(f"judge-{i}", self.prompt_ids(text), params)
        while engine.has_unfinished_requests():
            for step in engine.step():
                if step.finish_reason is not None and on_done is not None:
                    on_done(1)
        if np.isnan(out).any():
            raise RuntimeError("the engine finished a judge request without its logits")
        return out

    def scores(self, texts: list[str], on_done: Any = None) -> np.ndarray:
        """Expected score sum_d d * p(d) of each document, in [0, 5]."""
        return self.probabilities(texts, on_done) @ np.arange(6.0)


def prepare_classifier(cfg: Any, work: Path, keep: dict[str, list[int]], progress: bool) -> dict[str, Any]:
    """Judge a sample, train the classifier, measure agreement; returns what the manifest reports and the
    classifier's path (under "classifier")."""
    q = cfg.quality
    (work / "quality").mkdir(exist_ok=True)
    if q.classifier:
        return {"classifier": q.classifier, "source": "given classifier", "threshold": q.threshold}
    info_path, model_path = work / "quality" / "info.json", work / "quality" / "classifier.npz"
    if info_path.is_file() and model_path.is_file():
        return json.loads(info_path.read_text())
    positions = [(int(s), i) for s, rows in sorted(keep.items(), key=lambda kv: int(kv[0])) for i in rows]
    rng = random.Random(cfg.seed)
    sample = sorted(rng.sample(positions, min(q.judge_samples, len(positions))))
    if len(sample) < 5:
        raise ValueError(f"quality: only {len(sample)} documents left after dedup; the judge needs at least 5")
    texts = []
    cache: dict[int, list[dict[str, Any]]] = {}
    for s, i in sample:
        cache.setdefault(s, stages.read_jsonl(work / "filter" / f"{stages.shard_name(s)}.jsonl"))
        texts.append(cache[s][i]["text"])
    from tqdm import tqdm

    judge = Judge(q.judge_model, q.judge_dtype, q.judge_doc_tokens)
    start = time.perf_counter()
    with tqdm(total=len(texts), desc="   judge", unit="doc", disable=not progress or None) as bar:
        scores = judge.scores(texts, bar.update)
    seconds = time.perf_counter() - start
    order = list(range(len(texts)))
    rng.shuffle(order)
    held = sorted(order[: max(2, len(order) // 5)])
    train = sorted(order[len(held):])
    model = HashedLinear(q.features, q.l2).fit([texts[i] for i in train], [float(scores[i]) for i in train])
    predicted = model.predict([texts[i] for i in held])
    truth = scores[held]
    model.save(model_path)
    info = {"classifier": str(model_path), "judge_model": q.judge_model, "judged_documents": len(texts),
            "judge_mean_score": round(float(scores.mean()), 4),
            "classifier_spearman_heldout": round(spearman(predicted, truth), 4),
            "classifier_within_1_heldout": round(float(np.mean(np.abs(predicted - truth) <= 1.0)), 4),
            "heldout_documents": len(held), "threshold": q.threshold}
    stages.write_json(work / "quality" / "judged.json", {"documents": [list(p) for p in sample],
                                                          "scores": [round(float(s), 6) for s in scores]})
    stages.write_json(info_path, info)
    stages.write_json(work / "quality" / "timing.json", {"judge_seconds": seconds,
                                                         "judge_docs_per_s": len(texts) / seconds})
    return info
