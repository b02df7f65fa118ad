"""The training loop every stage shares: batches in, optimizer steps, metrics, evaluation and checkpoints out.

Objective (pretraining and SFT alike): for each optimizer step, the global batch is the `grad_accum`
micro-batches of every rank; the loss is

    loss = sum over the global batch of -log p(label_t | tokens <= t)  /  number of labels != -100 in it

(summed token cross-entropy over the loss tokens of the whole accumulated, all-rank batch; labels are next
tokens, -100 where no loss). Every loss token weighs the same whatever row, micro-batch or rank holds it, so
one process with the whole batch and N ranks with a slice each compute the same gradient. The loss is in fp32
(logits are upcast); `--dtype bfloat16` runs the model under bf16 autocast.

`train()` builds AdamW and the schedule (`qwen25.train.optim`), restores a checkpoint when resuming
(`qwen25.train.checkpointing`), then per step: forward/backward every micro-batch, clip, step, log a record to
metrics.jsonl (`qwen25.train.metrics`), evaluate every `eval_every` steps, checkpoint every `save_every` steps
and at the end. The data stream moves through epochs on its own (`DataStream`), and its position is saved in
each checkpoint, so a resumed run sees exactly the batches the uninterrupted one would have.

Other objectives (DPO, the reward model, GRPO) plug in through `objective=`: a callable
`(model, batch, ctx, dtype) -> (loss_sum, extras)` returning the micro-batch's *summed* loss over its loss units
and a dict of detached metric sums over the same units; `batch.num_loss_units` (falling back to
`num_loss_tokens`) counts those units (tokens for CE, pairs for DPO and the reward model). The loop divides by
the global count of units exactly as above, logs each extra as its mean per unit, and evaluates with the same
objective (`eval_loss`, `eval_<extra>`). An objective may name `ratio_extras` ({extra: denominator extra}):
those are logged as the ratio of the two global sums instead (GRPO's per-token KL when its unit is a sequence),
and `loss_label`, the y-axis label of loss.png (what the loss is; default: mean token CE).
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qwen25.runtime import release_free_heap
from qwen25.train import checkpointing as ckpt
from qwen25.train.config import TrainArgs
from qwen25.train.linear_ce import linear_cross_entropy
from qwen25.train.distributed import DistContext, all_reduce_sum, is_sharded, set_gradient_sync
from qwen25.train.metrics import LOSS_LABEL, MetricsLog
from qwen25.train.optim import OptimSettings, build_optimizer, build_scheduler, clip_gradients

IGNORE_INDEX = -100

__all__ = ["DataStream", "Objective", "TrainResult", "enable_activation_checkpointing", "evaluate",
           "evaluate_metrics", "loss_units", "seed_everything", "token_ce_objective", "token_loss_sum", "train"]


class BatchLike(Protocol):  # qwen25.train.data.Batch
    input_ids: torch.Tensor
    labels: torch.Tensor
    document_ids: torch.Tensor
    num_loss_tokens: int


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: Any, ctx: DistContext,
                 dtype: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def _extra_means(objective: Any, sums: dict[str, float], units: int) -> dict[str, float]:
    """Each extra's global sum per loss unit, or per its denominator extra (`objective.ratio_extras`)."""
    ratios = getattr(objective, "ratio_extras", {})
    return {n: v / max(sums[ratios[n]], 1e-12) if n in ratios and ratios[n] in sums else v / max(units, 1)
            for n, v in sums.items()}


def loss_units(batch: Any) -> int:
    """How many units a micro-batch's summed loss is over (`num_loss_units`, else `num_loss_tokens`)."""
    return int(getattr(batch, "num_loss_units", batch.num_loss_tokens))


def token_ce_objective(model: nn.Module, batch: BatchLike, ctx: DistContext,
                       dtype: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The default objective: summed token cross-entropy (`token_loss_sum`), no extras."""
    return token_loss_sum(model, batch, ctx, dtype), {}


class Loader(Protocol):  # qwen25.train.data.PackedLoader / SFTLoader
    def __iter__(self) -> Iterator[BatchLike]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (torch.utils.checkpoint, non-reentrant). The
    layer's own forward is wrapped in place, so parameter names (and FSDP2's per-layer hooks) are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        inner = layer.forward

        @functools.wraps(inner)
        def forward(*args: Any, _inner: Callable = inner, **kwargs: Any) -> torch.Tensor:
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def autocast(ctx: DistContext, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bfloat16":
        return torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_loss_sum(model: nn.Module, batch: BatchLike, ctx: DistContext, dtype: str = "float32") -> torch.Tensor:
    """Summed token cross-entropy of one micro-batch (fp32 scalar; -100 labels excluded).

    On an unsharded model only the loss positions go through lm_head (SFT: the assistant tokens), in chunks whose
    logits are dropped as soon as their gradient is taken (`qwen25.train.linear_ce`): the (B, T, vocab) logits —
    2.5 GB for 4 x 1,024 tokens of Qwen2.5's vocabulary, times three with their softmax and gradient — never
    exist, and no matmul is recomputed. Under FSDP2 the root module's forward must run whole (its hooks gather the
    embedding, final norm and lm_head), so the logits are materialised there."""
    input_ids, labels = batch.input_ids.to(ctx.device), batch.labels.to(ctx.device)
    document_ids = batch.document_ids.to(ctx.device)
    if is_sharded(model) or not hasattr(model, "lm_head") or model.lm_head.bias is not None:
        with autocast(ctx, dtype):
            logits = model(input_ids, document_ids=document_ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    with autocast(ctx, dtype):
        hidden = model.model(input_ids, document_ids=document_ids)  # (B, T, H) after the final norm
    keep = labels != IGNORE_INDEX
    hidden, targets = hidden[keep], labels[keep]  # (N, H), (N,)
    if targets.numel() == 0:
        return hidden.sum().float() * 0.0  # no loss token: zero, still connected to the graph
    weight = model.lm_head.weight
    return linear_cross_entropy(hidden, weight, targets,
                                compute_dtype=torch.bfloat16 if dtype == "bfloat16" else weight.dtype)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[BatchLike], ctx: DistContext, dtype: str = "float32",
             max_batches: int | None = None) -> float:
    """Mean token CE over `batches` on every rank (at most max_batches each; all ranks must pass the same
    count, because FSDP2's forward is collective)."""
    return evaluate_metrics(model, batches, ctx, dtype, max_batches)["eval_loss"]


@torch.no_grad()
def evaluate_metrics(model: nn.Module, batches: Iterable[Any], ctx: DistContext, dtype: str = "float32",
                     max_batches: int | None = None, objective: Objective | None = None) -> dict[str, float]:
    """{"eval_loss": mean loss per unit, "eval_<extra>": each extra's mean per unit} of `objective` (default:
    token CE) over `batches`, on every rank (same batch-count rule as `evaluate`)."""
    objective = objective or token_ce_objective
    was_training = model.training
    model.eval()
    names: list[str] | None = None
    total: torch.Tensor | None = None
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        loss, extras = objective(model, batch, ctx, dtype)
        if names is None:
            names = sorted(extras)
            total = torch.zeros(2 + len(names), dtype=torch.float64, device=ctx.device)
        total[0] += loss.detach().double()
        total[1] += loss_units(batch)
        for j, name in enumerate(names):
            total[2 + j] += extras[name].detach().double()
    names = names or []
    total = all_reduce_sum(ctx, total if total is not None else torch.zeros(2, dtype=torch.float64, device=ctx.device))
    model.train(was_training)
    units = float(total[1])
    out = {"eval_loss": float(total[0]) / units if units > 0 else float("nan")}
    out |= {f"eval_{name}": float(total[2 + j]) / units if units > 0 else float("nan") for j, name in enumerate(names)}
    return out


class DataStream:
    """Micro-batches across epochs: epoch e is `set_epoch(e)` then one pass over the loader. Its state (the
    epoch and the loader's own position) resumes it exactly."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader
        self.epoch = 0
        self._it: Iterator[BatchLike] | None = None
        self._resumed = False

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.loader.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        self._it, self._resumed = None, True

    def next(self) -> BatchLike:
        for _ in range(3):  # the current epoch's remainder may be empty; a fresh epoch never is
            if self._it is None:
                if not self._resumed:
                    self.loader.set_epoch(self.epoch)
                self._resumed = False
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
        raise ValueError("the training data yields no batches (too little data for one batch of --batch-size "
                         "rows of --seq-len tokens?)")


@dataclass
class TrainResult:
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.history if "loss" in r]


def _steps(args: TrainArgs, loader: Loader, ctx: DistContext) -> int:
    if args.max_steps is not None:
        return args.max_steps
    per_rank = torch.tensor([len(loader)], dtype=torch.int64, device=ctx.device)  # NCCL reduces CUDA tensors
    if ctx.distributed:  # ranks may differ by a batch: all must run the same number of steps
        torch.distributed.all_reduce(per_rank, op=torch.distributed.ReduceOp.MIN)
    steps = args.epochs * int(per_rank) // args.grad_accum
    if steps < 1:
        raise ValueError(f"the training data has {int(per_rank)} batches per process, fewer than one optimizer "
                         f"step of --grad-accum {args.grad_accum}")
    return steps


def optim_settings(args: TrainArgs, total_steps: int) -> OptimSettings:
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * total_steps)
    return OptimSettings(lr=args.lr, min_lr=args.min_lr if args.min_lr is not None else args.lr / 10,
                         weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                         schedule=args.schedule, warmup_steps=warmup, total_steps=total_steps)


def train(model: nn.Module, loader: Loader, args: TrainArgs, *, ctx: DistContext, fingerprint: dict[str, Any],
          eval_loader: Loader | None = None, write_model: Callable[[nn.Module, Path], None] | None = None,
          description: str = "train", objective: Objective | None = None) -> TrainResult:
    """Train `model` (already sharded under FSDP2) on `loader` as `args` says; returns the losses and the last
    checkpoint. Claims args.output (see `checkpointing.prepare_output`) before anything else. objective: what
    to minimise (default: token CE; see the module docstring)."""
    objective = objective or token_ce_objective
    output = Path(args.output)
    resume_from = ckpt.prepare_output(ctx, output, fingerprint, args.resume)
    seed_everything(args.seed)
    if args.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    total_steps = _steps(args, loader, ctx)
    settings = optim_settings(args, total_steps)
    optimizer = build_optimizer(model, settings)
    scheduler = build_scheduler(optimizer, settings)
    stream = DataStream(loader)
    step, history = 0, []
    if resume_from is not None:
        state = ckpt.load_checkpoint(ctx, resume_from, model, optimizer, scheduler)
        step, history = state["step"], state["history"]
        stream.load_state_dict(state["data"])
        if ctx.is_main:
            print(f"resumed from {resume_from} at step {step}", flush=True)
    log = MetricsLog(output, enabled=ctx.is_main, report_to=args.report_to, total_steps=total_steps,
                     progress=not args.no_progress, history=history, description=description)
    params = [p for p in model.parameters() if p.requires_grad]
    eval_start = eval_loader.state_dict() if eval_loader is not None else None

    def held_out() -> dict[str, float]:
        eval_loader.load_state_dict(eval_start)  # every evaluation sees the same batches
        return evaluate_metrics(model, eval_loader, ctx, args.dtype, args.eval_batches, objective)
    last_checkpoint = resume_from
    started = time.perf_counter()
    elapsed_before = next((r["elapsed_s"] for r in reversed(history) if "elapsed_s" in r), 0.0)

    def checkpoint_now() -> Path:
        state = {"fingerprint": fingerprint, "history": log.history, "total_steps": total_steps}
        path = ckpt.save_checkpoint(ctx, output, step, model, optimizer, scheduler, stream.state_dict(), state,
                                    write_model, args.save_total_limit)
        log.plot(title=f"{description}: {output.name}",
                 loss_label=getattr(objective, "loss_label", LOSS_LABEL))
        return path

    try:
        while step < total_steps:
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            micro = [stream.next() for _ in range(args.grad_accum)]
            counts = all_reduce_sum(ctx, torch.tensor([sum(loss_units(b) for b in micro),
                                                       sum(b.input_ids.numel() for b in micro)], dtype=torch.int64,
                                                     device=ctx.device))
            loss_tokens, tokens = int(counts[0]), int(counts[1])
            # FSDP2 averages gradients over ranks; x world_size makes it the sum the objective asks for
            scale = ctx.world_size / max(loss_tokens, 1)
            loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
            extra_sums: dict[str, torch.Tensor] = {}
            for i, batch in enumerate(micro):
                set_gradient_sync(model, i == len(micro) - 1)
                part, extras = objective(model, batch, ctx, args.dtype)
                (part * scale).backward()
                loss_sum += part.detach().double()
                for name, value in extras.items():
                    extra_sums[name] = extra_sums.get(name, 0.0) + value.detach().double()
            grad_norm = clip_gradients(params, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            release_free_heap()  # the step's temporaries stop counting as resident (see qwen25.runtime)
            step += 1
            names = sorted(extra_sums)
            sums = all_reduce_sum(ctx, torch.stack([loss_sum] + [torch.as_tensor(extra_sums[n], dtype=torch.float64,
                                                                                   device=ctx.device) for n in names]))
            loss = float(sums[0]) / max(loss_tokens, 1)
            seconds = time.perf_counter() - t0
            log.log({"step": step, "epoch": stream.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                     "tokens": tokens, "loss_tokens": loss_tokens, "tokens_per_s": tokens / seconds,
                     **_extra_means(objective, dict(zip(names, sums[1:].tolist())), loss_tokens),
                     "elapsed_s": round(elapsed_before + time.perf_counter() - started, 3)})
            last = step == total_steps
            if eval_loader is not None and ((args.eval_every and step % args.eval_every == 0) or last):
                log.log({"step": step, **held_out()})
            if (args.save_every and step % args.save_every == 0) or last:
                last_checkpoint = checkpoint_now()
    finally:
        log.close()
    return TrainResult(step, log.history, last_checkpoint)
