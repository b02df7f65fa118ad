"""Reward models on disk and in training: build from a causal LM, save/load in transformers' layout, the objective.

On disk a reward model is an HF directory that `transformers.AutoModelForSequenceClassification` loads:
config.json (the Qwen2 config with `architectures: ["Qwen2ForSequenceClassification"]`, `num_labels` through
`id2label`, and `pad_token_id`, which transformers needs to find each row's last token), model.safetensors
(`model.*` and `score.weight`, no lm_head) and the tokenizer files with the chat template.

`RewardObjective` is the trainer's objective (`qwen25.train.loop`): for a PairBatch (right-padded with the
reward model's pad token) it scores the chosen and rejected rows at their last non-pad token and sums the
Bradley-Terry loss -log sigmoid(r_c - r_r - margin) over the pairs; its extras are the pairwise accuracy
(r_c > r_r; a tie counts as wrong) and the mean margin r_c - r_r.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen25.config import ModelConfig
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.model.sequence_classification import Qwen2ForSequenceClassification
from qwen25.train.distributed import DistContext
from qwen25.train.loop import autocast
from qwen25.train.preference_losses import bradley_terry_loss
from qwen25.weights.errors import CheckpointError
from qwen25.weights.safetensors import load_safetensors, save_safetensors

ARCHITECTURE = "Qwen2ForSequenceClassification"

__all__ = ["ARCHITECTURE", "RewardObjective", "is_reward_model_dir", "load_reward_model", "reward_model_from_lm",
           "reward_model_writer", "save_reward_model"]


def reward_model_from_lm(lm: Qwen2ForCausalLM, pad_token_id: int, seed: int = 0,
                         std: float | None = None) -> Qwen2ForSequenceClassification:
    """A reward model sharing `lm`'s decoder (its tensors, not a copy), with a new score head drawn from
    N(0, std) (default: the config's initializer_range, as transformers initialises it)."""
    if not isinstance(pad_token_id, int) or not 0 <= pad_token_id < lm.config.vocab_size:
        raise ValueError(f"a reward model needs a pad token id within the vocabulary, got {pad_token_id!r}")
    with torch.device("meta"):
        rm = Qwen2ForSequenceClassification(lm.config, 1, pad_token_id)
    rm.model = lm.model
    weight = torch.empty(1, lm.config.hidden_size, dtype=lm.model.embed_tokens.weight.dtype,
                         device=lm.model.embed_tokens.weight.device)
    weight.normal_(0.0, std if std is not None else lm.config.initializer_range,
                   generator=torch.Generator(device=weight.device).manual_seed(seed))
    rm.score.weight = nn.Parameter(weight, requires_grad=lm.model.embed_tokens.weight.requires_grad)
    return rm


def _config_json(rm: Qwen2ForSequenceClassification, dtype: torch.dtype) -> dict[str, Any]:
    d = rm.config.to_dict()
    d["architectures"] = [ARCHITECTURE]
    d["torch_dtype"] = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "float32")
    d["id2label"] = {str(i): f"LABEL_{i}" for i in range(rm.num_labels)}
    d["label2id"] = {f"LABEL_{i}": i for i in range(rm.num_labels)}
    if rm.pad_token_id is not None:
        d["pad_token_id"] = rm.pad_token_id
    if d.get("max_window_layers") is None:
        d["max_window_layers"] = rm.config.num_hidden_layers
    d.setdefault("use_cache", True)
    return dict(sorted(d.items()))


def save_reward_model(rm: Qwen2ForSequenceClassification, out_dir: str | Path, tokenizer: Any = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write `rm` as an HF directory (see the module docstring); files go straight into out_dir."""
    state = {}
    for name, tensor in rm.state_dict().items():
        name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        if ".lora_" in name:
            raise ValueError(f"cannot save {name}: merge the LoRA adapter into the reward model first")
        t = tensor.detach()
        state[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out / "model.safetensors")
    written = state["score.weight"].dtype
    (out / "config.json").write_text(json.dumps(_config_json(rm, written), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def is_reward_model_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    try:
        return ARCHITECTURE in json.loads(config.read_text()).get("architectures", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32,
                      trainable: bool = False) -> Qwen2ForSequenceClassification:
    """A reward model from an HF directory written by `save_reward_model` or transformers; CheckpointError when
    the directory holds another architecture or its tensors do not fit the config."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (not a reward model directory)")
    data = json.loads((path / "config.json").read_text())
    if ARCHITECTURE not in data.get("architectures", []):
        raise CheckpointError(f"{path}: architectures {data.get('architectures')} is not a reward model "
                              f"({ARCHITECTURE}; train one with `qwen25 train rm`)")
    config = ModelConfig.from_dict({k: v for k, v in data.items() if k != "architectures"})
    num_labels = len(data.get("id2label") or {}) or int(data.get("num_labels", 1))
    with torch.device("meta"):
        rm = Qwen2ForSequenceClassification(config, num_labels, data.get("pad_token_id"))
    state = load_safetensors(path, dtype=dtype)
    expected = rm.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: reward-model tensors do not fit the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(state[name].shape)}, expected {tuple(ref.shape)}")
    rm.load_state_dict(state, assign=True)
    rm.model.reset_rope()
    for p in rm.parameters():
        p.requires_grad_(trainable)
    return rm.train(trainable)


class RewardObjective:
    """Bradley-Terry over a PairBatch (see the module docstring); `margin` is added to every pair's own."""

    def __init__(self, margin: float = 0.0) -> None:
        self.margin = margin
        self.loss_label = "Bradley-Terry loss per pair, -log sigmoid(r_chosen - r_rejected - margin), nats"

    def __call__(self, model: nn.Module, batch: Any, ctx: DistContext,
                 dtype: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast(ctx, dtype):
            scores = model(batch.input_ids.to(ctx.device))[:, 0].float()
        n = batch.num_loss_units
        chosen, rejected = scores[:n], scores[n:]
        margin = torch.full_like(chosen, self.margin)
        if getattr(batch, "margins", None) is not None:
            margin = margin + batch.margins.to(ctx.device, torch.float32)
        losses = bradley_terry_loss(chosen, rejected, margin)
        gap = (chosen - rejected).detach()
        return losses.sum(), {"accuracy": (gap > 0).float().sum(), "margin": gap.sum()}


class _Gathered:
    """What `save_reward_model` asks of a model, over an FSDP2 model's gathered tensors."""

    def __init__(self, rm: Any, state: dict[str, torch.Tensor]) -> None:
        self.config, self.num_labels, self.pad_token_id, self._state = rm.config, rm.num_labels, rm.pad_token_id, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def reward_model_writer(ctx: DistContext, tokenizer: Any = None) -> Any:
    """write(model, dir) for the trainer's checkpoints: the reward model's HF directory, by rank 0 (an FSDP2
    model is gathered first, a collective)."""
    from qwen25.train.checkpointing import full_state_dict
    from qwen25.train.distributed import is_sharded

    def write(model: nn.Module, out: Path) -> None:
        target: Any = _Gathered(model, full_state_dict(model)) if is_sharded(model) else model
        if ctx.is_main:
            save_reward_model(target, out, tokenizer)

    return write
