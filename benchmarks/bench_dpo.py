"""DPO memory and speed: `qwen25 train dpo --lora` next to TRL's DPOTrainer (peft LoRA) on the same pairs and batch.

The question (issue 16): DPO on the 0.5B runs out of memory in TRL because the reference model is resident while
the policy trains and because the (rows, length, 151,936) logits are materialised whole. qwen25 computes the
reference log-probs once before training (cached with the data) and gathers the policy's log-probs chunk by
chunk. Goal: qwen25's peak RSS <= half of TRL's. Also reported: seconds per optimizer step.

Same inputs on both sides: the model as one fp32 HF directory (a GGUF is dequantized and written once by qwen25,
cached in ~/.cache/qwen25/bench-dpo/), the same chat-format pairs (synthetic arithmetic word problems, a correct
worked answer chosen and a wrong one rejected, responses of about --response-words words), the same batch of
--batch-size pairs, LoRA r 16 / alpha 32 / dropout 0.05 on q/k/v/o/gate/up/down, beta 0.1, lr 5e-6, fp32, no
gradient accumulation, activation checkpointing (TRL's DPOConfig default; qwen25's --activation-checkpointing),
--threads torch threads. Each side runs in its own child process, one after the other:
  qwen25  `qwen25.train.dpo.main(DPOConfig(lora=True, ...))`: reference log-probs (timed apart: a one-off cost,
          cached next to the data), then --steps optimizer steps; seconds per step from its metrics.jsonl
  trl     `trl.DPOTrainer(model, ref_model=None, peft_config=...)` (TRL's own memory-saving setting: the
          reference is the policy with its adapter switched off, not a second model); seconds per step from a
          TrainerCallback
Reported per side: peak RSS of the child (ru_maxrss: loading and, for qwen25, the reference pass included), the
median seconds per optimizer step (the first is dropped when there are more), the first losses (both start at
log 2 = 0.6931: policy = reference), and qwen25 / TRL ratios.

    python benchmarks/bench_dpo.py [--model NAME|PATH] [--pairs 16] [--batch-size 4] [--steps 2]
                                   [--response-words 200] [--seq-len 1024] [--threads 2] [--engines qwen25,trl]

Measured (0.5B Q4_K_M dequantized to fp32, --pairs 8 --batch-size 4 --response-words 200 --seq-len 1024
--steps 1 --threads 1, a shared 2-core host): peak RSS qwen25 3,359 MB, TRL 9,637 MB (0.35x); at --batch-size 2
--response-words 120 --seq-len 512: 3,066 vs 5,700 MB (0.54x: the fp32 weights, 2.5 GB, dominate both).

Timings on a shared host are noise; peak RSS is not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench_align import LORA, hf_directory, trl_step_timer
from _bench_common import (add_child_args, cpu_model, load_average, parse_engines, peak_rss_mb, rss_mb,
                           run_as_child, run_engines, setup_torch)

ENGINES = ("qwen25", "trl")
BETA, LR = 0.1, 5e-6
CACHE = Path.home() / ".cache" / "qwen25" / "bench-dpo"


# --- inputs -------------------------------------------------------------------------------------------------------
def make_pairs(n: int, response_words: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` chat-format pairs: a word problem, a worked answer with the right total (chosen) and a wrong one."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        a, b, c = rng.randrange(3, 40), rng.randrange(2, 12), rng.randrange(1, 30)
        question = (f"A shop has {a} boxes with {b} apples in each box. It sells {c} apples. "
                    f"How many apples are left? (problem {i})")

        def answer(total: int) -> str:
            steps = [f"There are {a} boxes and each holds {b} apples, so the shop starts with {a} x {b} = {a * b}."]
            while sum(len(s.split()) for s in steps) < response_words - 20:
                steps.append(f"Checking again: {a} boxes times {b} apples is {a * b} apples before any sale.")
            steps.append(f"After selling {c}, {a * b} - {c} = {total}. The answer is {total}.")
            return " ".join(steps)

        pairs.append({"prompt": [{"role": "user", "content": question}],
                      "chosen": [{"role": "assistant", "content": answer(a * b - c)}],
                      "rejected": [{"role": "assistant", "content": answer(a * b - c + rng.randrange(1, 9))}]})
    return pairs


# --- children -----------------------------------------------------------------------------------------------------
def run_qwen25(spec: dict[str, Any]) -> dict[str, Any]:
    setup_torch(spec["threads"])
    from qwen25.train.dpo import DPOConfig, main
    from qwen25.train.metrics import read_metrics

    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        out = Path(tmp) / "run"
        cfg = DPOConfig(model=spec["model"], data=spec["data"], output=str(out), lora=True, lora_r=LORA["r"],
                        lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], lora_target_modules=LORA["targets"],
                        beta=BETA, lr=LR, batch_size=spec["batch_size"], seq_len=spec["seq_len"],
                        max_steps=spec["steps"], warmup_ratio=0.0, threads=spec["threads"], no_progress=True,
                        ref_cache=str(Path(tmp) / "ref.npz"), ref_batch_size=spec["batch_size"],
                        activation_checkpointing=True)
        t0 = time.perf_counter()
        main(cfg)
        wall = time.perf_counter() - t0
        steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r and "tokens_per_s" in r]
    step_s = [r["tokens"] / r["tokens_per_s"] for r in steps]
    return {"step_s": step_s, "losses": [r["loss"] for r in steps], "wall_s": wall,
            "outside_steps_s": wall - sum(step_s), "peak_rss_mb": peak_rss_mb()}


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    torch = setup_torch(spec["threads"])
    import datasets
    import peft
    import transformers
    import trl

    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(spec["model"])
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    load_s, rss_load = time.perf_counter() - t0, rss_mb()
    pairs = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-dpo-trl-") as tmp:
        args = trl.DPOConfig(output_dir=tmp, beta=BETA, learning_rate=LR,
                             per_device_train_batch_size=spec["batch_size"],
                             max_steps=spec["steps"], max_length=spec["seq_len"], bf16=False, use_cpu=True,
                             report_to="none", logging_steps=1, save_strategy="no", warmup_steps=0,
                             lr_scheduler_type="constant", dataloader_num_workers=0)
        lora = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules=LORA["targets"], task_type="CAUSAL_LM")
        trainer = trl.DPOTrainer(model=model, ref_model=None, args=args, processing_class=tok, peft_config=lora,
                                 train_dataset=datasets.Dataset.from_list(pairs),
                                 callbacks=[trl_step_timer(transformers, times)])
        trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"step_s": times, "losses": losses, "load_s": load_s, "rss_load_mb": rss_load, "peak_rss_mb": peak_rss_mb()}


# --- parent -------------------------------------------------------------------------------------------------------
def median_step(step_s: list[float]) -> float:
    kept = step_s[1:] if len(step_s) > 1 else step_s
    return statistics.median(kept) if kept else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a known name, a .gguf or an HF directory")
    p.add_argument("--pairs", type=int, default=16, help="preference pairs in the data set")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step (each pair is two rows)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per side")
    p.add_argument("--response-words", type=int, default=200, help="about how long each response is")
    p.add_argument("--seq-len", type=int, default=1024, help="most tokens of prompt + response")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default=",".join(ENGINES), help="which sides to run, comma-separated")
    p.add_argument("--json", help="also write the results here")
    add_child_args(p)
    a = p.parse_args(argv)
    if a.child:
        return run_as_child(a, {"qwen25": run_qwen25, "trl": run_trl})

    engines = parse_engines(p, a.engines, ENGINES)
    model_dir = hf_directory(a.model, CACHE)
    CACHE.mkdir(parents=True, exist_ok=True)
    data = CACHE / f"pairs-{a.pairs}-{a.response_words}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(a.pairs, a.response_words)))
    spec = {"model": str(model_dir), "data": str(data), "batch_size": a.batch_size, "steps": a.steps,
            "seq_len": a.seq_len, "threads": a.threads}
    results = run_engines(Path(__file__).resolve(), engines, spec, a.threads,
                          f"{a.steps} step(s) of {a.batch_size} pairs on {model_dir.name}")
    print(f"\nDPO, LoRA r {LORA['r']}, {a.batch_size} pairs/step, <= {a.seq_len} tokens, {a.threads} threads, fp32; "
          f"{cpu_model()}; load {load_average()}")
    print(f"{'':10} {'peak RSS MB':>12} {'s/step':>9} {'losses':>24} {'other cores':>12}")
    for engine, r in results.items():
        if r is None:
            print(f"{engine:10} failed (see above)")
            continue
        losses = ", ".join(f"{x:.4f}" for x in r["losses"][:3])
        print(f"{engine:10} {r['peak_rss_mb']:12.0f} {median_step(r['step_s']):9.2f} {losses:>24} "
              f"{r['other_cpu_cores']:12.2f}")
    if results.get("qwen25") and results.get("trl"):
        q, t = results["qwen25"], results["trl"]
        print(f"qwen25 / TRL: peak RSS {q['peak_rss_mb'] / t['peak_rss_mb']:.2f}x (goal <= 0.5), "
              f"s/step {median_step(q['step_s']) / median_step(t['step_s']):.2f}x; qwen25's reference log-probs "
              f"and load: {q['outside_steps_s']:.1f} s once (cached with the data)")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
