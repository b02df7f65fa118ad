"""`qwen25 train sft`: supervised fine-tuning of a Qwen2.5 checkpoint on chat conversations, full or LoRA.

Objective: the model's own chat template renders each conversation (`qwen25.train.sft_data`); the loss is the
summed token cross-entropy of the assistant tokens only (each assistant turn's content and its closing
<|im_end|>), divided by the number of assistant tokens in the global batch (`qwen25.train.loop`). Several
conversations share a row with per-document attention; a conversation longer than --seq-len is truncated
(or dropped with --overlong drop), one without an assistant turn is skipped; both are counted and reported.

Defaults are the Qwen2.5 report's SFT recipe: 2 epochs, lr 7e-6 decaying (cosine) to 7e-7, weight decay 0.1,
gradient clipping at 1.0. With --lora (peft-style LoRA on every linear layer of the decoder: r 16, alpha 32,
dropout 0.05, base frozen) the default lr is 1e-4 -> 1e-5, the usual LoRA range. The base is loaded in fp32
(a GGUF dequantized); `--dtype bfloat16` trains under bf16 autocast.

Output: checkpoints (`checkpoint-<step>/`: the HF directory — or the adapter — plus the trainer's state),
metrics.jsonl, loss.png, and the final model in the output directory itself: an HF directory (`qwen25 chat
--model OUT`) or a peft adapter (`qwen25 chat --model BASE --lora OUT`; peft's `PeftModel.from_pretrained`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qwen25.cli_args import arg
from qwen25.train.config import TrainArgs
from qwen25.weights.registry import DEFAULT_MODEL

FULL_LR, LORA_LR = 7e-6, 1e-4

__all__ = ["SFTConfig", "main"]


@dataclass(kw_only=True)
class SFTArgs:
    cli_group = "model and data"

    model: str = arg(DEFAULT_MODEL, short="-m")
    """base model: a known name, a .gguf file (dequantized) or an HF directory"""
    data: str | None = arg(None, metavar="JSONL")
    """(required) conversations, one per line: {"messages": [...]} (OpenAI roles, tools, tool_calls) or
    {"prompt", "completion"}"""
    eval_data: str | None = arg(None, metavar="JSONL")
    """held-out conversations for the eval loss"""
    chat_template: str | None = arg(None, metavar="FILE")
    """a Jinja chat template file to render with (default: the model's own)"""
    overlong: Literal["truncate", "drop"] = "truncate"
    """what to do with a conversation longer than --seq-len (counted either way)"""
    packing: Literal["best_fit", "next_fit"] = "best_fit"
    """how conversations share rows: best_fit (longest first into the fullest row that holds it: least padding)
    or next_fit (in shuffled order, a new row when the next one does not fit)"""


@dataclass(kw_only=True)
class LoraArgs:
    cli_group = "LoRA"

    lora: bool = False
    """train a LoRA adapter instead of every weight (the base stays frozen)"""
    lora_r: int = 16
    """adapter rank"""
    lora_alpha: int = 32
    """scale: the update is B A x * alpha / r"""
    lora_dropout: float = 0.05
    """dropout on the adapter's input"""
    lora_target_modules: list[str] | None = arg(None, metavar="NAME")
    """projection to adapt (repeatable; default: all of q/k/v/o/gate/up/down)"""


@dataclass(kw_only=True)
class SFTConfig(TrainArgs, LoraArgs, SFTArgs):
    """Fine-tune a Qwen2.5 checkpoint on chat conversations (full or LoRA)."""

    cli_group = "training"  # the TrainArgs fields given other defaults here stay in their group

    lr: float | None = None  # type: ignore[assignment]
    """peak learning rate (default: 7e-6 full, as the Qwen2.5 report; 1e-4 with --lora)"""
    epochs: int = 2
    """passes over the data (ignored when --max-steps is given)"""
    batch_size: int = 4
    """rows per micro-batch per process; global batch = batch-size x grad-accum x processes"""
    seq_len: int = 2048
    """tokens per row (conversations are packed into rows)"""
    adam_beta2: float = 0.999
    """AdamW beta2"""
    warmup_ratio: float = 0.03
    """warmup as a fraction of the optimizer steps"""

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = LORA_LR if self.lora else FULL_LR
        super().__post_init__()


def main(cfg: SFTConfig) -> int:
    import dataclasses

    import torch

    from qwen25.checkpoint import load, load_tokenizer
    from qwen25.runtime import TRAINING_MMAP_THRESHOLD, configure_runtime, limit_heap_retention
    from qwen25.train.checkpointing import adapter_writer, hf_writer, save_final_model
    from qwen25.train.data import SFTLoader
    from qwen25.train.distributed import init_distributed, shard_model, shutdown
    from qwen25.train.loop import train
    from qwen25.weights.registry import resolve_model

    template = None
    if cfg.chat_template is not None:
        try:
            template = Path(cfg.chat_template).expanduser().read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--chat-template {cfg.chat_template}: cannot read it ({e.strerror or e})") from None
    lora_config = None
    if cfg.lora:
        from qwen25.train.lora import LINEAR_MODULES, LoraConfig

        lora_config = LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                 target_modules=tuple(cfg.lora_target_modules or LINEAR_MODULES))
    path = resolve_model(cfg.model)  # a wrong path fails here, in one line, before anything loads
    ctx = init_distributed()
    configure_runtime(cfg.threads)
    limit_heap_retention(TRAINING_MMAP_THRESHOLD)  # freed activations go back instead of piling up
    try:
        tokenizer = load_tokenizer(path)  # data problems show before the (slow) model load
        template = template or tokenizer.chat_template
        rank = dict(rank=ctx.rank, world_size=ctx.world_size, overlong=cfg.overlong, packing=cfg.packing)
        loader = SFTLoader(cfg.data, tokenizer, template, cfg.seq_len, cfg.batch_size, cfg.seed, **rank)
        evals = (SFTLoader(cfg.eval_data, tokenizer, template, cfg.seq_len, cfg.batch_size, cfg.seed, **rank)
                 if cfg.eval_data else None)
        if ctx.is_main:
            print(f"sft data: {_stats(loader.stats)}", flush=True)
        checkpoint = load(path, torch.float32, quantization="none", trainable=not cfg.lora)
        model = checkpoint.model.to(ctx.device)
        model.model.inv_freq = model.model.inv_freq.to(ctx.device)
        if lora_config is not None:
            from qwen25.train.lora import apply_lora

            apply_lora(model, lora_config)
            model.train()
        if ctx.distributed:
            shard_model(model, mixed_precision=torch.bfloat16 if cfg.dtype == "bfloat16" else None)
        writer = (adapter_writer(ctx, lora_config, str(cfg.model)) if lora_config is not None else
                  hf_writer(ctx, tokenizer, checkpoint.generation_defaults))
        fingerprint = {"kind": "sft", "model": checkpoint.config.to_dict(),
                       "lora": None if lora_config is None else dataclasses.asdict(lora_config) | {
                           "target_modules": list(lora_config.target_modules)},
                       "data": loader.state_dict()["data"]}
        result = train(model, loader, cfg, ctx=ctx, fingerprint=fingerprint, eval_loader=evals, write_model=writer,
                       description="sft")
        save_final_model(ctx, Path(cfg.output), model, writer)
        if ctx.is_main:
            kind = "adapter" if cfg.lora else "model"
            use = f"--model {cfg.model} --lora {cfg.output}" if cfg.lora else f"--model {cfg.output}"
            print(f"sft: {result.step} steps, final loss {result.losses[-1]:.4f}; {kind} in {cfg.output} "
                  f"(qwen25 chat {use})", flush=True)
    finally:
        shutdown(ctx)
    return 0


def _stats(stats: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stats.items())
