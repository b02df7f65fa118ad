"""Model-free stand-ins for the evaluation tests (a byte tokenizer and scripted backends), plus their own checks.

Imported by the other tests/test_eval_*.py files as `test_eval_fakes` (pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from qwen25.eval.backends import Backend, Generation


class ByteTokenizer:
    """One token per UTF-8 byte; no special tokens and no chat template (ChatML is rendered as text)."""

    chat_template = None
    stop_token_ids: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:  # noqa: ANN001
        return bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        return None


class ScriptedBackend(Backend):
    """Answers each prompt with reply(prompt_text); optionally cuts at the stop strings like a real backend.

    calls: how many prompts it was asked to complete (resume tests check that finished samples are skipped)."""

    name = "scripted"

    def __init__(self, reply: Callable[[str], str], stops: bool = True,
                 fail_after: int | None = None) -> None:
        self.reply = reply
        self.stops = stops
        self.fail_after = fail_after
        self.tokenizer = ByteTokenizer()
        self.model_path = "scripted"
        self.calls = 0

    def _tick(self) -> None:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interrupt")
        self.calls += 1

    def generate(self, prompts, max_tokens, stop, stop_token_ids):  # noqa: ANN001
        out = []
        for ids in prompts:
            self._tick()
            text = self.reply(self.tokenizer.decode(ids))
            if self.stops:
                hits = [text.find(s) for s in stop if s in text]
                text = text[: min(hits)] if hits else text
            out.append(Generation(text, list(text.encode()), "stop", 0.01, len(prompts)))
        return out


class LogitBackend(Backend):
    """next_token_logits / nll from a function of the token ids (MMLU and perplexity tests)."""

    name = "logits"

    def __init__(self, logits_fn: Callable[[list[int]], torch.Tensor] | None = None,
                 nll_fn: Callable[[list[int], int], float] | None = None, fail_after: int | None = None) -> None:
        self.logits_fn = logits_fn
        self.nll_fn = nll_fn
        self.fail_after = fail_after
        self.tokenizer = ByteTokenizer()
        self.model_path = "logits"
        self.calls = 0

    def _tick(self) -> None:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interrupt")
        self.calls += 1

    def next_token_logits(self, ids):  # noqa: ANN001
        self._tick()
        return self.logits_fn(ids)

    def nll(self, ids, n_score):  # noqa: ANN001
        self._tick()
        return self.nll_fn(ids, n_score)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo ```")) == "héllo ```"


def test_scripted_backend_cuts_at_the_first_stop():
    backend = ScriptedBackend(lambda p: "a\n#b\n```c")
    [gen] = backend.generate([[1]], 10, ["\n```", "\n#"], [])
    assert gen.text == "a"
