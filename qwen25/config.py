"""Model configuration: `ModelConfig` (HF `config.json` field names) and presets for every Qwen2.5 checkpoint.

Owns the shape of a model, not its weights or runtime settings. Imports no torch, so the CLI can list
models and the engine's bookkeeping can size caches without loading the framework.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENDOFTEXT_ID = 151643  # <|endoftext|>: bos/pad of every Qwen2.5 checkpoint, eos of the base models
IM_END_ID = 151645  # <|im_end|>: eos of the instruct models


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of a Qwen2 decoder, named exactly like HF `Qwen2Config` / `config.json`."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    bos_token_id: int = ENDOFTEXT_ID
    eos_token_id: int | list[int] = IM_END_ID
    head_dim_override: int | None = None  # HF's optional `head_dim`; None means hidden_size / heads
    rope_scaling: dict[str, Any] | None = None  # e.g. {"type": "yarn", "factor": 4.0, ...}
    dual_chunk_attention_config: dict[str, Any] | None = None  # the 1M checkpoints
    use_sliding_window: bool = False  # always false in Qwen2.5; kept so configs round-trip
    sliding_window: int | None = None
    max_window_layers: int | None = None
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    torch_dtype: str = "bfloat16"
    model_type: str = "qwen2"

    def __post_init__(self) -> None:
        if self.model_type != "qwen2":
            raise ValueError(f"unknown architecture {self.model_type!r}: qwen25 runs 'qwen2' models (Qwen2/Qwen2.5)")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported (Qwen2 uses 'silu')")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}; give head_dim explicitly")
        check_rope_scaling(self.rope_scaling)
        check_dual_chunk_attention(self)

    # --- derived -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def num_parameters(self, include_embedding: bool = True) -> int:
        """Parameter count from the shapes alone (what `sum(p.numel())` gives for the module).

        `include_embedding=False` drops the input embedding and the output head (the report's
        "non-embedding" figure)."""
        h, d, kv = self.hidden_size, self.head_dim, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * d
        attn = h * q + q + 2 * (h * kv + kv) + q * h
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        body = self.num_hidden_layers * per_layer + h
        if not include_embedding:
            return body
        emb = self.vocab_size * h
        return body + emb * (1 if self.tie_word_embeddings else 2)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    # --- (de)serialisation ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Keep the known keys of an HF config dict; accept `rope_parameters` (newer transformers)."""
        data = dict(data)
        if "head_dim" in data:
            data["head_dim_override"] = data.pop("head_dim")
        rope_params = data.pop("rope_parameters", None)
        if isinstance(rope_params, dict):
            data.setdefault("rope_theta", rope_params.get("rope_theta", 1_000_000.0))
            if rope_scaling_type(rope_params) != "default" and not data.get("rope_scaling"):
                data["rope_scaling"] = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and v is not None}
        if data.get("architectures") and "model_type" not in data:
            kwargs["model_type"] = "qwen2" if "Qwen2ForCausalLM" in data["architectures"] else "unknown"
        if kwargs.get("sliding_window") is None:
            kwargs.pop("sliding_window", None)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """HF-style dict (what transformers' `Qwen2Config(**d)` accepts)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        d["head_dim"] = self.head_dim
        d.pop("head_dim_override", None)
        d["architectures"] = ["Qwen2ForCausalLM"]
        return d

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_long_context(self, rope_scaling: dict[str, Any] | None = None,
                          dual_chunk_attention_config: dict[str, Any] | None = None) -> ModelConfig:
        """This config with a `--rope-scaling` / DCA setting applied (validated). A YaRN factor extends
        max_position_embeddings to factor x original_max_position_embeddings when that is longer (what the
        Qwen2.5 128K configs carry), so the engine admits the longer prompts."""
        changes: dict[str, Any] = {}
        if rope_scaling is not None:
            check_rope_scaling(rope_scaling)
            changes["rope_scaling"] = dict(rope_scaling)
            if yarn_window(rope_scaling) is not None:
                longest = int(rope_scaling["factor"] * rope_scaling["original_max_position_embeddings"])
                changes["max_position_embeddings"] = max(self.max_position_embeddings, longest)
        if dual_chunk_attention_config is not None:
            changes["dual_chunk_attention_config"] = dict(dual_chunk_attention_config)
        return self.replace(**changes)


# --- long context: rope_scaling (YaRN) and dual_chunk_attention_config -------------------------------
# YaRN fields as transformers reads them (modeling_rope_utils._compute_yarn_parameters), plus qwen25's
# "dynamic" switch (no scaling while a sequence fits original_max_position_embeddings; see model/rope.py).
_YARN_FIELDS = {"type", "rope_type", "factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
                "beta_slow", "mscale", "mscale_all_dim", "truncate", "rope_theta", "dynamic"}
# vLLM's keys; the sparse_attention_* ones are kept for the sparse prefill (not implemented: dense DCA runs).
_DCA_FIELDS = {"chunk_size", "local_size", "original_max_position_embeddings", "sparse_attention_config",
               "sparse_attention_enabled", "sparse_attention_threshold", "sparse_attention_last_q"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def rope_scaling_type(rope_scaling: dict[str, Any] | None) -> str:
    """The scaling type a rope_scaling names (HF's `rope_type`, or the older `type`); "default" when none."""
    scaling = rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type")) or "default"


def yarn_window(rope_scaling: dict[str, Any] | None) -> int | None:
    """original_max_position_embeddings of a YaRN rope_scaling (the native window), else None."""
    if rope_scaling_type(rope_scaling) != "yarn":
        return None
    return int(rope_scaling["original_max_position_embeddings"])  # type: ignore[index]


def check_rope_scaling(scaling: Any) -> None:
    """Raise ValueError naming the field if `scaling` is not a rope_scaling qwen25 can run (None or YaRN)."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a JSON object, got {scaling!r}")
    if "rope_type" in scaling and "type" in scaling and scaling["rope_type"] != scaling["type"]:
        raise ValueError(f"rope_scaling: 'rope_type' ({scaling['rope_type']!r}) and 'type' ({scaling['type']!r}) "
                         "disagree")
    if "rope_type" not in scaling and "type" not in scaling:
        raise ValueError("rope_scaling: missing field 'rope_type' (or 'type'), e.g. \"yarn\"")
    kind = rope_scaling_type(scaling)
    if kind == "default":
        return
    if kind != "yarn":
        raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported (qwen25 implements 'yarn', "
                         "static or with \"dynamic\": true)")
    unknown = sorted(set(scaling) - _YARN_FIELDS)
    if unknown:
        raise ValueError(f"rope_scaling: unknown field {unknown[0]!r} for yarn (known: {', '.join(sorted(_YARN_FIELDS))})")
    for name, example in (("factor", "4.0"), ("original_max_position_embeddings", "32768")):
        if scaling.get(name) is None:
            raise ValueError(f"rope_scaling: missing field {name!r} for yarn (e.g. {example})")
    if not _is_number(scaling["factor"]) or scaling["factor"] < 1:
        raise ValueError(f"rope_scaling: 'factor' must be a number >= 1, got {scaling['factor']!r}")
    original = scaling["original_max_position_embeddings"]
    if not _is_count(original) or original <= 0:
        raise ValueError(f"rope_scaling: 'original_max_position_embeddings' must be a positive integer, "
                         f"got {original!r}")
    for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
        value = scaling.get(name)
        if value is not None and (not _is_number(value) or value < 0):
            raise ValueError(f"rope_scaling: {name!r} must be a non-negative number, got {value!r}")
    if (scaling.get("beta_fast") or 32) < (scaling.get("beta_slow") or 1):
        raise ValueError(f"rope_scaling: 'beta_fast' ({scaling.get('beta_fast')}) must not be below 'beta_slow' "
                         f"({scaling.get('beta_slow')})")
    for name in ("truncate", "dynamic"):
        if scaling.get(name) is not None and not isinstance(scaling[name], bool):
            raise ValueError(f"rope_scaling: {name!r} must be true or false, got {scaling[name]!r}")


def check_dual_chunk_attention(config: ModelConfig) -> None:
    """Raise ValueError naming the field if the config's dual_chunk_attention_config is malformed or the model
    cannot take it: DCA presents relative distances up to chunk_size, which must be positions the model knows."""
    dca = config.dual_chunk_attention_config
    if dca is None:
        return
    if not isinstance(dca, dict):
        raise ValueError(f"dual_chunk_attention_config must be a JSON object, got {dca!r}")
    unknown = sorted(set(dca) - _DCA_FIELDS)
    if unknown:
        raise ValueError(f"dual_chunk_attention_config: unknown field {unknown[0]!r} "
                         f"(known: {', '.join(sorted(_DCA_FIELDS))})")
    for name in ("chunk_size", "local_size"):
        if name not in dca:
            raise ValueError(f"dual_chunk_attention_config: missing field {name!r}")
        if not _is_count(dca[name]) or dca[name] < 0:
            raise ValueError(f"dual_chunk_attention_config: {name!r} must be a non-negative integer, got {dca[name]!r}")
    chunk, local = dca["chunk_size"], dca["local_size"]
    if chunk <= local:
        raise ValueError(f"dual_chunk_attention_config: 'chunk_size' ({chunk}) must be larger than 'local_size' "
                         f"({local})")
    original = dca.get("original_max_position_embeddings", 0)
    if not _is_count(original) or original < 0:
        raise ValueError(f"dual_chunk_attention_config: 'original_max_position_embeddings' must be a non-negative "
                         f"integer, got {original!r}")
    if (config.rope_scaling or {}).get("dynamic"):
        raise ValueError("dual_chunk_attention_config cannot be combined with dynamic YaRN (rope_scaling.dynamic): "
                         "DCA keeps positions within chunk_size, use static YaRN or none")
    known = config.max_position_embeddings
    if yarn_window(config.rope_scaling) is not None:
        known = max(known, int(config.rope_scaling["factor"] * yarn_window(config.rope_scaling)))  # type: ignore[index]
    if chunk > known:
        raise ValueError(f"dual_chunk_attention_config: 'chunk_size' ({chunk}) exceeds the positions this model "
                         f"takes (max_position_embeddings={config.max_position_embeddings}): DCA attends over "
                         "relative distances up to chunk_size, so it must be at most that")


def parse_rope_scaling(text: str) -> dict[str, Any] | None:
    """The value of a `--rope-scaling` flag: vLLM's JSON shape ('{"rope_type":"yarn","factor":4.0,
    "original_max_position_embeddings":32768}'), validated; "none" / "" -> None."""
    if text.strip().lower() in ("", "none", "null"):
        return None
    try:
        scaling = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--rope-scaling: not valid JSON ({e})") from None
    check_rope_scaling(scaling)
    return scaling


def parse_dual_chunk_attention(text: str, config: ModelConfig) -> dict[str, Any] | None:
    """The value of a `--dual-chunk-attention` flag for this model: a JSON object (the config.json field),
    "on" (chunk_size = the model's native window, local_size = chunk_size / 32, the 1M checkpoints' ratio), or
    "off" / "none" -> None. Validated against the model."""
    value = text.strip()
    if value.lower() in ("", "off", "none", "null", "false"):
        return None
    if value.lower() in ("on", "true"):
        chunk = yarn_window(config.rope_scaling) or config.max_position_embeddings
        dca: Any = {"chunk_size": chunk, "local_size": chunk // 32, "original_max_position_embeddings": chunk}
    else:
        try:
            dca = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--dual-chunk-attention: not valid JSON ({e})") from None
    check_dual_chunk_attention(config.replace(dual_chunk_attention_config=dca))
    return dca


# --- presets ---------------------------------------------------------------------------------------
# Shapes from SPEC §1.2 (HF configs of the official checkpoints); variants from SPEC §1.3.
_SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "72b": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}
# Base checkpoints of these sizes differ from instruct: longer max_position_embeddings, and eps 1e-5 for 14B+.
_BASE_DELTAS: dict[str, dict[str, Any]] = {
    "1.5b": dict(max_position_embeddings=131072),
    "7b": dict(max_position_embeddings=131072),
    "14b": dict(max_position_embeddings=131072, rms_norm_eps=1e-5),
    "32b": dict(max_position_embeddings=131072, rms_norm_eps=1e-5),
    "72b": dict(max_position_embeddings=131072, rms_norm_eps=1e-5),
}
_DCA_1M = {"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144}


def _build_presets() -> dict[str, ModelConfig]:
    presets: dict[str, ModelConfig] = {}
    for size, shape in _SHAPES.items():
        base = dict(shape, **_BASE_DELTAS.get(size, {}), eos_token_id=ENDOFTEXT_ID)
        presets[f"qwen2.5-{size}"] = ModelConfig(**base)
        presets[f"qwen2.5-{size}-instruct"] = ModelConfig(**shape, eos_token_id=IM_END_ID)
    for size in ("0.5b", "1.5b", "3b", "7b", "14b", "32b"):
        eps = 1e-5 if size in ("14b", "32b") else 1e-6
        coder = dict(_SHAPES[size], max_position_embeddings=32768)
        presets[f"qwen2.5-coder-{size}"] = ModelConfig(**coder, rms_norm_eps=eps, eos_token_id=ENDOFTEXT_ID)
        presets[f"qwen2.5-coder-{size}-instruct"] = ModelConfig(**coder, eos_token_id=IM_END_ID)
    for size in ("1.5b", "7b", "72b"):
        math = dict(_SHAPES[size], max_position_embeddings=4096, rope_theta=10_000.0,
                    rms_norm_eps=1e-5 if size == "72b" else 1e-6)
        presets[f"qwen2.5-math-{size}"] = ModelConfig(**math, eos_token_id=ENDOFTEXT_ID)
        presets[f"qwen2.5-math-{size}-instruct"] = ModelConfig(**math, eos_token_id=IM_END_ID)
    for size in ("7b", "14b"):
        presets[f"qwen2.5-{size}-instruct-1m"] = ModelConfig(
            **_SHAPES[size], rope_theta=10_000_000.0, max_position_embeddings=1_010_000, rms_norm_eps=1e-5,
            eos_token_id=IM_END_ID, dual_chunk_attention_config=dict(_DCA_1M))
    return presets


PRESETS: dict[str, ModelConfig] = _build_presets()


def preset(name: str) -> ModelConfig:
    """Look up a preset by name (case-insensitive, e.g. 'qwen2.5-7b-instruct')."""
    key = name.lower().removeprefix("qwen/").replace("qwen2.5-", "qwen2.5-", 1)
    if key not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[key]


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """The sampling defaults a checkpoint ships in generation_config.json (all optional)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationDefaults:
        eos = data.get("eos_token_id") or []
        do_sample = data.get("do_sample", True)
        return cls(
            temperature=(data.get("temperature") if do_sample else 0.0),
            top_p=data.get("top_p"),
            top_k=data.get("top_k"),
            repetition_penalty=data.get("repetition_penalty"),
            eos_token_ids=list(eos) if isinstance(eos, list) else [eos],
        )
