"""Format reward: 1.0 when the completion matches a regular expression, else 0.0.

`FormatReward(pattern)` uses `re.search` (`fullmatch=True`: the whole completion, surrounding whitespace
stripped), compiled with DOTALL so `.` crosses lines. Presets (`FormatReward.preset(name)`):
    boxed        the completion puts an answer in \\boxed{...}
    gsm          a line "#### <number>" (GSM8K's answer marker)
    think        <think>...</think> then an answer (the R1-style reasoning format)
    code-block   a fenced ```python block
A bad pattern is a ValueError when the reward is built, not a failure at scoring time.
"""

from __future__ import annotations

import re

__all__ = ["FORMAT_PRESETS", "FormatReward"]

FORMAT_PRESETS = {
    "boxed": r"\\boxed\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}",
    "gsm": r"(?m)^####\s*-?[\d,]+(?:\.\d+)?\s*$",
    "think": r"^\s*<think>.+?</think>\s*\S",
    "code-block": r"```(?:python|py)\n.*?\n```",
}


class FormatReward:
    """A regex check (see the module docstring)."""

    def __init__(self, pattern: str, name: str = "format", fullmatch: bool = False) -> None:
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as e:
            raise ValueError(f"format reward: bad regular expression {pattern!r} ({e})") from None
        self.name, self.pattern, self.fullmatch = name, pattern, fullmatch

    @classmethod
    def preset(cls, preset: str, name: str | None = None) -> FormatReward:
        if preset not in FORMAT_PRESETS:
            raise ValueError(f"format preset {preset!r}: use one of {', '.join(FORMAT_PRESETS)} or a pattern")
        return cls(FORMAT_PRESETS[preset], name or f"format_{preset.replace('-', '_')}")

    def __call__(self, prompts: list[str], completions: list[str], examples: list[dict]) -> list[float]:
        match = self.regex.fullmatch if self.fullmatch else self.regex.search
        return [1.0 if match(c.strip() if self.fullmatch else c) else 0.0 for c in completions]
