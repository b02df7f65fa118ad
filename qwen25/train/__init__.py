"""Training: the shared loop and the stages built on it (imports nothing; use the modules).

    config.py         TrainArgs: the options every stage shares (dataclass -> flags)
    optim.py          AdamW groups, warmup + cosine/linear schedule, global-norm clipping
    loop.py           train(): the objective (summed token CE / global loss tokens), accumulation, eval, checkpoints
    checkpointing.py  checkpoint-<step>/ (HF model or adapter + DCP state), atomic writes, resume and run guards
    metrics.py        metrics.jsonl, progress bar, loss.png, TensorBoard
    distributed.py    torchrun process groups and FSDP2 sharding (multi-node launch in its docstring)
    data.py           Batch, PackedLoader, SFTLoader        sft_data.py   conversations -> ids + loss mask
    lora.py           LoRA layers and peft-format adapters
    pretrain.py       `qwen25 train pretrain` (staged context)   sft.py   `qwen25 train sft` (full or LoRA)
    cli.py            registers `qwen25 train`
"""
