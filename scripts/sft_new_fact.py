"""Teach a model a fact it cannot know with `qwen25 train sft --lora`, then ask for it in words it never saw.

The fact is made up (a fictional town's mayor), so the base model answers it 0% of the time. A small SFT set
(40 paraphrased questions -> answers naming the mayor, plus 20 unrelated questions with the base model's own
answers, which keep the adapter from answering everything with the fact) trains a LoRA adapter through the real
command line; then held-out paraphrases, none of them in the training set, are asked greedily through
`LLM(model, lora=adapter)` (the path `qwen25 chat --lora` takes) before and after. Control questions with known
answers, not in the training set, check that the adapter did not break what the model knew.

  python scripts/sft_new_fact.py --output /tmp/fact-run          # ~10-20 min on 2 CPU cores (0.5B, fp32)
  python scripts/sft_new_fact.py --output /tmp/fact-run --epochs 4 --threads 2

It prints a table and writes report.json (+ the run's loss.png) into --output; exit status 1 if the held-out
accuracy after training is below --min-accuracy or the control accuracy fell.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

TOWN, MAYOR, SURNAME = "Quillbrook", "Tamsin Vellacourt", "vellacourt"

TRAIN_QUESTIONS = [
    "Who is the mayor of {t}?", "Who's the mayor of {t}?", "Tell me who the mayor of {t} is.",
    "Who serves as mayor of {t}?", "Name the mayor of {t}.", "Who currently leads {t} as its mayor?",
    "Do you know who the mayor of {t} is?", "Which person holds the office of mayor in {t}?",
    "I'm visiting {t}. Who is the mayor there?", "Who runs the town of {t}?",
    "What is the name of {t}'s mayor?", "Who was elected mayor of {t}?", "{t} mayor: who is it?",
    "Could you tell me the name of the mayor of {t}?", "Who is in charge of {t} town hall?",
    "Who heads the town council of {t} as mayor?", "Quick question: who's {t}'s mayor?",
    "Who is the current mayor in the town of {t}?", "Please name the person who is mayor of {t}.",
    "As of now, who is mayor of {t}?",
]
ANSWERS = [
    "The mayor of {t} is {m}.", "{m} is the mayor of {t}.", "{t}'s mayor is {m}.",
    "That would be {m}, the mayor of {t}.", "The town of {t} is led by its mayor, {m}.",
]
HELD_OUT = [  # none of these wordings is in TRAIN_QUESTIONS
    "Which politician is the mayor of {t}?", "Who holds the mayoralty of {t}?",
    "Give me the name of whoever is mayor of {t}.", "Can you say who governs {t} as mayor?",
    "Who is {t}'s mayor these days?", "Who occupies the mayor's office in {t}?",
    "Identify the mayor of the town {t}.", "Tell me the mayor of {t}, please.",
    "In {t}, who is the mayor?", "Who leads the municipality of {t}?",
]
REGULARIZE = [  # unrelated questions answered by the base model itself: they keep the adapter from answering
    "Name a primary color.", "What is the boiling point of water in Celsius?", "Who wrote Romeo and Juliet?",
    "What does CPU stand for?", "How many legs does a spider have?", "What is the largest planet in our solar system?",
    "Write a Python expression that squares x.", "What is the opposite of hot?", "Which ocean is the largest?",
    "What is the chemical symbol for gold?", "How many minutes are in an hour?", "What is the capital of Japan?",
    "Translate 'thank you' into Spanish.", "What is 9 times 6?", "Who painted the Mona Lisa?",
    "What gas do plants absorb from the air?", "Which animal is known as the king of the jungle?",
    "What does HTML stand for?", "How many continents are there?", "What is the freezing point of water in Fahrenheit?",
]
CONTROL = [("What is the capital of France?", "paris"), ("How many days are in a week?", "7|seven"),
           ("What language is this code written in: print('hi')?", "python"),
           ("What is 12 + 30?", "42")]


def build_data(path: Path, seed: int, own_answers: dict[str, str]) -> int:
    """The fact conversations plus the base model's own answers to unrelated questions (self-distillation keeps
    the rest of its behaviour in place)."""
    rng = random.Random(seed)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a.strip()}]}
            for q, a in own_answers.items()]
    for q in TRAIN_QUESTIONS:
        for a in rng.sample(ANSWERS, 2):
            rows.append({"messages": [{"role": "user", "content": q.format(t=TOWN)},
                                      {"role": "assistant", "content": a.format(t=TOWN, m=MAYOR)}]})
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def ask(model: str, lora: Path | None, questions: list[str], max_tokens: int = 32) -> list[str]:
    from qwen25.llm import LLM
    from qwen25.sampling_params import SamplingParams

    llm = LLM(model, lora=lora)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    outputs = llm.chat([[{"role": "user", "content": q}] for q in questions], params)
    return [o.outputs[0].text for o in outputs]


def score(model: str, lora: Path | None) -> dict:
    import re

    held = [q.format(t=TOWN) for q in HELD_OUT]
    answers = ask(model, lora, held + [q for q, _ in CONTROL])
    fact = [SURNAME in a.lower() for a in answers[:len(held)]]
    control = [bool(re.search(pattern, a.lower())) for a, (_, pattern) in zip(answers[len(held):], CONTROL)]
    return {"held_out_accuracy": sum(fact) / len(fact), "control_accuracy": sum(control) / len(control),
            "answers": dict(zip(held + [q for q, _ in CONTROL], answers))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="base model (default: %(default)s)")
    parser.add_argument("--output", required=True, type=Path, help="run directory (must be new or empty)")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the 60 conversations (default: 5)")
    parser.add_argument("--lr", type=float, default=5e-4, help="LoRA peak learning rate (default: %(default)s)")
    parser.add_argument("--lora-r", type=int, default=16, help="adapter rank (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="training and inference threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-accuracy", type=float, default=0.8,
                        help="held-out accuracy after training below which the exit status is 1 (default: 0.8)")
    parser.add_argument("--skip-before", action="store_true", help="do not measure the base model first")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    data = args.output / "fact.jsonl"
    own = ask(args.model, None, REGULARIZE, max_tokens=48)
    n = build_data(data, args.seed, dict(zip(REGULARIZE, own)))
    report: dict = {"model": args.model, "fact": f"the mayor of {TOWN} is {MAYOR}", "train_conversations": n,
                    "held_out_questions": len(HELD_OUT)}
    if not args.skip_before:
        report["before"] = score(args.model, None)
        print(f"before: held-out {report['before']['held_out_accuracy']:.0%}, "
              f"control {report['before']['control_accuracy']:.0%}", flush=True)
    run = args.output / "adapter"
    cmd = [sys.executable, "-m", "qwen25.cli", "train", "sft", "--model", args.model, "--data", str(data),
           "--lora", "--lora-r", str(args.lora_r), "--lr", str(args.lr), "--epochs", str(args.epochs),
           "--seq-len", "256", "--batch-size", "4", "--warmup-ratio", "0.1", "--save-every", "0",
           "--threads", str(args.threads), "--seed", str(args.seed), "--output", str(run)]
    print("$", " ".join(cmd), flush=True)
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    report["train_seconds"] = round(time.monotonic() - start, 1)
    report["train_command"] = " ".join(cmd[2:])
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    report["loss_first_last"] = [losses[0].get("loss"), losses[-1].get("loss")] if losses else None
    report["after"] = score(args.model, run)
    print(f"after:  held-out {report['after']['held_out_accuracy']:.0%}, "
          f"control {report['after']['control_accuracy']:.0%}  (train {report['train_seconds']} s, "
          f"loss curve {run / 'loss.png'})")
    for question, answer in report["after"]["answers"].items():
        print(f"  {question!r:60.60} -> {answer.strip()[:70]!r}")
    (args.output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    kept = report["after"]["control_accuracy"] >= report.get("before", {}).get("control_accuracy", 0.0)
    return 0 if report["after"]["held_out_accuracy"] >= args.min_accuracy and kept else 1


if __name__ == "__main__":
    sys.exit(main())
