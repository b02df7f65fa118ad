"""`qwen25 train rm`: train a reward model (Qwen2 + a scalar head) on preference pairs with the Bradley-Terry loss.

Objective (per optimizer step, over the pairs of the global batch; `qwen25.train.reward_model.RewardObjective`):

    mean over pairs of -log sigmoid(r(x, y_c) - r(x, y_r) - m)

where r is the score head applied to the final hidden state of the last token of prompt + response, and m the
pair's "margin" (0 unless the record has one) plus --margin. This is the Bradley-Terry likelihood of the
observed preferences (InstructGPT's reward-model loss; Llama 2's margin variant when margins are given). Not
done: several responses per prompt ranked at once, reward centering. Every weight is trained (no LoRA: the head is
new and the base must move); the base is a causal LM checkpoint whose lm_head is dropped, or a reward model to
continue. Held-out pairs (--eval-data) give the eval loss and the pairwise accuracy (share of held-out pairs
whose chosen response scores higher; a tie counts as a miss) in metrics.jsonl, printed at the end.

Data: the same jsonl as `qwen25 train dpo` (`qwen25.train.pairs`). Output: an HF directory in transformers'
`Qwen2ForSequenceClassification` layout (`score.weight`, `pad_token_id` in config.json), which
`AutoModelForSequenceClassification.from_pretrained` loads, and which `--reward rm:DIR` uses in GRPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qwen25.cli_args import arg
from qwen25.train.pair_args import PairDataArgs, PairTrainArgs
from qwen25.weights.registry import DEFAULT_MODEL

__all__ = ["RMConfig", "main"]


@dataclass(kw_only=True)
class RMArgs(PairDataArgs):
    cli_group = "model and data"

    model: str = arg(DEFAULT_MODEL, short="-m")
    """base: a known name, a .gguf file or an HF directory (a causal LM; or a reward model to continue)"""
    margin: float = 0.0
    """added to every pair's margin (a record's optional "margin", else 0): the chosen score must beat the
    rejected one by this much"""


@dataclass(kw_only=True)
class RMConfig(PairTrainArgs, RMArgs):
    """Train a reward model on preference pairs (Bradley-Terry)."""

    cli_group = "training"

    lr: float = 5e-6
    """peak learning rate"""
    warmup_ratio: float = 0.05
    """warmup as a fraction of the optimizer steps"""


def main(cfg: RMConfig) -> int:
    import torch

    from qwen25.checkpoint import load, load_tokenizer
    from qwen25.runtime import configure_runtime, limit_heap_retention
    from qwen25.train.checkpointing import save_final_model
    from qwen25.train.distributed import init_distributed, shard_model, shutdown
    from qwen25.train.loop import train
    from qwen25.train.pairs import PairLoader, describe_stats, load_pairs, read_template
    from qwen25.train.reward_model import (RewardObjective, is_reward_model_dir, load_reward_model,
                                           reward_model_from_lm, reward_model_writer)
    from qwen25.weights.registry import resolve_model

    template = read_template(cfg.chat_template)
    path = resolve_model(cfg.model)
    ctx = init_distributed()
    configure_runtime(cfg.threads)
    limit_heap_retention()
    try:
        tokenizer = load_tokenizer(path)
        template = template or tokenizer.chat_template
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train_pairs, stats = load_pairs(cfg.data, tokenizer, template, cfg.seq_len, cfg.overlong)
        eval_pairs = load_pairs(cfg.eval_data, tokenizer, template, cfg.seq_len, cfg.overlong)[0] \
            if cfg.eval_data else None
        if ctx.is_main:
            print(f"rm data: {describe_stats(stats)}"
                  + (f"; {len(eval_pairs)} held-out pairs" if eval_pairs else ""), flush=True)
        if is_reward_model_dir(path):
            model = load_reward_model(path, trainable=True)
            if model.pad_token_id is None:  # a transformers save without one: batches are padded with ours
                model.pad_token_id = pad_id
            pad_id = model.pad_token_id
        else:
            lm = load(path, torch.float32, quantization="none", trainable=True).model
            model = reward_model_from_lm(lm, pad_id, seed=cfg.seed)
        model = model.to(ctx.device)
        model.model.inv_freq = model.model.inv_freq.to(ctx.device)
        model.train()
        if ctx.distributed:
            shard_model(model, mixed_precision=torch.bfloat16 if cfg.dtype == "bfloat16" else None)
        rank = dict(rank=ctx.rank, world_size=ctx.world_size)
        loader = PairLoader(train_pairs, cfg.batch_size, cfg.seed, pad_id,
                            identity={"data": Path(cfg.data).name, "seq_len": cfg.seq_len}, **rank)
        evals = None
        if eval_pairs is not None:
            evals = PairLoader(eval_pairs, min(cfg.batch_size, len(eval_pairs) // ctx.world_size or 1), cfg.seed,
                               pad_id, shuffle=False, identity={"eval": True}, drop_last=False, **rank)
        writer = reward_model_writer(ctx, tokenizer)
        fingerprint = {"kind": "rm", "model": model.config.to_dict(), "margin": cfg.margin,
                       "data": {"pairs": len(train_pairs), "name": Path(cfg.data).name}}
        result = train(model, loader, cfg, ctx=ctx, fingerprint=fingerprint, eval_loader=evals, write_model=writer,
                       description="rm", objective=RewardObjective(cfg.margin))
        save_final_model(ctx, Path(cfg.output), model, writer)
        if ctx.is_main:
            held_out = next((r for r in reversed(result.history) if "eval_accuracy" in r), None)
            accuracy = ""
            if held_out is not None and evals is not None:
                counted = len(evals) * evals.batch_size * ctx.world_size if evals.drop_last else len(eval_pairs)
                accuracy = f", held-out pairwise accuracy {held_out['eval_accuracy']:.1%} ({counted} pairs)"
            print(f"rm: {result.step} steps, final loss {result.losses[-1]:.4f}{accuracy}; reward model in "
                  f"{cfg.output} (transformers: AutoModelForSequenceClassification)", flush=True)
    finally:
        shutdown(ctx)
    return 0
