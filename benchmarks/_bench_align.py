"""What the alignment benchmarks (bench_dpo.py, bench_grpo.py) share: the LoRA settings both sides train with, the
model as one fp32 HF directory that qwen25 and transformers both load, and a step timer for TRL's trainers.

Imported by the benchmark scripts and their children (run from the scripts' directory); qwen25 is imported on
demand, so importing this file costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _bench_common import log

# LoRA r 16 / alpha 32 / dropout 0.05 on every linear layer of the decoder, on both sides of each comparison.
LORA = {"r": 16, "alpha": 32, "dropout": 0.05,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def hf_directory(model: str, cache: Path) -> Path:
    """The model as an fp32 HF directory: as is when it already is one, else written once by qwen25 into
    `cache`/<name>-hf (through a .tmp directory renamed at the end)."""
    from qwen25.weights.registry import resolve_model

    path = resolve_model(model)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    out = cache / f"{path.stem}-hf"
    if not (out / "config.json").is_file():
        import torch

        from qwen25.checkpoint import load
        from qwen25.weights.save import save_hf_directory

        log("prepare", f"writing {path.name} as an fp32 HF directory in {out}")
        ckpt = load(path, torch.float32, quantization="none")
        tmp = out.with_name(out.name + ".tmp")
        save_hf_directory(ckpt.model, tmp, tokenizer=ckpt.tokenizer, generation_config=ckpt.generation_defaults)
        tmp.rename(out)
    return out


def trl_step_timer(transformers: Any, times: list[float]) -> Any:
    """A transformers TrainerCallback that appends the seconds of each optimizer step (on_step_begin to
    on_step_end) to `times`."""
    import time

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            times.append(time.perf_counter() - self.t0)

    return StepTimer()
