"""`qwen25 train grpo`: online RL of a Qwen2.5 checkpoint with GRPO, sampling through qwen25's own engine.

Objective (`qwen25.train.grpo_objective`): for each prompt, G = --num-generations completions sampled from the
current policy; advantages normalised within the group (--scale-rewards group: (r - mean) / (std + 1e-4);
none: Dr. GRPO's r - mean); per token the PPO-clipped ratio (--epsilon 0.2, --epsilon-high for DAPO's
clip-higher) plus --beta x the k3 estimate of KL(policy || reference); summed over completion tokens and
normalised as --loss-type says: dapo (default: token mean over the whole global batch), grpo (per-sequence
mean, then mean over sequences) or dr_grpo (sum / (sequences x --max-completion-length)). One gradient step
per rollout, so the ratio is 1 with the gradient of log pi (TRL's num_iterations = 1). Kept: group advantages,
token clip, k3 KL, clip-higher. Dropped: DAPO's dynamic sampling (degenerate groups are counted in
all_equal_share) and soft overlong penalty, multiple updates per rollout. --mask-truncated-completions drops
completions the length limit cut from the loss (TRL issue 5697). log pi is the model's own distribution
(temperature 1) whatever --temperature the rollouts sample at; TRL divides the logits by the sampling
temperature first, so the two agree at the default --temperature 1.0 only.

Rollouts: `qwen25.train.grpo_rollout`, on the weights `qwen25.train.rollout_weights` keeps in step with the
policy (--rollout-weights q8: a q8 copy on the native kernels re-quantized in place after each update; policy:
the policy's own tensors, a prefix-cache reset); the sync is measured as sync_s. Reference: the starting weights; with --lora the same
model with its adapters switched off, otherwise a frozen copy (only when --beta > 0). Rewards:
`qwen25.train.rewards` specs (--reward math, --reward format:boxed=0.2, --reward rm:DIR...).

Outputs in --output: checkpoints (--resume continues one), metrics.jsonl (per step: loss, reward, reward_std,
kl, clip_fraction, entropy, completion_length, truncated_share, all_equal_share, reward_failures,
rollout_s / reward_s / ref_s / sync_s, rollout_tokens, reward/<name>), loss.png, reward.png (train reward per
step and the held-out mean reward before and after), heldout.json, and the final model or adapter.
Held-out reward: one greedy completion per --eval-data prompt (at most --eval-prompts), scored by the same
rewards, before and after (heldout.json); with --eval-every N also every N steps and at the end, sampled
rollouts of the first --eval-batches x --batch-size held-out prompts (same prompts and seeds each time) through
the objective: eval_reward, eval_kl, eval_loss... in metrics.jsonl. Single process: the engine cannot run FSDP2-sharded parameters (the objective itself can: see
tests/test_grpo_distributed.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qwen25.cli_args import arg
from qwen25.train.config import TrainArgs
from qwen25.train.sft import LoraArgs
from qwen25.weights.registry import DEFAULT_MODEL

__all__ = ["GRPOConfig", "heldout_reward", "main", "plot_rewards"]


@dataclass(kw_only=True)
class GRPOArgs:
    cli_group = "model, data and rewards"

    model: str = arg(DEFAULT_MODEL, short="-m")
    """policy to train (also the reference): a known name, a .gguf file (dequantized) or an HF directory"""
    data: str | None = arg(None, metavar="JSONL")
    """(required) prompts, one task per line: {"messages": [...]} or {"prompt": "..."} plus the fields the
    rewards check (answer, tests, schema)"""
    eval_data: str | None = arg(None, metavar="JSONL")
    """held-out prompts: mean reward of a greedy completion before and after training"""
    eval_prompts: int = 100
    """at most this many held-out prompts"""
    reward: list[str] = arg(None, metavar="SPEC")  # type: ignore[assignment]
    """(required, repeatable) a reward: math, code, json, format:PRESET, rm:DIR, each optionally =WEIGHT"""
    reward_timeout: float = 60.0
    """seconds a reward call may take before its samples score 0 (counted)"""
    chat_template: str | None = arg(None, metavar="FILE")
    """a Jinja chat template file (default: the model's own)"""
    raw_prompts: bool = False
    """use a string "prompt" as raw text instead of a chat user turn"""


@dataclass(kw_only=True)
class GRPOSampling:
    cli_group = "sampling"

    num_generations: int = 8
    """G: completions per prompt (>= 2; the group the advantages are normalised in)"""
    max_completion_length: int = 256
    """most generated tokens per completion"""
    temperature: float = 1.0
    """sampling temperature of the rollouts"""
    top_p: float = 1.0
    """nucleus sampling of the rollouts"""
    top_k: int = 0
    """top-k sampling of the rollouts (0: off)"""
    max_num_seqs: int = 64
    """sequences the engine decodes together"""
    rollout_weights: Literal["q8", "policy"] = "q8"
    """what the rollout engine runs: q8 (a q8 copy of the policy on the native kernels, re-quantized in place
    after every update; several times faster) or policy (the policy's own fp32 tensors on the PyTorch path:
    exact sampling log-probs, sync = a prefix-cache reset)"""


@dataclass(kw_only=True)
class GRPOConfig(TrainArgs, LoraArgs, GRPOSampling, GRPOArgs):
    """Train a Qwen2.5 checkpoint with GRPO, rollouts sampled by qwen25's engine (full or LoRA)."""

    cli_group = "training"

    lr: float | None = None  # type: ignore[assignment]
    """peak learning rate (default: 1e-6 full, 1e-5 with --lora)"""
    batch_size: int = 2
    """prompts per micro-batch (each brings --num-generations completions)"""
    seq_len: int = 1024
    """most tokens of prompt + completion (longer prompts are skipped and counted)"""
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    """decay after warmup (default: constant)"""
    warmup_ratio: float = 0.0
    """warmup as a fraction of the optimizer steps"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on matrices"""
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    """normalisation of the token losses: dapo (token mean over the global batch), grpo, dr_grpo"""
    beta: float = 0.04
    """weight of the k3 KL penalty to the reference (0: no reference needed)"""
    epsilon: float = 0.2
    """clip range of the ratio (lower side, and upper unless --epsilon-high)"""
    epsilon_high: float | None = None
    """upper clip range (DAPO's clip-higher, e.g. 0.28)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide advantages by the group's reward std (group), the batch's, or not at all (none: Dr. GRPO)"""
    mask_truncated_completions: bool = False
    """no loss on completions cut by --max-completion-length"""
    keep_zero_advantage: bool = False
    """run zero-advantage completions (groups whose rewards are all equal) through the policy's forward and
    backward anyway; by default they are left out when --beta is 0, since their loss and gradient are exactly
    zero (the normalisation still counts them; policy_row_share in metrics.jsonl says how many ran)"""

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = 1e-5 if self.lora else 1e-6
        super().__post_init__()
        if not self.reward:
            raise ValueError("--reward is required (e.g. --reward math), as a flag or a key of --config FILE")
        if self.num_generations < 2:
            raise ValueError(f"--num-generations must be >= 2 (a group needs a baseline), got {self.num_generations}")
        if self.beta < 0:
            raise ValueError(f"--beta must be >= 0, got {self.beta}")
        if self.max_completion_length < 1 or self.max_completion_length >= self.seq_len:
            raise ValueError(f"--max-completion-length must be in [1, --seq-len {self.seq_len}), got "
                             f"{self.max_completion_length}")
        if self.eval_every and self.eval_batches is None:
            self.eval_batches = 4  # each held-out batch is a full rollout: keep periodic evaluation affordable
        if self.eval_prompts < 1:
            raise ValueError(f"--eval-prompts must be >= 1, got {self.eval_prompts}")


def heldout_reward(engine: Any, prompts: list, rewards: list, weights: list[float], max_tokens: int,
                   timeout_s: float) -> float:
    """Mean reward of one greedy completion per prompt (the engine's current weights)."""
    from qwen25.sampling_params import SamplingParams
    from qwen25.train.grpo_rollout import sample_groups
    from qwen25.train.rewards import score_rewards

    engine.reset_prefix_cache()
    samples = sample_groups(engine, [p.ids for p in prompts], SamplingParams(temperature=0.0, max_tokens=max_tokens))
    scores = score_rewards(rewards, weights, [p.text for p in prompts], [s.text for s in samples],
                           [p.record for p in prompts], timeout_s=timeout_s)
    return sum(scores.totals) / len(scores.totals)


def plot_rewards(history: list[dict[str, Any]], heldout: dict[str, float], path: Path, title: str = "") -> None:
    """Train reward per step, and the held-out reward before (step 0) and after (last step), as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [(r["step"], r["reward"]) for r in history if "reward" in r and "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if steps:
        ax.plot(*zip(*steps), label="train (mean of the rollouts)", linewidth=1)
    sampled = [(r["step"], r["eval_reward"]) for r in history if "eval_reward" in r]
    if sampled:
        ax.plot(*zip(*sampled), "s-", markersize=3, label="held-out (sampled rollouts)")
    if "before" in heldout and "after" in heldout:
        last = steps[-1][0] if steps else 1
        ax.plot([0, last], [heldout["before"], heldout["after"]], "o--", label="held-out (greedy)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def main(cfg: GRPOConfig) -> int:
    import copy

    import torch

    from qwen25.checkpoint import load, load_tokenizer, stop_token_ids
    from qwen25.engine.engine import LLMEngine
    from qwen25.runtime import configure_runtime, limit_heap_retention
    from qwen25.sampling_params import SamplingParams
    from qwen25.train.checkpointing import adapter_writer, hf_writer, save_final_model
    from qwen25.train.distributed import init_distributed, shutdown
    from qwen25.train.grpo_data import load_prompts
    from qwen25.train.grpo_objective import GRPOObjective
    from qwen25.train.grpo_rollout import GRPOLoader
    from qwen25.train.loop import train
    from qwen25.train.pairs import read_template
    from qwen25.train.rewards import build_rewards
    from qwen25.train.rollout_weights import QuantizedCopy, SharedWeights
    from qwen25.weights.registry import resolve_model

    objective = GRPOObjective(cfg.loss_type, beta=cfg.beta, eps_low=cfg.epsilon, eps_high=cfg.epsilon_high,
                              max_completion_length=cfg.max_completion_length,
                              drop_truncated=cfg.mask_truncated_completions)
    template = read_template(cfg.chat_template)
    path = resolve_model(cfg.model)
    ctx = init_distributed()
    if ctx.distributed:
        shutdown(ctx)
        raise ValueError("qwen25 train grpo runs in one process: its engine samples from the policy's own "
                         "tensors, which FSDP2 would shard (drop torchrun)")
    configure_runtime(cfg.threads)
    limit_heap_retention()
    tokenizer = load_tokenizer(path)
    rewards, weights = build_rewards(cfg.reward, policy_tokenizer=tokenizer)
    template = template or tokenizer.chat_template
    room = cfg.max_completion_length
    prompts, counts = load_prompts(cfg.data, tokenizer, template, cfg.seq_len, chat=not cfg.raw_prompts,
                                   min_room=1)
    heldout_prompts = (load_prompts(cfg.eval_data, tokenizer, template, cfg.seq_len, chat=not cfg.raw_prompts,
                                    limit=cfg.eval_prompts)[0] if cfg.eval_data else None)
    print(f"grpo prompts: {counts['kept']} kept, {counts['too_long']} longer than --seq-len {cfg.seq_len} "
          f"(skipped), {counts['empty']} empty (skipped)"
          + (f"; held-out: {len(heldout_prompts)}" if heldout_prompts else ""), flush=True)
    checkpoint = load(path, torch.float32, quantization="none", trainable=not cfg.lora)
    model = checkpoint.model
    lora_config = None
    ref_model = None
    if cfg.lora:
        from qwen25.train.lora import LINEAR_MODULES, LoraConfig, apply_lora

        lora_config = LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                 target_modules=tuple(cfg.lora_target_modules or LINEAR_MODULES))
        apply_lora(model, lora_config)
    elif cfg.beta > 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    source = QuantizedCopy(model) if cfg.rollout_weights == "q8" else SharedWeights(model)
    engine = LLMEngine(source.model, tokenizer, max_num_seqs=cfg.max_num_seqs,
                       max_num_batched_tokens=max(512, cfg.seq_len),
                       max_model_len=min(cfg.seq_len, checkpoint.config.max_position_embeddings),
                       kv_cache_memory=max(64 << 20, _kv_bytes(source.model, cfg)), use_native=cfg.rollout_weights == "q8",
                       stop_token_ids=stop_token_ids(checkpoint))
    source.engine = engine
    if cfg.rollout_weights == "q8" and engine.runner.native is None:
        print("rollouts: no native kernel here (no C compiler or AVX2); the q8 copy runs on the PyTorch path",
              flush=True)
    params = SamplingParams(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            max_tokens=room, logprobs=0)
    loader = GRPOLoader(prompts, engine, rewards, weights, params, prompts_per_batch=cfg.batch_size, ctx=ctx,
                        pad_id=pad_id, seed=cfg.seed, scale=cfg.scale_rewards, beta=cfg.beta, ref_model=ref_model,
                        dtype=cfg.dtype, reward_timeout_s=cfg.reward_timeout, loss_type=cfg.loss_type,
                        mask_truncated=cfg.mask_truncated_completions, weights_source=source,
                        drop_zero_advantage=not cfg.keep_zero_advantage)
    heldout: dict[str, float] = {}
    if heldout_prompts and not cfg.resume:
        heldout["before"] = heldout_reward(engine, heldout_prompts, rewards, weights, room, cfg.reward_timeout)
        print(f"held-out mean reward before: {heldout['before']:.4f}", flush=True)
    evals = None
    if heldout_prompts and cfg.eval_every:  # sampled held-out rollouts every --eval-every steps: eval_reward, ...
        evals = GRPOLoader(heldout_prompts, engine, rewards, weights, params,
                           prompts_per_batch=min(cfg.batch_size, len(heldout_prompts)), ctx=ctx, pad_id=pad_id,
                           seed=cfg.seed + 1, scale=cfg.scale_rewards, beta=cfg.beta, ref_model=ref_model,
                           dtype=cfg.dtype, reward_timeout_s=cfg.reward_timeout, shuffle=False,
                           loss_type=cfg.loss_type, mask_truncated=cfg.mask_truncated_completions,
                           weights_source=source, drop_zero_advantage=not cfg.keep_zero_advantage)
    writer = (adapter_writer(ctx, lora_config, str(cfg.model)) if lora_config is not None else
              hf_writer(ctx, tokenizer, checkpoint.generation_defaults))
    fingerprint = {"kind": "grpo", "model": checkpoint.config.to_dict(), "beta": cfg.beta, "loss_type": cfg.loss_type,
                   "num_generations": cfg.num_generations, "rewards": list(cfg.reward),
                   "lora": None if lora_config is None else dataclasses.asdict(lora_config) | {
                       "target_modules": list(lora_config.target_modules)},
                   "data": {"prompts": len(prompts), "name": Path(cfg.data).name}}
    try:
        result = train(model, loader, cfg, ctx=ctx, fingerprint=fingerprint, eval_loader=evals, write_model=writer,
                       description="grpo", objective=objective)
        save_final_model(ctx, Path(cfg.output), model, writer)
    finally:
        shutdown(ctx)
    output = Path(cfg.output)
    if heldout_prompts:
        source.sync()  # the last update is not in the rollout weights yet
        heldout["after"] = heldout_reward(engine, heldout_prompts, rewards, weights, room, cfg.reward_timeout)
        print(f"held-out mean reward after: {heldout['after']:.4f}", flush=True)
    (output / "heldout.json").write_text(json.dumps({**heldout, "prompts": len(heldout_prompts or [])}) + "\n")
    try:
        plot_rewards(result.history, heldout, output / "reward.png", title=f"grpo: {output.name}")
    except ImportError:
        print("reward.png skipped: matplotlib is not installed", flush=True)
    last = next((r for r in reversed(result.history) if "reward" in r), {})
    print(f"grpo: {result.step} steps, final loss {result.losses[-1]:.4f}, last mean reward "
          f"{last.get('reward', float('nan')):.4f}; {'adapter' if cfg.lora else 'model'} in {output}", flush=True)
    return 0


def _kv_bytes(model: Any, cfg: GRPOConfig) -> int:
    """KV-cache bytes for every rollout sequence of a micro-batch at full length, in the dtype the engine stores
    for `model` (the rollout model: fp16 for the q8 copy, the activations' dtype for the policy's own tensors)."""
    import torch

    from qwen25.engine.engine import kv_cache_dtype_of

    c = model.config
    itemsize = torch.empty((), dtype=kv_cache_dtype_of(model, "auto")).element_size()
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * itemsize
    seqs = min(cfg.max_num_seqs, cfg.batch_size * cfg.num_generations)
    return per_token * cfg.seq_len * (seqs + 1)
