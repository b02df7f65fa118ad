"""What the evaluation tasks run on: qwen25 itself, or llama.cpp (llama-cpp-python) as a reference.

Both backends take token ids built by *our* tokenizer, so they see identical prompts, and decode greedily.
A backend offers three operations:
- `generate(prompts, max_tokens, stop, stop_token_ids)`: greedy completions (text cut at the first stop string,
  like vLLM/`LLM.generate`; generation ends at any stop token id, which is not part of the output);
- `next_token_logits(ids)`: the logits after the last token (multiple-choice scoring);
- `nll(ids, n_score)`: the summed negative log-likelihood (nats) of the last `n_score` tokens of `ids` given
  everything before them (perplexity).

llama-cpp-python is not a dependency of qwen25: it is imported only when `--backend llamacpp` is chosen. Its
greedy loop is ours (argmax over the logits llama.cpp returns), so no llama.cpp sampler setting can differ.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from qwen25.tokenizer import Tokenizer


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    seconds: float  # wall time of the call that produced it (shared by a batch)
    batch_size: int = 1


class Backend:
    name = "?"
    tokenizer: Tokenizer
    model_path: str

    def generate(self, prompts: list[list[int]], max_tokens: int, stop: list[str],
                 stop_token_ids: list[int]) -> list[Generation]:
        raise NotImplementedError

    def next_token_logits(self, ids: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def nll(self, ids: list[int], n_score: int) -> float:
        raise NotImplementedError

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model_path": self.model_path}


class Qwen25Backend(Backend):
    name = "qwen25"

    def __init__(self, model: str, dtype: str = "float32", **llm_kwargs: Any) -> None:
        """llm_kwargs: further `LLM` arguments (engine_kwargs, rope_scaling, dual_chunk_attention_config)."""
        from qwen25 import LLM

        self.llm = LLM(model, dtype=dtype, **llm_kwargs)
        self.tokenizer = self.llm.tokenizer
        self.model_path = str(self.llm.path)
        self.max_context = self.llm.engine_kwargs.get("max_model_len") or self.llm.max_context

    def generate(self, prompts: list[list[int]], max_tokens: int, stop: list[str],
                 stop_token_ids: list[int]) -> list[Generation]:
        from qwen25 import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=max_tokens, stop=list(stop),
                                stop_token_ids=list(stop_token_ids))
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        return [Generation(o.outputs[0].text, list(o.outputs[0].token_ids), o.outputs[0].finish_reason, seconds,
                           len(prompts)) for o in outputs]

    @torch.inference_mode()
    def next_token_logits(self, ids: list[int]) -> torch.Tensor:
        logits = self.llm.model(torch.tensor([ids], dtype=torch.long), logits_to_keep=1)
        return logits[0, -1].float()

    @torch.inference_mode()
    def nll(self, ids: list[int], n_score: int) -> float:
        if not 0 < n_score < len(ids):
            raise ValueError(f"n_score must be in [1, {len(ids) - 1}], got {n_score}")
        logits = self.llm.model(torch.tensor([ids], dtype=torch.long), logits_to_keep=n_score + 1)[0, :-1]
        targets = torch.tensor(ids[-n_score:], dtype=torch.long)
        return float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))


class LlamaCppBackend(Backend):
    """llama.cpp on the same GGUF file. `logits_all` (every position's logits) is needed for perplexity only."""

    name = "llamacpp"

    def __init__(self, model: str, n_ctx: int = 8192, logits_all: bool = False, threads: int | None = None) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ImportError("--backend llamacpp needs llama-cpp-python, which qwen25 does not install: "
                              "pip install llama-cpp-python") from None
        from qwen25.checkpoint import load_tokenizer
        from qwen25.weights.registry import resolve_model

        path = resolve_model(model)
        if path.is_dir() or path.suffix != ".gguf":
            raise ValueError(f"--backend llamacpp needs a .gguf model, got {path}")
        self.model_path = str(path)
        self.tokenizer = load_tokenizer(path)
        self.logits_all = logits_all
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, logits_all=logits_all,
                         n_threads=threads or os.cpu_count() or 1, verbose=False, seed=0)
        self.n_vocab = self.llm.n_vocab()
        self.max_context = n_ctx

    def _last_logits(self) -> torch.Tensor:
        import numpy as np

        if self.logits_all:
            row = self.llm.scores[self.llm.n_tokens - 1]
        else:  # only the last position was requested from llama.cpp: it is the only output row
            row = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))
        return torch.from_numpy(np.array(row, dtype=np.float32, copy=True))

    def _eval(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def generate(self, prompts: list[list[int]], max_tokens: int, stop: list[str],
                 stop_token_ids: list[int]) -> list[Generation]:
        stop_ids = set(stop_token_ids) | self.tokenizer.stop_token_ids
        out = []
        for ids in prompts:
            start = time.perf_counter()
            budget = min(max_tokens, self.max_context - len(ids))
            if budget <= 0:
                raise ValueError(f"prompt has {len(ids)} tokens; the llama.cpp context is {self.max_context}")
            self._eval(ids)
            tokens: list[int] = []
            text, reason = "", "length"
            for _ in range(budget):
                token = int(torch.argmax(self._last_logits()))
                if token in stop_ids:
                    reason = "stop"
                    break
                tokens.append(token)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                hits = [text.find(s) for s in stop if s in text]
                if hits:
                    text, reason = text[: min(hits)], "stop"
                    break
                if len(tokens) < budget:
                    self.llm.eval([token])
            if reason == "length":
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            out.append(Generation(text, tokens, reason, time.perf_counter() - start, 1))
        return out

    def next_token_logits(self, ids: list[int]) -> torch.Tensor:
        self._eval(ids)
        return self._last_logits()

    def nll(self, ids: list[int], n_score: int) -> float:
        if not self.logits_all:
            raise RuntimeError("nll needs a llama.cpp backend created with logits_all=True")
        if not 0 < n_score < len(ids):
            raise ValueError(f"n_score must be in [1, {len(ids) - 1}], got {n_score}")
        self._eval(ids)
        scores = torch.from_numpy(self.llm.scores[len(ids) - n_score - 1: len(ids) - 1].astype("float32"))
        targets = torch.tensor(ids[-n_score:], dtype=torch.long)
        return float(torch.nn.functional.cross_entropy(scores, targets, reduction="sum"))


def make_backend(name: str, model: str, *, dtype: str = "float32", n_ctx: int = 8192, logits_all: bool = False,
                 threads: int | None = None, llm_kwargs: dict[str, Any] | None = None) -> Backend:
    if name == "qwen25":
        return Qwen25Backend(model, dtype=dtype, **(llm_kwargs or {}))
    if name == "llamacpp":
        return LlamaCppBackend(model, n_ctx=n_ctx, logits_all=logits_all, threads=threads)
    raise ValueError(f"unknown backend {name!r} (choose qwen25 or llamacpp)")
