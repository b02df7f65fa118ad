"""Training checkpoints: atomic writes, exact resume (also at another world size), and output-directory guards.

A checkpoint is `<output>/checkpoint-<step>/`:

    config.json, model.safetensors, tokenizer files...   the model in HF layout (`qwen25.weights.save`), or
    adapter_config.json + adapter_model.safetensors       the LoRA adapter (peft's format) for LoRA runs
    dcp/                 model + optimizer state through torch.distributed.checkpoint, keyed by parameter name
                         (trainable parameters only), sharded by rank: loadable at any world size
    rank-<r>.pt          per rank: RNG states (python, numpy, torch, CUDA) and the data loader's state
    trainer_state.json   step, scheduler state, the run fingerprint, the metrics history (written last)

Everything is written to `<output>/.tmp-checkpoint-<step>/` and renamed into place once complete, so a crash
never leaves a directory named `checkpoint-<step>` that is half written; a leftover `.tmp-*` is removed on the
next save. `dcp/` holds the exact fp32 training weights (the HF copy is for use and export).

The output directory holds `run.json`: what the run trains (kind, model config, LoRA settings). A new run
refuses a directory that is not empty; `--resume` refuses a directory or checkpoint of another run, with one
line naming the difference, before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qwen25.train.distributed import DistContext, barrier, broadcast_object, is_sharded

RUN_FILE = "run.json"
STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"checkpoint-(\d+)$")

__all__ = ["TrainingRunError", "adapter_writer", "hf_writer", "list_checkpoints", "load_checkpoint", "prepare_output",
           "save_checkpoint", "save_final_model"]


class TrainingRunError(ValueError):
    """The output directory or checkpoint does not fit this run (one line, shown without a traceback)."""


# --- output directory and run identity --------------------------------------------------------------------
def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints in `output`, oldest first (temporary directories are never listed)."""
    found = []
    for p in Path(output).glob("checkpoint-*"):
        m = _CKPT.search(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _differences(saved: dict[str, Any], current: dict[str, Any], where: str = "") -> list[str]:
    found = []
    for key in [*saved, *(k for k in current if k not in saved)]:
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{where}{key}.")
        elif a != b:
            found.append(f"{where}{key} {a!r} there, {b!r} here")
    return found


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], what: str) -> None:
    diff = _differences(saved, current)
    if diff:
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise TrainingRunError(f"{what} belongs to a different run ({'; '.join(diff[:3])}{more}); nothing was "
                               "changed")


def prepare_output(ctx: DistContext, output: Path, fingerprint: dict[str, Any], resume: str | None) -> Path | None:
    """Check `output` against this run and claim it (run.json); the checkpoint to resume from, or None.

    resume: None (a new run), "latest" (the newest complete checkpoint in output, or a fresh start when output
    holds none yet), or the path of a checkpoint directory. Every rank gets rank 0's verdict."""
    verdict: Any = None
    if ctx.is_main:
        try:
            verdict = _prepare(Path(output), fingerprint, resume)
        except TrainingRunError as e:
            verdict = e
    verdict = broadcast_object(ctx, verdict)
    if isinstance(verdict, TrainingRunError):
        raise verdict
    return None if verdict is None else Path(verdict)


def _prepare(output: Path, fingerprint: dict[str, Any], resume: str | None) -> str | None:
    run_file = output / RUN_FILE
    if output.exists() and not output.is_dir():
        raise TrainingRunError(f"--output {output} is a file, not a directory")
    occupied = output.is_dir() and any(output.iterdir())
    if occupied and not run_file.is_file():
        raise TrainingRunError(f"--output {output} is not empty and holds no qwen25 training run; use a new or "
                               "empty directory")
    if occupied:
        check_fingerprint(json.loads(run_file.read_text()), fingerprint, f"--output {output}")
        # a run that stopped before logging a step (bad data, a typo) left only run.json: start it again
        occupied = any(p.name != RUN_FILE and not p.name.startswith(".") for p in output.iterdir())
        if resume is None and occupied:
            raise TrainingRunError(f"--output {output} already holds this run; continue it with --resume or use "
                                   "another --output")
    checkpoint: Path | None = None
    if resume not in (None, "latest"):
        checkpoint = Path(resume).expanduser()
        if not (checkpoint / STATE_FILE).is_file():
            raise TrainingRunError(f"--resume {resume}: not a complete training checkpoint (no {STATE_FILE})")
        state = json.loads((checkpoint / STATE_FILE).read_text())
        check_fingerprint(state["fingerprint"], fingerprint, f"--resume {resume}")
    elif resume == "latest" and occupied:
        found = list_checkpoints(output)
        checkpoint = found[-1] if found else None
    output.mkdir(parents=True, exist_ok=True)
    if not run_file.is_file():
        _write_json(run_file, fingerprint)
    return None if checkpoint is None else str(checkpoint)


# --- saving ---------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": msd, "optim": osd}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full CPU tensor: gathered on rank 0 under FSDP2 (empty on the other ranks; a
    collective, so every rank must call it), the model's own tensors otherwise."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    return json.loads(json.dumps(state))


def save_checkpoint(ctx: DistContext, output: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, data_state: dict[str, Any],
                    state: dict[str, Any], write_model: Callable[[nn.Module, Path], None] | None,
                    save_total_limit: int | None = None) -> Path:
    """Write checkpoint-<step> atomically (a collective: every rank calls it). `state` holds the JSON part
    (fingerprint, history, ...); write_model(model, dir) writes the HF directory or the adapter on rank 0."""
    import torch.distributed.checkpoint as dcp

    output = Path(output)
    final, tmp = output / f"checkpoint-{step}", output / f".tmp-checkpoint-{step}"
    if ctx.is_main:
        for stale in output.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    with _single_process_ok():
        dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp / "dcp"), no_dist=not ctx.distributed)
    torch.save({"rng": _rng_state(), "data": data_state}, tmp / f"rank-{ctx.rank}.pt")
    if write_model is not None:
        write_model(model, tmp)  # collective under FSDP2 (gathers the full weights)
    barrier(ctx)
    if ctx.is_main:
        _write_json(tmp / STATE_FILE, dict(state, step=step, world_size=ctx.world_size, data=data_state,
                                           scheduler=scheduler_state(scheduler)))
        if final.exists():  # the same step saved again (a resumed run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        if save_total_limit:
            for old in list_checkpoints(output)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return final


# --- the model part: an HF directory or a LoRA adapter -----------------------------------------------------
ModelWriter = Callable[[nn.Module, Path], None]


class _Gathered:
    """What `save_hf_directory` asks of a model (config + state_dict), over an FSDP2 model's gathered tensors."""

    def __init__(self, config: Any, state: dict[str, torch.Tensor]) -> None:
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def hf_writer(ctx: DistContext, tokenizer: Any = None, generation_config: Any = None) -> ModelWriter:
    """write(model, dir): the model as an HF directory (`qwen25.weights.save.save_hf_directory`) with the
    tokenizer's files, by rank 0; an FSDP2 model is gathered first (a collective)."""
    from qwen25.weights.save import save_hf_directory

    def write(model: nn.Module, out: Path) -> None:
        target: Any = model
        if is_sharded(model):
            target = _Gathered(model.config, full_state_dict(model))
        if ctx.is_main:
            save_hf_directory(target, out, tokenizer=tokenizer, generation_config=generation_config)

    return write


def adapter_writer(ctx: DistContext, lora_config: Any, base_model: str) -> ModelWriter:
    """write(model, dir): the LoRA adapter in peft's format (`qwen25.train.lora.save_adapter`), by rank 0."""
    from qwen25.train.lora import lora_state_dict, save_adapter

    def write(model: nn.Module, out: Path) -> None:
        if ctx.is_main:
            save_adapter(model, lora_config, out, base_model)
        elif is_sharded(model):
            lora_state_dict(model)  # the same gathers as rank 0's save_adapter (collectives)

    return write


def save_final_model(ctx: DistContext, output: Path, model: nn.Module, write_model: ModelWriter) -> Path:
    """The trained model into `output` itself (HF Trainer's layout: `qwen25 chat --model OUT` or
    `--lora OUT` use it): written to a temporary directory, then each file renamed into place."""
    output = Path(output)
    tmp = output / ".tmp-final"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    write_model(model, tmp)
    barrier(ctx)
    if ctx.is_main:
        for f in sorted(tmp.iterdir()):
            os.replace(f, output / f.name)
        tmp.rmdir()
    barrier(ctx)
    return output


# --- loading --------------------------------------------------------------------------------------------------
def load_checkpoint(ctx: DistContext, checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG from `checkpoint`; returns trainer_state.json
    with `data` set to this rank's loader state (rank 0's when the world size changed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    checkpoint = Path(checkpoint)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    sds = _state_dicts(model, optimizer)
    with _single_process_ok():
        dcp.load(sds, checkpoint_id=str(checkpoint / "dcp"), no_dist=not ctx.distributed)
    set_state_dict(model, optimizer, model_state_dict=sds["model"], optim_state_dict=sds["optim"],
                   options=StateDictOptions(strict=False, ignore_frozen_params=True))
    sched = dict(state["scheduler"], lr_lambdas=[None] * len(optimizer.param_groups))
    scheduler.load_state_dict(sched)
    same_world = state["world_size"] == ctx.world_size
    rank_file = checkpoint / f"rank-{ctx.rank if same_world else 0}.pt"
    saved = torch.load(rank_file, weights_only=False)
    _set_rng_state(saved["rng"])
    state["data"] = saved["data"]
    state["resharded"] = not same_world
    return state


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns on every single-process save/load, which is how one-rank runs use it on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
