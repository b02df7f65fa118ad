"""DPO pairs from the model's own samples judged by the math verifier, and the task accuracy before / after DPO.

    python scripts/make_rl_tasks.py /tmp/rg/reasoning_gym-*.whl --output data/rl        # the task files
    python scripts/make_dpo_pairs.py --tasks data/rl/gsm_train.jsonl --limit 300 --n 8 --output data/rl/pairs.jsonl
    python scripts/make_dpo_pairs.py --tasks data/rl/gsm_heldout.jsonl --limit 100 --accuracy --quantization q8  # before
    qwen25 train dpo --data data/rl/pairs.jsonl --lora --output runs/dpo-gsm
    python scripts/make_dpo_pairs.py --tasks data/rl/gsm_heldout.jsonl --limit 100 --accuracy --quantization q8 \
        --lora runs/dpo-gsm                                                                              # after

Pairs: per prompt --n samples (temperature --temperature), scored by the `math` reward; chosen = the shortest
correct finished sample (--chosen random: any correct finished one, so the pairs do not teach brevity), rejected =
a wrong one; --pairs-per-prompt K pairs up to K distinct right samples with K distinct wrong ones
(qwen25/train/self_pairs.py). --accuracy: one greedy answer per
prompt, the share the verifier accepts. Counters (prompts with all samples right / all wrong, truncated samples,
reward failures) are printed either way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a known name, a .gguf or an HF directory (default: qwen25's)")
    p.add_argument("--lora", help="a peft adapter to apply (e.g. `qwen25 train dpo --lora` output)")
    p.add_argument("--tasks", required=True, help="task jsonl with messages and answer (scripts/make_rl_tasks.py)")
    p.add_argument("--limit", type=int, default=None, help="use the first N tasks")
    p.add_argument("--output", help="pairs jsonl to write (not with --accuracy)")
    p.add_argument("--accuracy", action="store_true", help="only measure greedy accuracy on the tasks")
    p.add_argument("--n", type=int, default=8, help="samples per prompt for pairs")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chosen", choices=("shortest", "random"), default="shortest",
                   help="which correct sample is chosen: the shortest, or one drawn at random (default: shortest)")
    p.add_argument("--pairs-per-prompt", type=int, default=1,
                   help="up to this many pairs per prompt, no sample used twice (default: 1)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quantization", default="auto",
                   help="the inference path (auto, gguf, q8, none); with --lora the adapter is merged, which needs "
                        "q8 or none, so compare before/after on the same one (e.g. q8)")
    a = p.parse_args(argv)
    if not a.accuracy and not a.output:
        p.error("--output is required unless --accuracy")
    if a.pairs_per_prompt < 1:
        p.error("--pairs-per-prompt must be >= 1")
    if a.n < 2 and not a.accuracy:
        p.error("--n must be >= 2: a pair needs a right and a wrong sample")

    from qwen25 import LLM, SamplingParams
    from qwen25.runtime import configure_runtime
    from qwen25.train.rewards import MathAnswerReward
    from qwen25.train.self_pairs import sample_pairs, task_accuracy

    configure_runtime(a.threads)
    records = [json.loads(line) for line in Path(a.tasks).read_text().splitlines() if line.strip()][:a.limit]
    if not records:
        p.error(f"{a.tasks}: no task")
    llm = LLM(a.model, lora=a.lora, quantization=a.quantization) if a.model else \
        LLM(lora=a.lora, quantization=a.quantization)
    reward = MathAnswerReward()
    if a.accuracy:
        accuracy, stats = task_accuracy(llm, records, reward, SamplingParams(temperature=0.0, max_tokens=a.max_tokens))
        print(f"accuracy {accuracy:.1%} on {len(records)} tasks of {a.tasks} (greedy); {dict(stats)}")
        return 0
    sampling = SamplingParams(n=a.n, temperature=a.temperature, max_tokens=a.max_tokens, seed=a.seed)
    pairs, stats = sample_pairs(llm, records, reward, sampling, seed=a.seed, chosen=a.chosen,
                                max_pairs=a.pairs_per_prompt)
    Path(a.output).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs), encoding="utf-8")
    print(f"{len(pairs)} pairs -> {a.output}; sample pass rate {stats['passed'] / max(stats['samples'], 1):.1%}; "
          f"{dict(stats)}")
    return 0 if pairs else 1


if __name__ == "__main__":
    sys.exit(main())
