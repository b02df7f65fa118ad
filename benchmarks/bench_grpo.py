"""GRPO step speed: qwen25's trainer (rollouts on qwen25's engine) vs TRL's GRPOTrainer (rollouts with
transformers' generate), same model, prompts, G and settings, one run, each side in its own process.

Both sides: the model as one fp32 HF directory (the 0.5B GGUF dequantized once by qwen25), LoRA r 16 / alpha 32
on every linear layer of the decoder, beta 0.04 (reference = the base with the adapter off, on both sides),
G = --generations completions of each of --prompts prompts per optimizer step, at most --max-tokens tokens
each, temperature 1.0, top-p 1.0, no top-k, the `math` reward (qwen25's MathAnswerReward on both sides),
--threads threads, fp32, no activation checkpointing (TRL's default turns it on: off here, as qwen25's).
The prompts are GSM-style arithmetic word problems built here with a fixed seed. Engines: qwen25 (rollouts on a
q8 copy of the policy on the native kernels, re-quantized after each update: `--rollout-weights q8`, the
default), qwen25-policy (rollouts on the fp32 policy itself, PyTorch path), trl.

Reported per side: rollout tokens/s (completion tokens generated / seconds inside generation: qwen25's
`rollout_s` from metrics.jsonl; TRL's `_generate_single_turn` timed by a wrapper), seconds per GRPO step
(qwen25: the loop's step, which includes its rollout, scoring and reference pass; TRL: on_step_begin -> end),
and qwen25's weight-sync seconds and their share of a step. The first step is kept (there are few).

  python benchmarks/bench_grpo.py                         # 1 step, 4 prompts x G 8, 128 tokens, real 0.5B
  python benchmarks/bench_grpo.py --steps 2 --prompts 2 --generations 4 --max-tokens 64
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_align import LORA, hf_directory, trl_step_timer  # noqa: E402
from _bench_common import (add_child_args, cpu_flags, cpu_model, load_average, parse_engines,  # noqa: E402
                           peak_rss_mb, run_as_child, run_engines)

ENGINES = ("qwen25", "qwen25-policy", "trl")  # qwen25: q8 copy on the native kernels; -policy: fp32 policy
BETA, LR = 0.04, 1e-5
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen25" / "bench"


def make_prompts(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b, c = rng.randrange(3, 40), rng.randrange(2, 12), rng.randrange(1, 30)
        question = (f"A shop has {a} boxes with {b} apples each. It sells {c} apples. How many apples are left? "
                    "Reason step by step and put the final answer in \\boxed{}.")
        rows.append({"id": i, "messages": [{"role": "user", "content": question}], "prompt": question,
                     "answer": str(a * b - c)})
    return rows


# --- children -----------------------------------------------------------------------------------------------------
def run_qwen25(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    from qwen25.train.grpo import GRPOConfig, main
    from qwen25.train.metrics import read_metrics

    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        out = Path(tmp) / "run"
        cfg = GRPOConfig(model=spec["model"], data=spec["data"], output=str(out), reward=["math"], lora=True,
                         lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                         lora_target_modules=LORA["targets"], beta=BETA, lr=LR, batch_size=spec["prompts"],
                         num_generations=spec["generations"], max_completion_length=spec["max_tokens"],
                         seq_len=spec["max_tokens"] + 256, temperature=1.0, top_p=1.0, top_k=0,
                         max_steps=spec["steps"], threads=spec["threads"], no_progress=True, loss_type="dapo",
                         rollout_weights=spec.get("rollout_weights", "q8"))
        main(cfg)
        steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    step_s = [r["tokens"] / r["tokens_per_s"] for r in steps]
    return {"step_s": step_s, "rollout_s": [r["rollout_s"] for r in steps],
            "rollout_tokens": [r["rollout_tokens"] for r in steps], "sync_s": [r["sync_s"] for r in steps],
            "reward_s": [r["reward_s"] for r in steps], "ref_s": [r["ref_s"] for r in steps],
            "reward": [r["reward"] for r in steps], "peak_rss_mb": peak_rss_mb()}


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    import datasets
    import peft
    import transformers
    import trl

    from qwen25.train.rewards import MathAnswerReward

    tok = transformers.AutoTokenizer.from_pretrained(spec["model"])
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    math_reward = MathAnswerReward()

    def reward(prompts: list, completions: list, answer: list, **kwargs: Any) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return math_reward([""] * len(texts), texts, [{"answer": a} for a in answer])

    data = datasets.Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in rows])
    step_times: list[float] = []
    gen = {"s": [], "tokens": []}
    with tempfile.TemporaryDirectory(prefix="bench-grpo-trl-") as tmp:
        g, p = spec["generations"], spec["prompts"]
        args = trl.GRPOConfig(output_dir=tmp, beta=BETA, learning_rate=LR, per_device_train_batch_size=g * p,
                              num_generations=g, max_completion_length=spec["max_tokens"], temperature=1.0,
                              top_p=1.0, top_k=0, max_steps=spec["steps"], bf16=False, use_cpu=True,
                              report_to="none", logging_steps=1, save_strategy="no", warmup_steps=0,
                              lr_scheduler_type="constant", dataloader_num_workers=0, loss_type="dapo",
                              gradient_checkpointing=False)
        lora = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules=LORA["targets"], task_type="CAUSAL_LM")
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                                  processing_class=tok, peft_config=lora,
                                  callbacks=[trl_step_timer(transformers, step_times)])
        inner = trainer._generate_single_turn

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            completion_ids, logprobs = inner(*a, **k)
            gen["s"].append(time.perf_counter() - t0)
            gen["tokens"].append(float(sum(len(c) for c in completion_ids)))
            return completion_ids, logprobs

        trainer._generate_single_turn = timed
        trainer.train()
        rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    return {"step_s": step_times, "rollout_s": gen["s"], "rollout_tokens": gen["tokens"], "reward": rewards,
            "peak_rss_mb": peak_rss_mb()}


# --- parent -------------------------------------------------------------------------------------------------------
def rollout_tps(r: dict[str, Any]) -> float:
    return sum(r["rollout_tokens"]) / max(sum(r["rollout_s"]), 1e-9)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a known name, a .gguf or an HF directory")
    p.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens per completion")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per side")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="qwen25,trl", help=f"which sides to run, comma-separated: {', '.join(ENGINES)}")
    p.add_argument("--json", help="also write the results here")
    add_child_args(p)
    a = p.parse_args(argv)
    if a.child:
        return run_as_child(a, {"qwen25": run_qwen25, "trl": run_trl,
                                "qwen25-policy": lambda s: run_qwen25({**s, "rollout_weights": "policy"})})

    engines = parse_engines(p, a.engines, ENGINES)
    model_dir = hf_directory(a.model, CACHE)
    CACHE.mkdir(parents=True, exist_ok=True)
    data = CACHE / f"grpo-prompts-{a.prompts * a.steps}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_prompts(a.prompts * a.steps)))
    spec = {"model": str(model_dir), "data": str(data), "prompts": a.prompts, "generations": a.generations,
            "max_tokens": a.max_tokens, "steps": a.steps, "threads": a.threads}
    results = run_engines(Path(__file__).resolve(), engines, spec, a.threads,
                          f"{a.steps} GRPO step(s): {a.prompts} prompts x G {a.generations} on {model_dir.name}")
    print(f"\nGRPO, LoRA r {LORA['r']}, {a.prompts} prompts x G {a.generations}, <= {a.max_tokens} tokens, "
          f"{a.threads} threads, fp32; {cpu_model()} ({cpu_flags()}); load {load_average()}")
    print(f"{'':13} {'rollout tok/s':>14} {'rollout tokens':>15} {'s/step':>8} {'sync s':>8} {'peak RSS MB':>12} "
          f"{'other cores':>12}")
    for engine, r in results.items():
        if r is None:
            print(f"{engine:13} failed (see above)")
            continue
        sync = f"{statistics.median(r['sync_s']):8.4f}" if "sync_s" in r else f"{'-':>8}"
        print(f"{engine:13} {rollout_tps(r):14.1f} {sum(r['rollout_tokens']):15.0f} "
              f"{statistics.median(r['step_s']):8.1f} {sync} {r['peak_rss_mb']:12.0f} {r['other_cpu_cores']:12.2f}")
    q, t = results.get("qwen25") or results.get("qwen25-policy"), results.get("trl")
    if q:
        share = sum(q["sync_s"]) / max(sum(q["step_s"]), 1e-9)
        print(f"qwen25 step parts (s): rollout {sum(q['rollout_s']):.1f}, rewards {sum(q['reward_s']):.2f}, "
              f"reference {sum(q['ref_s']):.1f}, weight sync {sum(q['sync_s']):.5f} = {100 * share:.3f}% of the "
              f"steps (goal < 10%)")
    if q and t:
        print(f"qwen25 / TRL: rollout tokens/s {rollout_tps(q) / rollout_tps(t):.2f}x (goal >= 3), s/step "
              f"{statistics.median(q['step_s']) / statistics.median(t['step_s']):.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
