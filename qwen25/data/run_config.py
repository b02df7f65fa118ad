"""The config of `qwen25 data run CONFIG`: a TOML or JSON file whose tables are the dataclasses below.

    inputs = ["corpus/", {path = "web.jsonl", source = "web"}]   # files/dirs; `source` names their documents
    output = "shards/mix"          # the packed shard directory (qwen25.data.shards) + report.md + report.png
    work_dir = "shards/mix.work"   # stage outputs, kept for resuming (default: <output>.work)
    tokenizer = "<model name, .gguf or HF directory>"
    docs_per_shard = 1000          # the unit of work, of progress and of resuming
    seed = 0
    [filters]        ... qwen25.data.filters.FilterConfig
    [dedup]          exact = true, minhash = true, shingle_size = 5, num_perm = 128, bands = 16, rows = 8,
                     threshold = 0.8, seed = 1
    [decontaminate]  ... qwen25.data.decontam.DecontamConfig (ngram = 10, benchmarks, extra jsonl)
    [quality]        ... qwen25.data.quality_config.QualityConfig (off by default)
    [mixture]        weights = {web = 0.5, code = 2.0}, default_weight = 1.0 (copies of each document:
                     floor(w), plus one more with probability frac(w), drawn from the seed and its position)
    [pack]           max_tokens_per_file = 134217728

An unknown key is an error naming it. `fingerprint(cfg)` hashes everything that decides the output (not the
paths of work_dir/output), so a resumed run refuses a work directory left by a different config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qwen25.data.decontam import DecontamConfig
from qwen25.data.filters import FilterConfig
from qwen25.data.pack import DEFAULT_INCLUDE
from qwen25.data.quality_config import QualityConfig
from qwen25.data.shards import DEFAULT_TOKENS_PER_FILE
from qwen25.weights.registry import DEFAULT_MODEL

__all__ = ["DedupConfig", "MixtureConfig", "PackConfig", "RunConfig", "fingerprint", "load_run_config"]


@dataclass
class DedupConfig:
    exact: bool = True
    minhash: bool = True
    shingle_size: int = 5
    num_perm: int = 128
    bands: int = 16
    rows: int = 8
    threshold: float = 0.8
    seed: int = 1

    def __post_init__(self) -> None:
        if self.bands * self.rows > self.num_perm or min(self.bands, self.rows, self.shingle_size) < 1:
            raise ValueError(f"dedup: need bands, rows, shingle_size >= 1 and bands x rows <= num_perm, got "
                             f"{self.bands} x {self.rows} with {self.num_perm} permutations")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"dedup.threshold must be in (0, 1], got {self.threshold}")


@dataclass
class MixtureConfig:
    weights: dict[str, float] = field(default_factory=dict)
    default_weight: float = 1.0

    def __post_init__(self) -> None:
        for k, w in {**self.weights, "default_weight": self.default_weight}.items():
            if not (isinstance(w, (int, float)) and w >= 0):
                raise ValueError(f"mixture weight {k!r} must be a number >= 0, got {w!r}")


@dataclass
class PackConfig:
    max_tokens_per_file: int = DEFAULT_TOKENS_PER_FILE


@dataclass
class RunConfig:
    inputs: list[Any]
    output: str
    work_dir: str = ""
    tokenizer: str = DEFAULT_MODEL
    docs_per_shard: int = 1000
    seed: int = 0
    text_field: str = "text"
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    pack: PackConfig = field(default_factory=PackConfig)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("config: 'inputs' lists no files or directories")
        if self.docs_per_shard < 1:
            raise ValueError(f"docs_per_shard must be >= 1, got {self.docs_per_shard}")
        self.work_dir = self.work_dir or str(self.output).rstrip("/") + ".work"


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config: [{where}] must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"config: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in "
                         f"[{where}] (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        sub = {"filters": FilterConfig, "dedup": DedupConfig, "decontaminate": DecontamConfig,
               "quality": QualityConfig, "mixture": MixtureConfig, "pack": PackConfig}.get(name)
        kwargs[name] = _build(sub, value, name) if cls is RunConfig and sub is not None else value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"config: [{where}]: {e}") from None


def load_run_config(path: str | Path | dict[str, Any]) -> RunConfig:
    """A RunConfig from a .toml/.json file or a dict. In a file, relative paths (inputs, output, work_dir,
    decontamination extras, a classifier; a tokenizer or judge model that exists there) are relative to it."""
    if isinstance(path, dict):
        return _build(RunConfig, path, "top level")
    path = Path(path)
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode()) if path.suffix.lower() == ".toml" else json.loads(raw)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'} file ({e})")
    base = path.resolve().parent

    def rel(p: str) -> str:
        return str(p) if Path(p).expanduser().is_absolute() else str(base / p)

    for key in ("output", "work_dir"):
        if data.get(key):
            data[key] = rel(data[key])
    data["inputs"] = [{**i, "path": rel(i["path"])} if isinstance(i, dict) and "path" in i else
                      rel(i) if isinstance(i, str) else i for i in data.get("inputs", [])]
    decon, quality = data.get("decontaminate"), data.get("quality")
    if isinstance(decon, dict) and isinstance(decon.get("extra"), list):
        decon["extra"] = [rel(p) if isinstance(p, str) else p for p in decon["extra"]]
    if isinstance(quality, dict) and quality.get("classifier"):
        quality["classifier"] = rel(quality["classifier"])
    for table, key in ((data, "tokenizer"), (quality, "judge_model")):  # a model name, or a path next to the file
        if isinstance(table, dict) and isinstance(table.get(key), str) and (base / table[key]).exists():
            table[key] = rel(table[key])
    return _build(RunConfig, data, "top level")


def fingerprint(cfg: RunConfig, input_hashes: list[str]) -> str:
    spec = asdict(cfg)
    spec.pop("output")
    spec.pop("work_dir")
    spec["inputs"] = input_hashes
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
