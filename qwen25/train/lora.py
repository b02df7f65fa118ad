"""LoRA on the decoder's linear projections, saved and loaded in peft's adapter format.

`apply_lora` swaps each target `nn.Linear` for a `LoraLinear` in place: y = W x + b + (B A dropout(x)) * alpha / r,
A (r, in) kaiming-uniform and B (out, r) zero as peft initialises them, every base parameter frozen. A
`LoraLinear` *is* an `nn.Linear` whose `weight`/`bias` are the base's own tensors, so the base keeps its HF names
(`...q_proj.weight`) and the adapter's are those names with `.lora_A.weight` / `.lora_B.weight`: peft's key
names less its `base_model.model.` prefix. On disk an adapter is peft's directory (adapter_config.json +
adapter_model.safetensors), which `PeftModel.from_pretrained` and vLLM load. `merge_lora` folds B A * scale
into W and puts plain `nn.Linear`s back. Works on the unfused float model only (not on an engine's fused
q/k/v or quantized projections).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen25.model.qwen2 import Qwen2ForCausalLM

if TYPE_CHECKING:
    from qwen25.checkpoint import Checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what peft's PeftModelForCausalLM puts before the transformers names
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Names that wrappers (activation checkpointing, torch.compile) insert into module paths; peft's keys have none.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")

__all__ = ["LINEAR_MODULES", "LoraConfig", "LoraLinear", "apply_lora", "load_adapter", "load_merged",
           "lora_state_dict", "merge_lora", "read_adapter_config", "save_adapter"]


@dataclass
class LoraConfig:
    """LoRA hyper-parameters (peft's `r`, `lora_alpha`, `lora_dropout`, `target_modules`, `use_rslora`)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LINEAR_MODULES
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r (peft's rsLoRA)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = LINEAR_MODULES if self.target_modules == "all-linear" else (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if self.r <= 0 or self.alpha <= 0:
            raise ValueError(f"LoRA needs r > 0 and alpha > 0, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [m for m in self.target_modules if m not in LINEAR_MODULES]
        if unknown or not self.target_modules:
            raise ValueError(f"LoRA target_modules {list(self.target_modules)}: each must be one of "
                             f"{', '.join(LINEAR_MODULES)} (or 'all-linear')")

    def scaling(self, r: int | None = None) -> float:
        r = r or self.r
        return self.alpha / (math.sqrt(r) if self.use_rslora else r)


class _BoolMaskDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


class MaskDropout(nn.Module):
    """nn.Dropout's function (zero each element with probability p, scale the rest by 1/(1-p); identity in eval
    mode) keeping a 1-byte mask for backward where CPU dropout keeps a mask of the input's dtype: an fp32 mask per
    adapted projection is ~1 GB for 1,024 tokens of the 0.5B with LoRA on every linear layer."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return _BoolMaskDropout.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LoraLinear(nn.Linear):
    """An `nn.Linear` (sharing the base's weight and bias) plus a low-rank update B A scaled by `scaling`."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's tensors are reused, nothing is allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        # peft keeps adapters in fp32 when the base is half precision (autocast_adapter_dtype)
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        kw = dict(device=base.weight.device, dtype=dtype, bias=False)
        self.lora_A = nn.Linear(base.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base.out_features, **kw)
        self.lora_dropout: nn.Module = MaskDropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.scaling = r, scaling
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (update * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """B A * scaling, (out, in) in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


# --- applying and merging -----------------------------------------------------------------------------------
def _target_linears(model: Qwen2ForCausalLM, targets: tuple[str, ...]) -> dict[str, nn.Module]:
    """{module path: module} of the decoder projections named in `targets` (refusing fused/quantized layers)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("qkv_proj", "gate_up_proj"):
            raise ValueError(f"{name}: fused projections (an inference engine's layout); LoRA needs the unfused "
                             "float model (load it with quantization='none')")
        if leaf in targets and ".layers." in f".{name}":
            if not isinstance(module, nn.Linear):
                raise ValueError(f"{name} is a {type(module).__name__}, not nn.Linear: LoRA needs float weights "
                                 "(load the model with quantization='none')")
            found[_clean(name)] = module
    if not found:
        raise ValueError(f"no decoder projections named {list(targets)} in the model")
    return found


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, leaf, module)


def _clean(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _lora_modules(model: nn.Module) -> dict[str, tuple[str, LoraLinear]]:
    """{clean path: (real path, module)} of every LoraLinear."""
    return {_clean(n): (n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def apply_lora(model: Qwen2ForCausalLM, cfg: LoraConfig) -> None:
    """Wrap the target projections in place and freeze the base: only the LoRA A/B matrices require grad."""
    if _lora_modules(model):
        raise ValueError("the model already has LoRA layers (merge_lora first, or load into a fresh model)")
    targets = _target_linears(model, cfg.target_modules)
    model.requires_grad_(False)
    real = {_clean(n): n for n, _ in model.named_modules()}
    for path, linear in targets.items():
        _set_module(model, real[path], LoraLinear(linear, cfg.r, cfg.scaling(), cfg.dropout))
    for _, module in _lora_modules(model).values():
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)


@torch.no_grad()
def merge_lora(model: Qwen2ForCausalLM) -> None:
    """Fold every adapter into its base weight (W += B A * scaling) and put plain `nn.Linear`s back."""
    for _, (real, module) in _lora_modules(model).items():
        weight = module.weight
        weight.copy_((weight.float() + module.delta_weight()).to(weight.dtype))
        with torch.device("meta"):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain.weight, plain.bias = weight, module.bias
        _set_module(model, real, plain)


# --- peft's format on disk ----------------------------------------------------------------------------------
def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under peft's key names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).

    FSDP2-sharded (DTensor) parameters are gathered with `full_tensor()`, a collective: call it on every rank."""
    out: dict[str, torch.Tensor] = {}
    for path, (_, module) in sorted(_lora_modules(model).items()):
        for part in ("lora_A", "lora_B"):
            t = getattr(module, part).weight.detach()
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[f"{PEFT_PREFIX}{path}.{part}.weight"] = t.cpu().contiguous()
    return out


def _peft_config(cfg: LoraConfig, base_model_name_or_path: str) -> dict[str, Any]:
    """adapter_config.json: the keys every peft version knows (newer ones fill the rest with defaults)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": list(cfg.target_modules),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": cfg.use_rslora, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def save_adapter(model: nn.Module, cfg: LoraConfig, out_dir: str | os.PathLike, base_model_name_or_path: str) -> None:
    """Write adapter_config.json + adapter_model.safetensors into `out_dir` (each file replaced atomically)."""
    from safetensors.torch import save_file

    tensors = lora_state_dict(model)
    if not tensors:
        raise ValueError("the model has no LoRA layers to save (apply_lora first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / ADAPTER_WEIGHTS)
    tmp = out / f".{ADAPTER_CONFIG}.tmp"
    tmp.write_text(json.dumps(_peft_config(cfg, str(base_model_name_or_path)), indent=2) + "\n")
    os.replace(tmp, out / ADAPTER_CONFIG)


def read_adapter_config(adapter_dir: str | os.PathLike) -> tuple[LoraConfig, dict[str, Any]]:
    """The LoraConfig of a peft adapter directory and its raw adapter_config.json; refuses what qwen25 cannot run."""
    path = Path(adapter_dir)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: not a LoRA adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        raw = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    problems = [f"peft_type {raw.get('peft_type')!r} (only 'LORA')" if raw.get("peft_type") != "LORA" else "",
                "DoRA (use_dora)" if raw.get("use_dora") else "",
                f"bias {raw.get('bias')!r} (only 'none')" if raw.get("bias", "none") != "none" else "",
                f"modules_to_save {raw['modules_to_save']}" if raw.get("modules_to_save") else "",
                "fan_in_fan_out" if raw.get("fan_in_fan_out") else "",
                "rank_pattern/alpha_pattern" if raw.get("rank_pattern") or raw.get("alpha_pattern") else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"{path}: unsupported adapter settings: {'; '.join(problems)}")
    targets = raw.get("target_modules") or LINEAR_MODULES
    if isinstance(targets, str) and targets != "all-linear":  # peft's regex form: keep the known names it names
        targets = tuple(m for m in LINEAR_MODULES if re.search(rf"\b{m}\b", targets))
    cfg = LoraConfig(r=int(raw["r"]), alpha=raw.get("lora_alpha", 8), dropout=float(raw.get("lora_dropout") or 0.0),
                     target_modules=targets, use_rslora=bool(raw.get("use_rslora")))
    return cfg, raw


def load_adapter(model: Qwen2ForCausalLM, adapter_dir: str | os.PathLike) -> LoraConfig:
    """Apply the adapter's LoRA layers to `model` (or reuse LoRA layers already there) and load its weights.

    Raises ValueError when the adapter does not fit the model (another base: missing modules or other shapes)."""
    from safetensors.torch import load_file

    path = Path(adapter_dir)
    cfg, _ = read_adapter_config(path)
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(path / ADAPTER_WEIGHTS)).items()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} in {ADAPTER_WEIGHTS} (not a LoRA A/B matrix)")
        pairs.setdefault(m[1], {})[m[2]] = t
    existing = _lora_modules(model)
    if not existing:
        apply_lora(model, LoraConfig(cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules, cfg.use_rslora))
        existing = _lora_modules(model)
    for module_path, ab in pairs.items():
        if module_path not in existing or len(ab) != 2:
            raise ValueError(f"{path}: adapter for another base model: it has LoRA weights for {module_path!r}, "
                             f"which this model ({model.config.num_hidden_layers} layers) has no target for")
        module = existing[module_path][1]
        a, b = ab["lora_A"], ab["lora_B"]
        r = a.shape[0]
        if a.shape != (r, module.in_features) or b.shape != (module.out_features, r):
            raise ValueError(f"{path}: adapter for another base model: {module_path} has LoRA shapes "
                             f"{tuple(a.shape)}/{tuple(b.shape)}, the model's layer is {module.in_features} -> "
                             f"{module.out_features}")
        if r != module.r:
            module.lora_A = nn.Linear(module.in_features, r, bias=False, dtype=module.lora_A.weight.dtype)
            module.lora_B = nn.Linear(r, module.out_features, bias=False, dtype=module.lora_B.weight.dtype)
            module.r = r
        module.scaling = cfg.scaling(r)
        with torch.no_grad():
            module.lora_A.weight.copy_(a)
            module.lora_B.weight.copy_(b)
    return cfg


def load_merged(path: str | os.PathLike, adapter_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                quantization: str | None = None) -> Checkpoint:
    """The checkpoint at `path` with the adapter merged in: the base is loaded in fp32 (a GGUF dequantized), the
    adapter applied and merged, then the merged weights are cast to `dtype` or quantized ("q8"/"q4") exactly as
    a plain load of such a checkpoint would be. Serving therefore costs nothing extra per token."""
    import dataclasses

    from qwen25.checkpoint import load
    from qwen25.weights.quantized import quantize_loaded_model

    read_adapter_config(adapter_dir)  # a bad adapter fails before the (slow) base load
    quantization = None if quantization == "none" else quantization
    checkpoint = load(path, torch.float32)
    model = checkpoint.model
    load_adapter(model, adapter_dir)
    merge_lora(model)
    if quantization in ("q8", "q4"):
        model = quantize_loaded_model(model, bits=int(quantization[1]))
    elif quantization is not None:
        raise ValueError(f"quantization must be 'none', 'q8' or 'q4', got {quantization!r}")
    elif dtype != torch.float32:
        model = model.to(dtype)
    return dataclasses.replace(checkpoint, model=model, quantization=quantization)
