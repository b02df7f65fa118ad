"""GRPO trainer on tiny random models: rollouts through the engine sharing the policy's tensors, the reference
with adapters off, bad input, and a 3-step `qwen25 train grpo` run end to end (LoRA and full)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
from tiny_models import save_tiny_policy  # noqa: E402

PROMPTS = [{"prompt": f"Say a word with the letter {c}.", "answer": c} for c in "aeiouxyz"]
REWARD = "format:/[\\u4e00-\\u9fff]/"  # a CJK character: a tiny random model's 8 tokens hold one about half the time


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, real_tokenizer):
    return save_tiny_policy(tmp_path_factory.mktemp("grpo-policy"), real_tokenizer)


@pytest.fixture
def engine_and_model(policy_dir):
    from qwen25.checkpoint import load, stop_token_ids
    from qwen25.engine.engine import LLMEngine

    ckpt = load(policy_dir, torch.float32, quantization="none", trainable=True)
    engine = LLMEngine(ckpt.model, ckpt.tokenizer, max_num_seqs=16, max_model_len=128, kv_cache_memory=8 << 20,
                       use_native=False, stop_token_ids=stop_token_ids(ckpt))
    return engine, ckpt.model, ckpt.tokenizer


def _policy_logps(model, samples, pad_id):
    from qwen25.train.distributed import DistContext
    from qwen25.train.grpo_rollout import collate_rollouts
    from qwen25.train.logprobs import token_logps

    ids, labels = collate_rollouts(samples, pad_id)
    with torch.no_grad():
        out = token_logps(model.eval(), ids, labels, DistContext())
    return [out.logps[i][out.mask[i]].tolist() for i in range(len(samples))]


def test_rollouts_are_the_policy_and_follow_its_updates(engine_and_model):
    from qwen25.sampling_params import SamplingParams
    from qwen25.train.grpo_rollout import sample_groups

    engine, model, tok = engine_and_model
    prompt = tok.encode("Hello there")
    params = SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=3, logprobs=0)
    samples = sample_groups(engine, [prompt, prompt[:2]], params)
    assert len(samples) == 8 and all(s.prompt == prompt for s in samples[:4])
    ours = _policy_logps(model, samples, tok.eos_token_id)
    for s, lp in zip(samples, ours):  # the engine's log-probs of what it sampled are the policy's
        assert len(s.engine_logps) == len(s.completion) and s.completion
        assert s.engine_logps == pytest.approx(lp, abs=1e-4)
    with torch.no_grad():  # an optimizer-like in-place update: the next rollout samples the new weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.reset_prefix_cache()
    again = sample_groups(engine, [prompt], params)
    new = _policy_logps(model, again, tok.eos_token_id)
    for s, lp in zip(again, new):
        assert s.engine_logps == pytest.approx(lp, abs=1e-4)
    assert again[0].engine_logps[0] != pytest.approx(samples[0].engine_logps[0], abs=1e-3)


def test_reference_is_the_base_with_adapters_off(engine_and_model):
    from qwen25.train.distributed import DistContext
    from qwen25.train.grpo_rollout import adapters_disabled
    from qwen25.train.lora import LoraConfig, apply_lora

    _, model, _ = engine_and_model
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model.eval()
    with torch.no_grad():
        base = model(ids)
        apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        adapted = model(ids)
        with adapters_disabled(model) as found:
            off = model(ids)
        back = model(ids)
    assert found and not torch.allclose(adapted, base)
    torch.testing.assert_close(off, base)
    torch.testing.assert_close(back, adapted)
    assert DistContext().world_size == 1


def test_loader_batches_skips_and_bad_input(engine_and_model, tmp_path):
    from qwen25.sampling_params import SamplingParams
    from qwen25.train.distributed import DistContext
    from qwen25.train.grpo_data import load_prompts
    from qwen25.train.grpo_rollout import GRPOLoader
    from qwen25.train.rewards import build_rewards

    engine, model, tok = engine_and_model
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS + [{"prompt": "word " * 200}, {"prompt": ""}]))
    prompts, counts = load_prompts(data, tok, tok.chat_template, 64)
    assert counts == {"kept": 8, "too_long": 1, "empty": 1}
    with pytest.raises(ValueError, match="bad.jsonl:1: a record needs"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"question": "x"}) + "\n")
        load_prompts(bad, tok, None, 64)

    class Raises:
        name = "raises"

        def __call__(self, prompts, completions, examples):
            raise RuntimeError("boom")

    rewards, weights = build_rewards([REWARD])
    params = SamplingParams(n=4, max_tokens=6, logprobs=0)
    with pytest.raises(ValueError, match="at least 2"):
        GRPOLoader(prompts, engine, rewards, weights, SamplingParams(n=1), prompts_per_batch=2, ctx=DistContext(),
                   pad_id=tok.eos_token_id)
    loader = GRPOLoader(prompts, engine, [*rewards, Raises()], [*weights, 1.0], params, prompts_per_batch=2,
                        ctx=DistContext(), pad_id=tok.eos_token_id, beta=0.1, ref_model=model)
    assert len(loader) == 4
    batch = next(iter(loader))
    assert batch.input_ids.shape[0] == 8 and batch.advantages.shape == (8,)
    assert batch.stats["reward_failures"] == 8  # the raising reward scored 0 for every sample, counted
    assert torch.isfinite(batch.advantages).all() and batch.ref_logps is not None
    assert batch.num_loss_units == batch.num_loss_tokens == int((batch.labels != -100).sum())
    state = loader.state_dict()
    second = next(iter(loader))
    loader.load_state_dict(state)
    replay = next(iter(loader))  # the same prompts and seeds from a saved position
    assert torch.equal(second.input_ids, replay.input_ids)


@pytest.mark.parametrize("lora", [True, False])
def test_train_grpo_end_to_end(policy_dir, tmp_path, capsys, lora):
    from qwen25.cli import main as cli_main
    from qwen25.train.metrics import read_metrics

    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    out = tmp_path / "run"
    args = ["train", "grpo", "--model", str(policy_dir), "--data", str(data), "--eval-data", str(data),
            "--reward", REWARD, "--output", str(out), "--max-steps", "3", "--batch-size", "2",
            "--num-generations", "4", "--max-completion-length", "8", "--seq-len", "96", "--no-progress",
            "--threads", "1", "--lr", "1e-2", "--save-every", "2", "--eval-every", "2", "--eval-batches", "1"]
    # LoRA samples from the q8 copy on the native kernels (the default), the full run from the policy itself
    args += ["--lora", "--report-to", "tensorboard"] if lora else ["--rollout-weights", "policy"]
    threads = torch.get_num_threads()
    assert cli_main(args) == 0
    assert torch.get_num_threads() == threads  # --threads 1 is the run's, not the test process's (later tests)
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 3
    for key in ("reward", "kl", "clip_fraction", "entropy", "completion_length", "truncated_share",
                "all_equal_share", "rollout_s", "reward_s", "ref_s", "sync_s", "reward_failures"):
        assert all(math.isfinite(r[key]) for r in steps), key
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert steps[-1]["kl"] > 0  # and moves away from it
    assert (out / "reward.png").is_file() and (out / "loss.png").is_file()
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_reward" in r]
    assert [r["step"] for r in evals] == [2, 3] and all(math.isfinite(r["eval_kl"]) for r in evals)
    assert evals[0]["eval_completion_length"] > 0
    heldout = json.loads((out / "heldout.json").read_text())
    assert {"before", "after"} <= heldout.keys()
    assert (out / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()
    assert "held-out mean reward after" in capsys.readouterr().out
    if lora:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/reward", "train/kl", "train/clip_fraction", "train/sync_s"} <= tags
        assert [e.value for e in events.Scalars("train/reward")] == pytest.approx([r["reward"] for r in steps])


def test_cli_help_and_errors(policy_dir, tmp_path, capsys):
    from qwen25.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["train", "grpo", "--help"])
    text = capsys.readouterr().out
    assert "--num-generations" in text and "examples:" in text and "--mask-truncated-completions" in text
    data = tmp_path / "tasks.jsonl"
    data.write_text(json.dumps(PROMPTS[0]) + "\n")
    base = ["train", "grpo", "--model", str(policy_dir), "--data", str(data), "--output", str(tmp_path / "o")]
    assert cli_main(base + ["--reward", "math", "--num-generations", "1"]) != 0
    assert "--num-generations must be >= 2" in capsys.readouterr().err
    assert cli_main(base) != 0
    assert "--reward is required" in capsys.readouterr().err
    assert cli_main(base + ["--reward", "nonsense"]) != 0
    assert "reward spec" in capsys.readouterr().err


def test_train_grpo_with_a_reward_model_as_the_reward(policy_dir, tmp_path, real_tokenizer):
    from qwen25.checkpoint import load
    from qwen25.cli import main as cli_main
    from qwen25.train.metrics import read_metrics
    from qwen25.train.reward_model import reward_model_from_lm, save_reward_model

    rm = reward_model_from_lm(load(policy_dir).model, real_tokenizer.pad_token_id, seed=0, std=1.0)
    rm_dir = save_reward_model(rm, tmp_path / "rm", real_tokenizer)
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    out = tmp_path / "run"
    assert cli_main(["train", "grpo", "--model", str(policy_dir), "--data", str(data), "--reward", f"rm:{rm_dir}",
                     "--output", str(out), "--max-steps", "2", "--batch-size", "2", "--num-generations", "4",
                     "--max-completion-length", "6", "--seq-len", "96", "--no-progress", "--threads", "1",
                     "--lora", "--loss-type", "dr_grpo", "--scale-rewards", "none"]) == 0
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 2
    # a scalar head scores every completion differently: no degenerate group, nothing failed
    assert all(r["all_equal_share"] == 0 and r["reward_failures"] == 0 for r in steps)
    assert all(r["reward/rm"] == pytest.approx(r["reward"]) for r in steps)


def test_resume_replays_the_uninterrupted_run(policy_dir, tmp_path):
    from qwen25.cli import main as cli_main
    from qwen25.train.metrics import read_metrics

    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    common = ["train", "grpo", "--model", str(policy_dir), "--data", str(data), "--reward", REWARD,
              "--max-steps", "3", "--batch-size", "2", "--num-generations", "4", "--max-completion-length", "6",
              "--seq-len", "96", "--no-progress", "--threads", "1", "--lora", "--lr", "1e-2", "--save-every", "2"]
    assert cli_main(common + ["--output", str(tmp_path / "whole")]) == 0
    ckpt = tmp_path / "whole" / "checkpoint-2"
    assert cli_main(common + ["--output", str(tmp_path / "resumed"), "--resume", str(ckpt)]) == 0
    whole = [r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if "loss" in r]
    resumed = [r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert whole[-1]["kl"] > 0  # the first two updates moved the policy: step 3 depends on restored weights
    for key in ("loss", "reward", "kl", "completion_length"):  # same prompts, seeds and weights at step 3
        assert resumed[-1][key] == pytest.approx(whole[-1][key], abs=1e-6), key
