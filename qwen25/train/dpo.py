"""`qwen25 train dpo`: Direct Preference Optimization of a Qwen2.5 checkpoint on preference pairs, full or LoRA.

Objective (per optimizer step, over the pairs of the global batch; `qwen25.train.dpo_objective`):

    sigmoid (default):  mean over pairs of -log sigmoid(beta * [(log pi(y_c|x) - log ref(y_c|x))
                                                              - (log pi(y_r|x) - log ref(y_r|x))])
    ipo (--loss-type ipo): mean of ((log-ratio_c / |y_c| - log-ratio_r / |y_r|) - 1 / (2 beta))^2

log pi(y|x) is the summed log-probability of the response tokens (for chat data: the assistant turn and its
<|im_end|>) given the prompt. The reference is the starting checkpoint: its log-probs are computed once before
training and cached next to the data (`<data>.ref-<key>.npz`), so only the policy is in memory while it trains.
Log-probs are gathered chunk by chunk over the response positions, never as (batch, length, 151,936) logits,
and glibc is told to hand large freed blocks back (`qwen25.runtime.limit_heap_retention`).
Kept from the DPO paper: the loss, beta, a frozen reference. Not done: label smoothing / cDPO, reference-model
syncing (TR-DPO), the SFT term (RPO). Qwen2.5's report trains 1 epoch at lr 7e-7 (the default; with --lora 5e-6,
since a low-rank update needs a larger step).

Data: jsonl, one pair per line: {"prompt", "chosen", "rejected"} as plain text, or with "prompt" a list of
OpenAI messages and "chosen"/"rejected" assistant messages (or strings), rendered with the chat template
(`qwen25.train.pairs`). Empty sides, identical sides, prompts with no room left within --seq-len and overlong
pairs are skipped and counted. Output as `qwen25 train sft`: checkpoints, metrics.jsonl (loss, reward_accuracy,
reward_margin, rewards_chosen / rewards_rejected, eval_* on --eval-data), loss.png, the final model or adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qwen25.cli_args import arg
from qwen25.train.pair_args import PairDataArgs, PairTrainArgs
from qwen25.train.sft import LoraArgs
from qwen25.weights.registry import DEFAULT_MODEL

FULL_LR, LORA_LR = 7e-7, 5e-6

__all__ = ["DPOConfig", "main"]


@dataclass(kw_only=True)
class DPOArgs(PairDataArgs):
    cli_group = "model and data"

    model: str = arg(DEFAULT_MODEL, short="-m")
    """policy to train, also the reference: a known name, a .gguf file (dequantized) or an HF directory"""
    beta: float = 0.1
    """strength of the pull towards the reference (DPO's beta; IPO's tau)"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid (DPO) or ipo (squared, per-token log-ratios)"""
    ref_cache: str | None = arg(None, metavar="FILE")
    """where to keep the reference log-probs (default: next to --data, <data>.ref-<key>.npz)"""
    ref_batch_size: int = 8
    """pairs per batch while computing the reference log-probs"""


@dataclass(kw_only=True)
class DPOConfig(PairTrainArgs, LoraArgs, DPOArgs):
    """Train a Qwen2.5 checkpoint on preference pairs with DPO (full or LoRA)."""

    cli_group = "training"

    lr: float | None = None  # type: ignore[assignment]
    """peak learning rate (default: 7e-7 full, as the Qwen2.5 report; 5e-6 with --lora)"""
    warmup_ratio: float = 0.1
    """warmup as a fraction of the optimizer steps"""

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = LORA_LR if self.lora else FULL_LR
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if self.ref_batch_size < 1:
            raise ValueError(f"--ref-batch-size must be >= 1, got {self.ref_batch_size}")


def main(cfg: DPOConfig) -> int:
    import dataclasses

    import torch

    from qwen25.checkpoint import load, load_tokenizer
    from qwen25.runtime import configure_runtime, limit_heap_retention
    from qwen25.train.checkpointing import adapter_writer, hf_writer, save_final_model
    from qwen25.train.distributed import init_distributed, shard_model, shutdown
    from qwen25.train.dpo_objective import DPOObjective, cached_reference_logps
    from qwen25.train.loop import train
    from qwen25.train.pairs import PairLoader, describe_stats, load_pairs, read_template
    from qwen25.weights.registry import resolve_model

    objective = DPOObjective(cfg.beta, cfg.loss_type)
    template = read_template(cfg.chat_template)
    lora_config = None
    if cfg.lora:
        from qwen25.train.lora import LINEAR_MODULES, LoraConfig

        lora_config = LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                 target_modules=tuple(cfg.lora_target_modules or LINEAR_MODULES))
    path = resolve_model(cfg.model)
    ctx = init_distributed()
    configure_runtime(cfg.threads)
    limit_heap_retention()
    try:
        tokenizer = load_tokenizer(path)
        template = template or tokenizer.chat_template
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train_pairs, stats = load_pairs(cfg.data, tokenizer, template, cfg.seq_len, cfg.overlong)
        eval_pairs, eval_stats = (load_pairs(cfg.eval_data, tokenizer, template, cfg.seq_len, cfg.overlong)
                                  if cfg.eval_data else (None, None))
        if ctx.is_main:
            print(f"dpo data: {describe_stats(stats)}"
                  + (f"; held-out: {describe_stats(eval_stats)}" if eval_stats else ""),
                  flush=True)
        checkpoint = load(path, torch.float32, quantization="none", trainable=not cfg.lora)
        model = checkpoint.model.to(ctx.device)
        model.model.inv_freq = model.model.inv_freq.to(ctx.device)
        # the reference = the starting weights: its log-probs now, before the first update (and before LoRA)
        refs = {}
        for name, pairs, data in (("train", train_pairs, cfg.data), ("eval", eval_pairs, cfg.eval_data)):
            if pairs is None:
                continue
            cache = cfg.ref_cache if name == "train" else None
            refs[name], where, reused = cached_reference_logps(
                model, pairs, ctx, pad_id, data=data, reference=path, dtype=cfg.dtype,
                batch_size=cfg.ref_batch_size, cache=cache, progress=not cfg.no_progress)
            if ctx.is_main:
                print(f"reference log-probs ({name}): {'read from' if reused else 'computed, cached in'} {where}",
                      flush=True)
        if lora_config is not None:
            from qwen25.train.lora import apply_lora

            apply_lora(model, lora_config)
        model.train()
        if ctx.distributed:
            shard_model(model, mixed_precision=torch.bfloat16 if cfg.dtype == "bfloat16" else None)
        rank = dict(rank=ctx.rank, world_size=ctx.world_size)
        identity = {"data": str(Path(cfg.data).name), "seq_len": cfg.seq_len}
        loader = PairLoader(train_pairs, cfg.batch_size, cfg.seed, pad_id, identity=identity, **rank)
        loader.ref_logps = refs["train"]
        evals = None
        if eval_pairs is not None:
            evals = PairLoader(eval_pairs, min(cfg.batch_size, len(eval_pairs) // ctx.world_size or 1), cfg.seed,
                               pad_id, shuffle=False, identity={"eval": True}, drop_last=False, **rank)
            evals.ref_logps = refs["eval"]
        writer = (adapter_writer(ctx, lora_config, str(cfg.model)) if lora_config is not None else
                  hf_writer(ctx, tokenizer, checkpoint.generation_defaults))
        fingerprint = {"kind": "dpo", "model": checkpoint.config.to_dict(), "beta": cfg.beta,
                       "loss_type": cfg.loss_type,
                       "lora": None if lora_config is None else dataclasses.asdict(lora_config) | {
                           "target_modules": list(lora_config.target_modules)},
                       "data": {"pairs": len(train_pairs), "name": Path(cfg.data).name}}
        result = train(model, loader, cfg, ctx=ctx, fingerprint=fingerprint, eval_loader=evals, write_model=writer,
                       description="dpo", objective=objective)
        save_final_model(ctx, Path(cfg.output), model, writer)
        if ctx.is_main:
            last = next((r for r in reversed(result.history) if "reward_accuracy" in r), {})
            kind = "adapter" if cfg.lora else "model"
            print(f"dpo: {result.step} steps, final loss {result.losses[-1]:.4f}, reward accuracy "
                  f"{last.get('reward_accuracy', float('nan')):.2f}; {kind} in {cfg.output}", flush=True)
    finally:
        shutdown(ctx)
    return 0

