"""Scale-out on torch.distributed: process-group setup and FSDP2 sharding of the Qwen2 model.

The same command runs on one process or many; `torchrun` supplies RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT and `init_distributed` reads them. The backend is NCCL when CUDA is present, else gloo
(CPU). Each decoder layer is `fully_shard`ed, then the root (embedding, final norm, lm_head — a tied head shares
the embedding's shard): parameters live as DTensors sharded over the ranks' dim 0, are all-gathered per layer for
forward and backward and freed after, and gradients are reduce-scattered. Every rank builds (or loads) the full
model before sharding, so startup memory is one full copy per process; that is fine up to a few billion
parameters per node.

The loop normalises the loss by the global batch's loss tokens and multiplies it by the world size, because
FSDP2 averages the reduce-scattered gradients over ranks: the result is the gradient of summed token CE over the
global batch / its loss tokens, identical (up to float summation order) to one process seeing the whole batch.

Mixed precision: with `--dtype bfloat16` the loop runs under bf16 autocast with fp32 master weights; under FSDP2
the policy is also `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`: parameters are
all-gathered in bf16 (half the traffic) and gradients reduced in fp32.

Checkpoints under FSDP2 go through torch.distributed.checkpoint (see `qwen25.train.checkpointing`): every rank
writes its shards, keyed by parameter name, so a run saved at N ranks resumes at M.

Launching:

    # one machine, 2 processes (CPU: gloo; GPUs: one process per GPU)
    torchrun --nproc_per_node 2 -m qwen25.cli train pretrain --data shards/ --output runs/tiny ...

    # several machines: the same command on each node (rendezvous through node 0, any free port)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0.example:29500 \\
        --rdzv_id my-run -m qwen25.cli train sft --model Qwen2.5-7B --data train.jsonl --output runs/sft

`--batch-size` is per process: the global batch is batch_size x grad_accum x world_size rows. The output
directory must be on storage every node can read and write (checkpoints are written by all ranks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "all_reduce_sum", "barrier", "init_distributed", "shard_model", "shutdown"]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    """The process group torchrun's environment describes (gloo on CPU, NCCL on CUDA); a single-process
    context when not launched by torchrun (or with WORLD_SIZE=1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistContext(rank, world, local, device)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(ctx: DistContext, value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (the tensor itself on one process)."""
    if ctx.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_object(ctx: DistContext, obj: object) -> object:
    """Rank 0's `obj` on every rank (for decisions every rank must share, such as an error message)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_model(model: nn.Module, mixed_precision: torch.dtype | None = None) -> nn.Module:
    """FSDP2: `fully_shard` every decoder layer, then the root. mixed_precision=torch.bfloat16 gathers bf16
    parameters and reduces fp32 gradients. Returns the (same, now sharded) model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy() if mixed_precision is None else MixedPrecisionPolicy(
        param_dtype=mixed_precision, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of an accumulated step (FSDP2 only)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
