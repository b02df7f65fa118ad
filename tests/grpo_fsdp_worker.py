"""`python tests/grpo_fsdp_worker.py --output DIR --loss-type T` (or under torchrun): GRPO's objective through the
real training loop on the toy model, with fixed rollouts (random prompts and completions, group advantages of
random rewards, reference and sampling log-probs from the starting weights), so one process and N FSDP2 ranks
can be compared step by step. Rank r takes its share of each step's rows; the global batch is the same."""

from __future__ import annotations

import argparse
import random

import torch

from train_toy import TOY_CONFIG

ROWS_PER_STEP, GROUP, STEPS = 8, 4, 3


def rollout_rows(seed: int = 0) -> list[dict]:
    """STEPS x ROWS_PER_STEP rows: prompt + completion ids, labels, advantage, truncated flag."""
    from qwen25.train.grpo_objective import group_advantages

    rng = random.Random(seed)
    rows = []
    for _ in range(STEPS):
        rewards = torch.tensor([float(rng.random() < 0.5) for _ in range(ROWS_PER_STEP)])
        advantages, _ = group_advantages(rewards, GROUP)
        for i in range(ROWS_PER_STEP):
            prompt = [rng.randrange(2, 256) for _ in range(rng.randrange(3, 7))]
            completion = [rng.randrange(2, 256) for _ in range(rng.randrange(2, 9))]
            rows.append({"prompt": prompt, "completion": completion, "advantage": float(advantages[i]),
                         "truncated": len(completion) == 8, "noise": [rng.gauss(0, 0.3) for _ in range(16)]})
    return rows


class FixedRollouts:
    """The loop's loader contract over precomputed rollout rows (one step = ROWS_PER_STEP rows, dealt by rank)."""

    def __init__(self, batches: list, rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size
        self.position = 0

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def __iter__(self):
        while self.position < len(self.batches):
            batch = self.batches[self.position]
            self.position += 1
            yield batch


def main() -> int:
    from qwen25.model.init import model_from_config
    from qwen25.train.config import TrainArgs
    from qwen25.train.distributed import DistContext, init_distributed, shard_model, shutdown
    from qwen25.train.grpo_objective import GRPOObjective, loss_units_for
    from qwen25.train.grpo_rollout import RolloutBatch, Sample, collate_rollouts
    from qwen25.train.logprobs import token_logps
    from qwen25.train.loop import train

    p = argparse.ArgumentParser()
    p.add_argument("--output", required=True)
    p.add_argument("--loss-type", default="dapo")
    p.add_argument("--mask-truncated", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    ctx = init_distributed()
    model = model_from_config(TOY_CONFIG, seed=0)
    rows = rollout_rows()
    share = ROWS_PER_STEP // ctx.world_size
    batches = []
    for step in range(STEPS):
        mine = rows[step * ROWS_PER_STEP + ctx.rank * share:step * ROWS_PER_STEP + (ctx.rank + 1) * share]
        samples = [Sample(r["prompt"], r["completion"], "", "length" if r["truncated"] else "stop") for r in mine]
        ids, labels = collate_rollouts(samples, pad_id=0)
        with torch.no_grad():  # reference and "sampling policy" = the starting weights (the latter perturbed)
            ref = token_logps(model.eval(), ids, labels, DistContext()).logps
        noise = torch.tensor([r["noise"][:ids.shape[1]] for r in mine])  # per row, whoever holds it
        old = ref + noise * (labels != -100)
        truncated = torch.tensor([r["truncated"] for r in mine])
        batch = RolloutBatch(ids, labels, torch.tensor([r["advantage"] for r in mine]), truncated, ref, old,
                             num_loss_tokens=int((labels != -100).sum()))
        batch.num_loss_units = loss_units_for(a.loss_type, labels, truncated, a.mask_truncated)
        batches.append(batch)
    model.train()
    if ctx.distributed:
        shard_model(model)
    objective = GRPOObjective(a.loss_type, beta=0.04, eps_high=0.28, max_completion_length=8,
                              drop_truncated=a.mask_truncated)
    args = TrainArgs(output=a.output, max_steps=STEPS, lr=3e-3, warmup_steps=0, batch_size=share, no_progress=True)
    train(model, FixedRollouts(batches, ctx.rank, ctx.world_size), args, ctx=ctx,
          fingerprint={"kind": "grpo-toy", "model": TOY_CONFIG.to_dict()}, objective=objective)
    shutdown(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
