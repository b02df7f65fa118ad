"""SFT training speed and memory: qwen25's trainer vs TRL's SFTTrainer, same model, data and batch, one run.

Each case trains one epoch over the same chat conversations, in its own process, one engine after the other:
  small    a small random Qwen2 (4 layers, hidden 256, the real 151,936-token vocabulary), full fine-tune
  0.5b-lora  the real Qwen2.5-Coder-0.5B-Instruct (dequantized to an fp32 HF directory), LoRA r 16 on every
           linear layer of the decoder
  0.5b-full  the same model, every weight trained (AdamW state included: ~8 GB per engine)

Both engines: the same --dtype (float32, or bfloat16 autocast over fp32 weights: TRL's SFTConfig turns bf16 on
by default, so it is set explicitly here for both), 2 threads, AdamW, cosine schedule, rows of --seq-len tokens
with conversations packed into them best-fit (qwen25: per-document attention; TRL: `packing=True`, its best-fit
packing with position ids), no gradient checkpointing (TRL's default turns it on: off here for both), the loss on assistant
tokens (qwen25) / all tokens (TRL: the Qwen2.5 template has no generation markers for `assistant_only_loss`).
Throughput is the conversations' token count (the chat template's render) times epochs over the training time
(model loading excluded: qwen25 from `elapsed_s` of its metrics, TRL from `train_runtime`). Peak RSS is the
child's ru_maxrss.

  python benchmarks/bench_train.py                        # every case, fp32
  python benchmarks/bench_train.py --dtype bfloat16       # every case under bf16 autocast (TRL's default)
  python benchmarks/bench_train.py --cases small --conversations 64
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import child_env, cpu_flags, cpu_model, load_average, peak_rss_mb, run_child  # noqa: E402

CASES = {"small": {"lora": False, "lr": 1e-4}, "0.5b-lora": {"lora": True, "lr": 1e-4},
         "0.5b-full": {"lora": False, "lr": 7e-6}}
TOPICS = ["sorting a list", "reading a file", "a binary search", "string reversal", "a REST request", "unit tests",
          "list comprehensions", "a context manager", "regular expressions", "a dataclass", "recursion", "JSON"]


def conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        words = " ".join(rng.choice(["Python", "code", "example", "function", "value", "line", "call", "return",
                                     "loop", "result", "simple", "short"]) for _ in range(rng.randint(20, 60)))
        rows.append({"messages": [{"role": "user", "content": f"Question {i}: explain {topic} briefly."},
                                  {"role": "assistant", "content": f"About {topic}: {words}."}]})
    return rows


def build_small_model(directory: Path, tokenizer_dir: Path) -> None:
    import torch
    import transformers

    from qwen25.checkpoint import load_tokenizer

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=151936, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                                      rope_theta=1_000_000.0, tie_word_embeddings=True, bos_token_id=151643,
                                      eos_token_id=151645)
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    load_tokenizer(tokenizer_dir).save(directory)


def build_real_model(directory: Path) -> None:
    import subprocess

    subprocess.run([sys.executable, "-m", "qwen25.cli", "export", "qwen2.5-coder-0.5b-instruct", "--output",
                    str(directory), "--format", "hf", "--dtype", "f32"], check=True, stdout=sys.stderr)


# --- children ---------------------------------------------------------------------------------------------------
def child_qwen25(spec: dict) -> dict:
    from qwen25.train.sft import SFTConfig, main

    out = Path(tempfile.mkdtemp(prefix="qwen25-run-", dir=spec["tmp"]))  # a fresh run directory per child
    cfg = SFTConfig(model=spec["model"], data=spec["data"], output=str(out), lora=spec["lora"], lr=spec["lr"],
                    epochs=1, seq_len=spec["seq_len"], batch_size=spec["batch_size"], save_every=0,
                    threads=spec["threads"], no_progress=True, seed=0, dtype=spec["dtype"])
    if main(cfg) != 0:
        raise SystemExit("qwen25 sft failed")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "tokens_per_s" in r]
    return {"train_s": steps[-1]["elapsed_s"], "steps": len(steps), "loss_first_last": [steps[0]["loss"],
                                                                                         steps[-1]["loss"]]}


def child_trl(spec: dict) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(spec["threads"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    peft_config = None
    if spec["lora"]:
        import peft

        peft_config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"])
    args = trl.SFTConfig(output_dir=tempfile.mkdtemp(prefix="trl-run-", dir=spec["tmp"]),
                         per_device_train_batch_size=spec["batch_size"],
                         num_train_epochs=1, learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0.03,
                         weight_decay=0.1, max_grad_norm=1.0, max_length=spec["seq_len"], packing=True,
                         gradient_checkpointing=False, save_strategy="no", report_to="none", use_cpu=True,
                         logging_steps=1, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                         bf16=spec["dtype"] == "bfloat16")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=peft_config)
    result = trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"train_s": result.metrics["train_runtime"], "steps": trainer.state.global_step,
            "loss_first_last": [losses[0], losses[-1]] if losses else None}


def child_main(engine: str, spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    result = (child_qwen25 if engine == "qwen25" else child_trl)(spec)
    out_path.write_text(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))


# --- parent -----------------------------------------------------------------------------------------------------
def token_count(model_dir: Path, data: Path) -> int:
    from qwen25.checkpoint import load_tokenizer
    from qwen25.train.sft_data import load_sft_file

    tokenizer = load_tokenizer(model_dir)
    encoded, _ = load_sft_file(data, tokenizer, tokenizer.chat_template)
    return sum(len(e) for e in encoded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="small,0.5b-lora,0.5b-full",
                        help="comma-separated: small, 0.5b-lora, 0.5b-full (default: all)")
    parser.add_argument("--engines", default="qwen25,trl", help="comma-separated: qwen25, trl")
    parser.add_argument("--conversations", type=int, default=48, help="conversations in the epoch (default: 48)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per packed row (default: 512)")
    parser.add_argument("--batch-size", type=int, default=2, help="rows per step (default: 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="both engines: fp32, or bf16 autocast over fp32 weights (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache/qwen25-bench-train",
                        help="where the models are built once (default: %(default)s)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.spec, args.out)
        return 0

    from qwen25.weights.registry import resolve_model

    args.work_dir.mkdir(parents=True, exist_ok=True)
    real_dir, small_dir = args.work_dir / "qwen2.5-coder-0.5b-instruct-f32", args.work_dir / "small-random"
    env = child_env({"OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}, [])
    print(f"CPU: {cpu_model()} ({cpu_flags()}); threads {args.threads}; load before: {load_average()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="qwen25-bench-train-") as tmp:
        data = Path(tmp) / "chats.jsonl"
        data.write_text("".join(json.dumps(c) + "\n" for c in conversations(args.conversations, 0)))
        for case in args.cases.split(","):
            if case == "small":
                if not (small_dir / "config.json").exists():
                    build_small_model(small_dir, resolve_model("qwen2.5-coder-0.5b-instruct"))
                model_dir = small_dir
            else:
                if not (real_dir / "config.json").exists():
                    build_real_model(real_dir)
                model_dir = real_dir
            tokens = token_count(model_dir, data)
            results = {}
            for engine in args.engines.split(","):
                engine_env = env if engine == "qwen25" else child_env({"OMP_NUM_THREADS": str(args.threads)},
                                                                       ["OMP_WAIT_POLICY"])
                spec = {"model": str(model_dir), "data": str(data), "tmp": tmp, "threads": args.threads,
                        "dtype": args.dtype,
                        "seq_len": args.seq_len, "batch_size": args.batch_size, **CASES[case]}
                results[engine] = run_child(sys.executable, Path(__file__), engine, spec, engine_env)
            rows.append((case, tokens, results))
    print(f"\n{args.conversations} conversations, rows of {args.seq_len} tokens, batch {args.batch_size}, "
          f"{args.dtype}, "
          f"1 epoch; load after: {load_average()}\n")
    print("| case | engine | steps | train s | tokens/s | vs TRL | peak RSS MB | vs TRL | loss first -> last | "
          "other busy cores |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case, tokens, results in rows:
        trl_r = results.get("trl")
        for engine, r in results.items():
            if r is None:
                print(f"| {case} | {engine} | failed | | | | | | | |")
                continue
            speed = tokens / r["train_s"]
            ratio = f"{speed / (tokens / trl_r['train_s']):.2f}x" if trl_r else ""
            mem = f"{r['peak_rss_mb'] / trl_r['peak_rss_mb']:.2f}x" if trl_r else ""
            loss = r["loss_first_last"]
            loss_text = f"{loss[0]:.3f} -> {loss[1]:.3f}" if loss else ""
            print(f"| {case} | {engine} | {r['steps']} | {r['train_s']:.1f} | {speed:.0f} | {ratio} | "
                  f"{r['peak_rss_mb']:.0f} | {mem} | {loss_text} | {r['other_cpu_cores']:.2f} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
