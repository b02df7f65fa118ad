"""`qwen25 train pretrain`: a Qwen2 model from scratch on packed token shards, in two context stages.

Objective: next-token prediction on packed pretraining text — summed token cross-entropy over every position
whose next token belongs to the same document, divided by the number of such positions in the global batch
(`qwen25.train.loop`). Documents are packed into rows with per-document attention and positions restarting at
each document (`qwen25.train.data.PackedLoader`).

Staged context, as the Qwen2.5 report does it (4,096 tokens at RoPE base 10,000, then 32,768 at 1,000,000 —
"ABF"), scaled down: stage 1 trains at `--seq-len` with `--rope-theta` (10,000); stage 2 continues from stage
1's final weights at `--stage2-seq-len` (4x) with `--stage2-rope-theta` (1,000,000), the RoPE frequencies
recomputed (`Qwen2Model.reset_rope`), a fresh optimizer and its own warmup + decay over `--stage2-steps`
starting from the rate stage 1 ended at (`--stage2-lr` sets another). Each stage is a run directory of its own
(`<output>/stage1`, `<output>/stage2`: checkpoints, metrics.jsonl, loss.png, the final model in HF layout with
the tokenizer); `--resume` continues whichever stage was running.
After each stage, with `--eval-data`, the held-out loss by position bucket (the position of a token within its
document, measured on rows of the stage-2 length) goes to `<output>/position_loss.{json,md}`: with enough
training it shows the stage-1 model losing ground past its training length and stage 2 recovering it.

Model configs: `tiny` (below: 8 layers, hidden 256, ~10.3M parameters besides the embedding, the real Qwen2.5
vocabulary of 151,936 tokens), any preset name of `qwen25.config.PRESETS`, or a config.json (file or HF
directory). Weights are initialised as `qwen25.model.init` does (N(0, 0.02), GPT-2 / HF Qwen2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen25.cli_args import arg
from qwen25.config import ENDOFTEXT_ID, ModelConfig, preset
from qwen25.train.config import TrainArgs

# ~10.3M parameters besides the 38.9M-parameter (tied) embedding; head_dim 64 as in the real models.
TINY = ModelConfig(vocab_size=151936, hidden_size=256, intermediate_size=1408, num_hidden_layers=8,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=10_000.0,
                   tie_word_embeddings=True, bos_token_id=ENDOFTEXT_ID, eos_token_id=ENDOFTEXT_ID,
                   torch_dtype="float32")
MODEL_PRESETS = {"tiny": TINY}

__all__ = ["MODEL_PRESETS", "PretrainConfig", "TINY", "main", "position_losses", "resolve_model_config"]


@dataclass(kw_only=True)
class PretrainArgs:
    cli_group = "model and data"

    data: str | None = arg(None, metavar="SHARD_DIR")
    """packed token shards (`qwen25 data pack`; required)"""
    eval_data: str | None = arg(None, metavar="SHARD_DIR")
    """held-out shards: eval loss during training and the position-bucket table after each stage"""
    model_config: str = arg("tiny", metavar="NAME|config.json")
    """tiny (~10M + embedding), a preset such as qwen2.5-0.5b, or a config.json / HF directory"""
    tokenizer: str | None = arg(None, metavar="MODEL_OR_DIR")
    """tokenizer saved with the checkpoints (default: the one the shards were packed with)"""
    rope_theta: float = 10_000.0
    """stage-1 RoPE base"""
    stage2_steps: int = 0
    """optimizer steps of stage 2 (0 = stage 1 only)"""
    stage2_seq_len: int | None = None
    """stage-2 row length (default: 4 x --seq-len)"""
    stage2_rope_theta: float = 1_000_000.0
    """stage-2 RoPE base (adjusted base frequency, ABF)"""
    stage2_batch_size: int | None = None
    """stage-2 rows per micro-batch (default: --batch-size / 4, the same tokens per step)"""
    stage2_lr: float | None = None
    """stage-2 peak learning rate (default: where stage 1 ended, --min-lr or lr / 10; it decays to a tenth
    of that)"""
    position_eval_batches: int = 8
    """batches per process for the position-bucket table"""


@dataclass(kw_only=True)
class PretrainConfig(TrainArgs, PretrainArgs):
    """Pretrain a Qwen2 model from scratch on packed token shards, with staged context."""

    cli_group = "training"  # the TrainArgs fields given other defaults here stay in their group

    seq_len: int = 256
    """stage-1 tokens per row"""
    lr: float = 1e-3
    """peak learning rate"""
    warmup_ratio: float = 0.05
    """warmup as a fraction of the optimizer steps"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage2_steps < 0:
            raise ValueError(f"--stage2-steps must be >= 0, got {self.stage2_steps}")


def resolve_model_config(spec: str) -> ModelConfig:
    """`tiny`, a preset name, or a config.json file / HF directory -> ModelConfig (one-line errors)."""
    if spec in MODEL_PRESETS:
        return MODEL_PRESETS[spec]
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        return ModelConfig.from_json_file(path)
    try:
        return preset(spec)
    except KeyError:
        raise ValueError(f"--model-config {spec}: not tiny, a preset (e.g. qwen2.5-0.5b) or a config.json") from None


def _buckets(length: int) -> list[tuple[int, int]]:
    """Position buckets up to `length`: [0, L/16), [L/16, L/8), [L/8, L/4), [L/4, L/2), [L/2, L) with L the
    stage-2 length, so the stage-1 length (L/4) is an edge."""
    edges = [0, length // 16, length // 8, length // 4, length // 2, length]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def position_losses(model: Any, loader: Any, ctx: Any, dtype: str, max_batches: int) -> list[dict[str, Any]]:
    """Held-out mean token CE per bucket of the position within the document (every rank gets the totals)."""
    import torch
    import torch.nn.functional as F

    from qwen25.model.rope import positions_in_documents
    from qwen25.train.distributed import all_reduce_sum
    from qwen25.train.loop import autocast

    buckets = _buckets(loader.seq_len)
    totals = torch.zeros(len(buckets), 2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    loader.set_epoch(0)
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            with autocast(ctx, dtype):
                logits = model(batch.input_ids.to(ctx.device), document_ids=batch.document_ids.to(ctx.device))
            ce = F.cross_entropy(logits.float().transpose(1, 2), batch.labels.to(ctx.device), ignore_index=-100,
                                 reduction="none").double().cpu()
            positions, keep = positions_in_documents(batch.document_ids), batch.labels != -100
            for k, (a, b) in enumerate(buckets):
                m = keep & (positions >= a) & (positions < b)
                totals[k, 0] += ce[m].sum()
                totals[k, 1] += m.sum()
    model.train(was_training)
    totals = all_reduce_sum(ctx, totals.to(ctx.device)).cpu()
    return [{"positions": f"{a}-{b - 1}", "loss": float(s / n) if n else None, "tokens": int(n)}
            for (a, b), (s, n) in zip(buckets, totals.tolist())]


def write_position_table(output: Path, results: dict[str, list[dict[str, Any]]]) -> None:
    (output / "position_loss.json").write_text(json.dumps(results, indent=1) + "\n")
    stages = list(results)
    header = "| positions | " + " | ".join(stages) + " |"
    lines = ["Held-out loss (mean token CE, nats) by position within the document", "", header,
             "|---" * (len(stages) + 1) + "|"]
    for i, bucket in enumerate(results[stages[0]]):
        cells = [f"{results[s][i]['loss']:.3f}" if results[s][i]["loss"] is not None else "-" for s in stages]
        lines.append(f"| {bucket['positions']} ({bucket['tokens']} tokens) | " + " | ".join(cells) + " |")
    (output / "position_loss.md").write_text("\n".join(lines) + "\n")


def main(cfg: PretrainConfig) -> int:
    import dataclasses

    from qwen25.checkpoint import load_tokenizer
    from qwen25.data.shards import read_manifest
    from qwen25.model.init import model_from_config
    from qwen25.runtime import TRAINING_MMAP_THRESHOLD, configure_runtime, limit_heap_retention
    from qwen25.train.checkpointing import TrainingRunError, hf_writer, save_final_model
    from qwen25.train.data import PackedLoader
    from qwen25.train.distributed import init_distributed, shard_model, shutdown
    from qwen25.train.loop import train
    from qwen25.weights.registry import resolve_model

    config = resolve_model_config(cfg.model_config)
    stage2_len = cfg.stage2_seq_len or 4 * cfg.seq_len
    config = config.replace(rope_theta=cfg.rope_theta, max_position_embeddings=max(
        config.max_position_embeddings, stage2_len if cfg.stage2_steps else cfg.seq_len))
    manifest = read_manifest(cfg.data)
    if manifest["tokenizer"]["vocab_size"] > config.vocab_size:
        raise ValueError(f"--data {cfg.data}: packed with a {manifest['tokenizer']['vocab_size']}-token vocabulary, "
                         f"more than the model's vocab_size {config.vocab_size}")
    tokenizer = load_tokenizer(resolve_model(cfg.tokenizer or manifest["tokenizer"]["name"]))
    output = Path(cfg.output)
    if output.is_dir() and any(output.iterdir()) and not (output / "stage1").is_dir():
        raise TrainingRunError(f"--output {output} is not empty and holds no qwen25 pretraining run; use a new or "
                               "empty directory")
    ctx = init_distributed()
    configure_runtime(cfg.threads)
    limit_heap_retention(TRAINING_MMAP_THRESHOLD)  # freed activations go back instead of piling up
    try:
        model = model_from_config(config, seed=cfg.seed, device=ctx.device)
        if ctx.distributed:
            shard_model(model, mixed_precision=_torch_dtype(cfg.dtype))
        stages = [("stage1", cfg, config)]
        if cfg.stage2_steps:
            batch2 = cfg.stage2_batch_size or max(1, cfg.batch_size // 4)
            args2 = dataclasses.replace(cfg, seq_len=stage2_len, batch_size=batch2, max_steps=cfg.stage2_steps,
                                        lr=cfg.stage2_lr or _stage1_floor(cfg), min_lr=None)
            stages.append(("stage2", args2, config.replace(rope_theta=cfg.stage2_rope_theta)))
        table: dict[str, list[dict[str, Any]]] = {}
        for name, args, stage_config in stages:
            _set_rope(model, stage_config, ctx.device)
            stage_dir = output / name
            args = dataclasses.replace(args, output=str(stage_dir), resume=_stage_resume(cfg.resume, stage_dir))
            rank = dict(rank=ctx.rank, world_size=ctx.world_size)
            loader = PackedLoader(cfg.data, args.seq_len, args.batch_size, cfg.seed, **rank)
            evals = (PackedLoader(cfg.eval_data, args.seq_len, args.batch_size, cfg.seed, drop_last=False, **rank)
                     if cfg.eval_data else None)
            fingerprint = {"kind": "pretrain", "stage": name, "model": stage_config.to_dict(),
                           "data": loader.state_dict()["data"]}
            writer = hf_writer(ctx, tokenizer)
            result = train(model, loader, args, ctx=ctx, fingerprint=fingerprint, eval_loader=evals,
                           write_model=writer, description=name)
            save_final_model(ctx, stage_dir, model, writer)
            if ctx.is_main:
                print(f"{name}: {result.step} steps, final loss {result.losses[-1]:.4f}; model in {stage_dir}",
                      flush=True)
            if cfg.eval_data:
                held_out = PackedLoader(cfg.eval_data, stage2_len, max(1, cfg.batch_size // 4), cfg.seed,
                                        drop_last=False, **rank)
                label = f"after {name} (theta {stage_config.rope_theta:g}, trained at {args.seq_len})"
                table[label] = position_losses(model, held_out, ctx, cfg.dtype, cfg.position_eval_batches)
                if ctx.is_main:
                    write_position_table(output, table)
        if ctx.is_main and table:
            print((output / "position_loss.md").read_text(), flush=True)
    finally:
        shutdown(ctx)
    return 0


def _stage_resume(resume: str | None, stage_dir: Path) -> str | None:
    """--resume for one stage: a checkpoint path applies to the stage that holds it; the others take "latest"."""
    if resume in (None, "latest"):
        return resume
    return resume if Path(resume).expanduser().resolve().parent == stage_dir.resolve() else "latest"


def _stage1_floor(cfg: PretrainConfig) -> float:
    """The rate stage 1 ended at: stage 2 continues from there rather than re-warming to the stage-1 peak (a
    short stage 2 at the full peak undoes what stage 1 learned: seen on the demo, held-out 7.93 -> 8.33)."""
    return cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10


def _torch_dtype(name: str) -> Any:
    import torch

    return torch.bfloat16 if name == "bfloat16" else None


def _set_rope(model: Any, config: ModelConfig, device: Any) -> None:
    """Switch the model (sharded or not) to `config`'s RoPE base: new config objects, recomputed frequencies."""
    model.config = config
    model.model.config = config
    model.model.reset_rope()
    model.model.inv_freq = model.model.inv_freq.to(device)
