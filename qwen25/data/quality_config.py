"""The `[quality]` table of a data run: the model judge and the fast classifier trained on its scores."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QualityConfig"]


@dataclass
class QualityConfig:
    enabled: bool = False
    # a Qwen2.5 instruct model (name, .gguf or HF directory); the 0.5B scored clean text and junk alike (3.18 vs
    # 3.18 on tests/test_data_quality.py's set), the 1.5B apart (2.45 vs 1.23)
    judge_model: str = "qwen2.5-coder-1.5b-instruct"
    judge_samples: int = 256  # documents the judge scores (a seeded sample of those left after dedup)
    judge_doc_tokens: int = 384  # a document is cut to this many tokens inside the rubric prompt
    judge_batch_tokens: int = 4096  # prompts packed into one prefill row of at most this many tokens
    judge_dtype: str = "float32"
    features: int = 1 << 18  # hashed word 1- and 2-gram features of the classifier
    l2: float = 1.0  # ridge penalty of the classifier
    threshold: float = 2.0  # documents the classifier scores below this are removed
    classifier: str = ""  # a classifier .npz from an earlier run: use it, skip the judge

    def __post_init__(self) -> None:
        if self.judge_samples < 2 or self.judge_doc_tokens < 16 or self.features < 16:
            raise ValueError("quality: judge_samples >= 2, judge_doc_tokens >= 16 and features >= 16 are needed")
        if not 0 <= self.threshold <= 5:
            raise ValueError(f"quality.threshold must be in [0, 5], got {self.threshold}")
