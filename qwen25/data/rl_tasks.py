"""Verifiable RL tasks: GSM8K-style math from reasoning-gym's generators, as fixed-seed train / held-out jsonl.

reasoning-gym (Apache-2.0) ships 100 GSM-symbolic problem generators (`reasoning_gym/arithmetic/gsm_symbolic/
generators_00_49.py`, `generators_50_99.py`), each `generate_<k>(rng: random.Random, difficulty) -> {"question",
"answer", "metadata": {"answer_cot", ...}}`, needing only the standard library and two helpers of
`reasoning_gym/utils.py`. `ReasoningGymSource` reads those files straight out of the package file that
`pip download --no-deps reasoning-gym` leaves (a wheel, an sdist or an unpacked directory) without installing it
or its dependencies: the helpers' source and each generator file are executed into private namespaces (that is
running the package's code, as importing it would; only these stdlib-only files are run). The generators the
package itself marks as good (`tasks_ok` in gsm_symbolic.py) are used.

`build_gsm_splits(source, n_train, n_heldout, seed)`: the held-out split is drawn first, then the train split;
draw j of a split takes the next generator from `Random(f"{seed}:{split}").choice(ok)` and runs it with its own
`Random(f"{seed}:{split}:{j}")`, so the files are the same on every machine. A train question that also appears in the held-out split
is dropped (counted), as is a draw the generator itself refuses (it raises on an unlucky number, counted).

Each record: {"id", "task": "gsm_symbolic", "prompt", "messages": [{"role": "user", "content": prompt}],
"answer", "solution" (the step-by-step solution ending in "#### N"), "generator", "source"}. The prompt is
the question plus Qwen2.5-Math's instruction to reason step by step and put the final answer in \\boxed{};
`answer` is what `qwen25.train.rewards.MathAnswerReward` checks.
"""

from __future__ import annotations

import ast
import gzip
import io
import random
import re
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["GSM_INSTRUCTION", "ReasoningGymSource", "build_gsm_splits", "gsm_record"]

GSM_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_GENERATOR_FILES = ("generators_00_49.py", "generators_50_99.py")
_GSM_DIR = "reasoning_gym/arithmetic/gsm_symbolic/"
_UTILS_IMPORT = re.compile(r"^from reasoning_gym\.utils import [^\n]+$", re.MULTILINE)


class ReasoningGymSource:
    """Files of a reasoning-gym wheel (.whl), sdist (.tar.gz) or unpacked directory, read without installing."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file; get it with `pip download --no-deps reasoning-gym "
                                    "-d DIR` and pass the .whl (or .tar.gz)")
        self._members = self._index()
        self._generators: dict[int, Callable[..., dict[str, Any]]] | None = None

    def _index(self) -> dict[str, str]:
        """package-relative name (reasoning_gym/...) -> member name in the archive (or file path)."""
        if self.path.is_dir():
            names = [str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()]
        elif zipfile.is_zipfile(self.path):
            with zipfile.ZipFile(self.path) as z:
                names = z.namelist()
        elif tarfile.is_tarfile(self.path):
            with tarfile.open(self.path) as t:
                names = [m.name for m in t.getmembers() if m.isfile()]
        else:
            raise ValueError(f"{self.path}: not a wheel, sdist or directory of reasoning-gym")
        index = {}
        for name in names:
            at = name.find("reasoning_gym/")
            if at >= 0:
                index.setdefault(name[at:], name)
        if f"{_GSM_DIR}{_GENERATOR_FILES[0]}" not in index:
            raise ValueError(f"{self.path}: holds no {_GSM_DIR}{_GENERATOR_FILES[0]}; is it reasoning-gym?")
        return index

    def read_bytes(self, name: str) -> bytes:
        """A file of the package by its name under reasoning_gym/ (KeyError when absent)."""
        member = self._members.get(name)
        if member is None:
            raise KeyError(f"{self.path} has no {name}")
        if self.path.is_dir():
            return (self.path / member).read_bytes()
        if zipfile.is_zipfile(self.path):
            with zipfile.ZipFile(self.path) as z:
                return z.read(member)
        with tarfile.open(self.path) as t:
            f = t.extractfile(member)
            assert f is not None
            return f.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def version(self) -> str:
        match = re.search(r"reasoning_gym-([\w.]+?)(?:-py|\.tar|$)", self.path.name)
        return match.group(1) if match else self.path.name

    def ok_generators(self) -> list[int]:
        """The generator numbers gsm_symbolic.py lists in `tasks_ok` (all that exist when it lists none)."""
        tree = ast.parse(self.read_text(f"{_GSM_DIR}gsm_symbolic.py")) if f"{_GSM_DIR}gsm_symbolic.py" in \
            self._members else None
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "tasks_ok" for t in node.targets):
                ok = [int(k) for k in ast.literal_eval(node.value)]
                return [k for k in ok if k in self.generators()]
        return sorted(self.generators())

    def generators(self) -> dict[int, Callable[..., dict[str, Any]]]:
        """generate_<k> functions by k, loaded once."""
        if self._generators is None:
            helpers: dict[str, Any] = {"__name__": "reasoning_gym_utils"}
            exec(compile(self.read_text("reasoning_gym/utils.py"), "reasoning_gym/utils.py", "exec"), helpers)
            found: dict[int, Callable[..., dict[str, Any]]] = {}
            for filename in _GENERATOR_FILES:
                name = f"{_GSM_DIR}{filename}"
                if name not in self._members:
                    continue
                source = _UTILS_IMPORT.sub("", self.read_text(name))
                namespace = {k: v for k, v in helpers.items() if not k.startswith("__")}
                namespace["__name__"] = f"reasoning_gym_{filename[:-3]}"
                exec(compile(source, name, "exec"), namespace)
                found |= {int(k[len("generate_"):]): v for k, v in namespace.items()
                          if k.startswith("generate_") and k[len("generate_"):].isdigit()}
            if not found:
                raise ValueError(f"{self.path}: the generator files define no generate_<k> functions")
            self._generators = found
        return self._generators


def gsm_record(raw: dict[str, Any], split: str, index: int, generator: int, source: str) -> dict[str, Any]:
    """One jsonl record from a generator's output (see the module docstring)."""
    question = str(raw["question"]).strip()
    prompt = f"{question}\n{GSM_INSTRUCTION}"
    metadata = raw.get("metadata") or {}
    return {"id": f"gsm-{split}-{index}", "task": "gsm_symbolic", "prompt": prompt,
            "messages": [{"role": "user", "content": prompt}], "answer": str(raw["answer"]),
            "solution": metadata.get("answer_cot", ""), "generator": generator, "source": source}


def build_gsm_splits(source: ReasoningGymSource, n_train: int, n_heldout: int, seed: int = 0,
                     difficulty: float = 1.0) -> tuple[list[dict], list[dict], Counter]:
    """(train records, held-out records, counters: generated, refused, duplicates_dropped)."""
    if n_train < 0 or n_heldout < 0 or n_train + n_heldout == 0:
        raise ValueError(f"need n_train, n_heldout >= 0 and at least one example, got {n_train}, {n_heldout}")
    generators, ok = source.generators(), source.ok_generators()
    stats: Counter = Counter()
    tag = f"reasoning-gym {source.version()}"
    splits: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for split, n in (("heldout", n_heldout), ("train", n_train)):
        pick = random.Random(f"{seed}:{split}")
        records: list[dict] = []
        attempt = 0
        while len(records) < n:
            if attempt > 20 * n + 100:
                raise ValueError(f"could draw only {len(records)} of {n} distinct {split} problems; ask for fewer")
            k = pick.choice(ok)
            rng = random.Random(f"{seed}:{split}:{attempt}")
            attempt += 1
            try:
                raw = generators[k](rng, difficulty)
            except Exception:  # noqa: BLE001 - a generator may refuse a draw (e.g. an answer with 3 decimals)
                stats["refused"] += 1
                continue
            record = gsm_record(raw, split, len(records), k, tag)
            key = record["prompt"]
            if key in seen:
                stats["duplicates_dropped"] += 1
                continue
            seen.add(key)
            records.append(record)
            stats["generated"] += 1
        splits[split] = records
    return splits["train"], splits["heldout"], stats


def read_codeio(source: ReasoningGymSource) -> list[dict[str, Any]]:
    """The records of reasoning_gym/data/codeio.jsonl.gz."""
    import json

    with gzip.open(io.BytesIO(source.read_bytes("reasoning_gym/data/codeio.jsonl.gz")), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
