"""GRPO's rollouts: G samples per prompt from qwen25's own engine with the current policy, scored, as batches.

Weight sync: the engine runs the weights a `qwen25.train.rollout_weights` source keeps in step with the policy:
the policy's own tensors (`SharedWeights`, the default here: with LoRA the `LoraLinear` modules run B A x beside
the frozen base, and a sync only drops the prefix cache) or a q8 copy on the native kernels that each sync
re-quantizes in place (`QuantizedCopy`, what `qwen25 train grpo` uses by default). `sync()` runs before every
rollout and its seconds are the measured `sync_s`. Reference and policy log-probs always come from the policy
module (`weights_source.policy`), never from the copy. No FSDP2 here (sharded parameters are not a model the
engine can run), so rollouts are single-process.

`GRPOLoader` follows the training loop's loader contract (`qwen25.train.loop`: set_epoch, __iter__, __len__,
state_dict / load_state_dict). Each micro-batch takes the next `prompts_per_batch` prompts of the epoch's
shuffled order, samples `num_generations` completions of each (one engine request with n = G: one prefill,
continuous batching over all of them, sampling seeded by (seed, epoch, batch), so a resumed run replays the
same prompts and seeds), scores them with `score_rewards` (a raising or hanging reward scores 0 and is
counted), computes group advantages (`qwen25.train.grpo_objective.group_advantages`) and the reference
log-probs (LoRA: the same model with the adapters switched off, so no second model is resident; full: a frozen
copy, only when beta > 0), and yields a `RolloutBatch`. Rows are prompt + completion right-padded; labels are
the completion tokens (the stop token included), -100 elsewhere.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from qwen25.sampling_params import SamplingParams
from qwen25.train.distributed import DistContext
from qwen25.train.grpo_data import PromptRecord
from qwen25.train.grpo_objective import Scale, group_advantages, loss_units_for
from qwen25.train.logprobs import token_logps
from qwen25.train.loop import IGNORE_INDEX
from qwen25.train.rewards import Reward, score_rewards
from qwen25.train.rollout_weights import QuantizedCopy, SharedWeights

__all__ = ["GRPOLoader", "RolloutBatch", "Sample", "adapters_disabled", "collate_rollouts",
           "drop_zero_advantage_rows", "sample_groups"]


@dataclass
class Sample:
    prompt: list[int]
    completion: list[int]
    text: str
    finish_reason: str | None
    engine_logps: list[float] = field(default_factory=list)  # log p of each sampled token, as the engine saw it

    @property
    def is_truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # (B, T) prompt + completion, right-padded
    labels: torch.Tensor  # (B, T) next token on completion positions, -100 elsewhere
    advantages: torch.Tensor  # (B,)
    truncated: torch.Tensor  # (B,) bool: the length limit cut the completion
    ref_logps: torch.Tensor | None  # (B, T) reference log p on the labelled positions, 0 elsewhere
    old_logps: torch.Tensor | None = None  # (B, T) sampling-policy log p (None: the current policy)
    rewards: torch.Tensor | None = None  # (B,)
    stats: dict[str, float] = field(default_factory=dict)  # rollout-level metrics (means, seconds)
    num_loss_units: int = 0  # set by the objective's unit convention (sequences or tokens)
    num_loss_tokens: int = 0
    dropped_tokens: int = 0  # masked completion tokens of rows left out (`drop_zero_advantage_rows`)


def drop_zero_advantage_rows(batch: RolloutBatch, drop_truncated: bool = False) -> RolloutBatch:
    """The batch without its zero-advantage rows, for a beta = 0 objective: their loss and gradient are exactly
    zero, so only the work changes. The loss units stay the full batch's (the normalisation counts every
    completion) and `dropped_tokens` keeps their masked-token count for the token-mean metrics. At least one
    row is kept (the loop needs a forward); rows of a ref/old log-prob batch are refused (beta > 0 has a KL
    term on every row)."""
    if batch.ref_logps is not None:
        raise ValueError("zero-advantage rows carry a KL term when beta > 0: they cannot be dropped")
    keep = batch.advantages != 0
    if bool(keep.all()):
        return batch
    if not bool(keep.any()):
        keep[0] = True
    mask = (batch.labels != IGNORE_INDEX)
    if drop_truncated:
        mask = mask & ~batch.truncated.unsqueeze(1)
    dropped = int(mask[~keep].sum())

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[keep]

    return replace(batch, input_ids=batch.input_ids[keep], labels=batch.labels[keep],
                   advantages=batch.advantages[keep], truncated=batch.truncated[keep],
                   old_logps=rows(batch.old_logps), rewards=rows(batch.rewards),
                   dropped_tokens=batch.dropped_tokens + dropped)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[bool]:
    """Run the base model: every LoraLinear's update scaled by 0 inside the block. Yields whether any was found."""
    from qwen25.train.lora import LoraLinear

    loras = [m for m in model.modules() if isinstance(m, LoraLinear)]
    saved = [m.scaling for m in loras]
    for m in loras:
        m.scaling = 0.0
    try:
        yield bool(loras)
    finally:
        for m, s in zip(loras, saved, strict=True):
            m.scaling = s


def sample_groups(engine: Any, prompts: Sequence[list[int]], params: SamplingParams) -> list[Sample]:
    """params.n samples of every prompt through the engine (one request each, all in flight together), in
    prompt order then sample order; the policy runs in eval mode (no dropout) and is put back as it was."""
    model = engine.model
    was_training = model.training
    model.eval()
    try:
        results = engine.generate([list(p) for p in prompts], params)
    finally:
        model.train(was_training)
    out = []
    for r in results:
        logps = [lp[0] for lp in r.logprobs] if r.logprobs else []
        out.append(Sample(r.prompt_token_ids, list(r.token_ids), r.text, r.finish_reason, logps))
    return out


def collate_rollouts(samples: Sequence[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) (B, T): prompt + completion right-padded, labels on the completion tokens only."""
    width = max(len(s.prompt) + len(s.completion) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        row = s.prompt + s.completion
        ids[i, :len(row)] = torch.tensor(row)
        if s.completion:  # labels[t] = the token after t: completion token j sits at len(prompt) + j
            labels[i, len(s.prompt) - 1:len(row) - 1] = torch.tensor(s.completion)
    return ids, labels


class GRPOLoader:
    """Rollout micro-batches for the training loop (see the module docstring)."""

    def __init__(self, prompts: list[PromptRecord], engine: Any, rewards: Sequence[Reward],
                 weights: Sequence[float], params: SamplingParams, *, prompts_per_batch: int, ctx: DistContext,
                 pad_id: int, seed: int = 0, scale: Scale = "group", beta: float = 0.0,
                 ref_model: nn.Module | None = None, dtype: str = "float32", reward_timeout_s: float = 60.0,
                 shuffle: bool = True, loss_type: str = "dapo", mask_truncated: bool = False,
                 weights_source: SharedWeights | QuantizedCopy | None = None,
                 drop_zero_advantage: bool = False) -> None:
        """weights_source: what the engine runs and how it follows the policy (`qwen25.train.rollout_weights`;
        default: the engine runs the policy itself, `engine.model`). drop_zero_advantage: with beta = 0,
        leave zero-advantage rows out of the batches (`drop_zero_advantage_rows`)."""
        if params.n < 2:
            raise ValueError(f"GRPO needs at least 2 samples per prompt (--num-generations), got {params.n}")
        if prompts_per_batch < 1:
            raise ValueError(f"prompts per micro-batch must be >= 1, got {prompts_per_batch}")
        if len(prompts) < prompts_per_batch:
            raise ValueError(f"{len(prompts)} prompts cannot fill one micro-batch of {prompts_per_batch}")
        self.prompts, self.engine, self.rewards, self.weights = prompts, engine, list(rewards), list(weights)
        self.params, self.per_batch, self.ctx, self.pad_id = params, prompts_per_batch, ctx, pad_id
        self.seed, self.scale, self.beta, self.ref_model, self.dtype = seed, scale, beta, ref_model, dtype
        self.reward_timeout_s, self.shuffle = reward_timeout_s, shuffle
        self.loss_type, self.mask_truncated = loss_type, mask_truncated
        self.epoch, self.position = 0, 0  # position: micro-batches consumed in this epoch
        if weights_source is None:
            weights_source = SharedWeights(engine.model)
            weights_source.engine = engine
        self.weights_source = weights_source
        self.drop_zero_advantage = drop_zero_advantage and beta == 0

    def __len__(self) -> int:
        return len(self.prompts) // self.per_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _order(self) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[RolloutBatch]:
        order = self._order()
        while self.position < len(self):
            index = self.position
            chosen = [self.prompts[i] for i in order[index * self.per_batch:(index + 1) * self.per_batch]]
            self.position += 1
            yield self.rollout(chosen, seed=(self.seed * 1_000_003 + self.epoch * 10_007 + index) % (1 << 31))

    def sync(self) -> float:
        """Make the engine sample from the weights as they are now; returns the seconds it took."""
        return self.weights_source.sync()

    @torch.no_grad()
    def reference_logps(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, T) reference log-probs on the labelled positions: adapters off (LoRA) or the frozen copy."""
        policy = self.weights_source.policy
        was_training = policy.training
        policy.eval()
        try:
            if self.ref_model is not None:
                return token_logps(self.ref_model, input_ids, labels, self.ctx, self.dtype).logps
            with adapters_disabled(policy) as found:
                if not found:
                    raise ValueError("beta > 0 without LoRA needs a reference model (ref_model)")
                return token_logps(policy, input_ids, labels, self.ctx, self.dtype).logps
        finally:
            policy.train(was_training)

    def rollout(self, chosen: Sequence[PromptRecord], seed: int) -> RolloutBatch:
        """One scored micro-batch: sync, sample G completions of each prompt, rewards, advantages, reference."""
        sync_s = self.sync()
        t0 = time.perf_counter()
        samples = sample_groups(self.engine, [p.ids for p in chosen], replace(self.params, seed=seed))
        rollout_s = time.perf_counter() - t0
        g = self.params.n
        records = [p for p in chosen for _ in range(g)]
        t1 = time.perf_counter()
        scores = score_rewards(self.rewards, self.weights, [p.text for p in records], [s.text for s in samples],
                               [p.record for p in records], timeout_s=self.reward_timeout_s)
        reward_s = time.perf_counter() - t1
        rewards = torch.tensor(scores.totals, dtype=torch.float32)
        advantages, all_equal = group_advantages(rewards, g, self.scale)
        input_ids, labels = collate_rollouts(samples, self.pad_id)
        t2 = time.perf_counter()
        ref = self.reference_logps(input_ids, labels).cpu() if self.beta > 0 else None
        ref_s = time.perf_counter() - t2
        truncated = torch.tensor([s.is_truncated for s in samples])
        lengths = [len(s.completion) for s in samples]
        stats = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                 "completion_length": sum(lengths) / len(lengths), "truncated_share": float(truncated.float().mean()),
                 "all_equal_share": float(all_equal.float().mean()), "reward_failures": float(scores.num_failures),
                 "rollout_s": rollout_s, "reward_s": reward_s, "ref_s": ref_s, "sync_s": sync_s,
                 "rollout_tokens": float(sum(lengths))}
        stats.update({k: v for k, v in scores.metrics().items() if k.startswith("reward/")})
        batch = RolloutBatch(input_ids, labels, advantages, truncated, ref, rewards=rewards, stats=stats,
                             num_loss_tokens=int((labels != IGNORE_INDEX).sum()))
        batch.num_loss_units = loss_units_for(self.loss_type, labels, truncated, self.mask_truncated)
        if self.drop_zero_advantage:
            batch = drop_zero_advantage_rows(batch, self.mask_truncated)
            batch.stats["policy_row_share"] = batch.input_ids.size(0) / input_ids.size(0)
        return batch
