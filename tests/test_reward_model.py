"""Reward model: transformers loads what qwen25 saves (and the reverse) and both score alike, the Bradley-Terry loss
against its closed form and against TRL's RewardTrainer (loss and every gradient, with margins), `qwen25 train rm`
end to end with its held-out pairwise accuracy, and the trained model as a GRPO reward (text scored as
transformers scores it; a reward model of another tokenizer refused)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qwen25.checkpoint import load
from qwen25.train.distributed import DistContext
from qwen25.train.pairs import PairBatch
from qwen25.train.preference_losses import bradley_terry_loss
from qwen25.train.reward_model import (RewardObjective, is_reward_model_dir, load_reward_model,
                                       reward_model_from_lm, save_reward_model)
from qwen25.train.rewards import build_reward, score_rewards
from qwen25.train.rewards.reward_model import RewardModelReward
from qwen25.weights.errors import CheckpointError
from qwen25.weights.safetensors import load_safetensors

transformers = pytest.importorskip("transformers")
CTX = DistContext()
PAD, IM_END = 151643, 151645
PAIRS = [
    {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5, I think"}], "margin": 0.5},
    {"prompt": [{"role": "user", "content": "Say hi"}], "chosen": [{"role": "assistant", "content": "Hi there!"}],
     "rejected": [{"role": "assistant", "content": "No."}], "margin": 0.0},
    {"prompt": [{"role": "user", "content": "Name a prime."}], "chosen": [{"role": "assistant", "content": "7"}],
     "rejected": [{"role": "assistant", "content": "Eight, which is even"}], "margin": 1.5},
]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_hf_dir, real_tokenizer):
    """A reward model made by qwen25 from the tiny causal LM: its decoder and a new N(0, 1) score head."""
    lm = load(tiny_hf_dir).model
    rm = reward_model_from_lm(lm, PAD, seed=0, std=1.0)
    return save_reward_model(rm, tmp_path_factory.mktemp("rm"), real_tokenizer)


def _ragged_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (9, 4, 12)]
    rows[1] += [PAD]  # a text ending in the pad token (a base model's end of text) is pooled before it
    width = max(map(len, rows))
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])


def test_transformers_loads_qwen25s_reward_model_and_scores_alike(rm_dir):
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2ForSequenceClassification" and hf.config.pad_token_id == PAD
    assert set(load_safetensors(rm_dir)) == set(hf.state_dict()) and "score.weight" in hf.state_dict()
    ours = load_reward_model(rm_dir)
    ids = _ragged_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=(ids != PAD).long()).logits
        got = ours(ids)
    assert got.shape == (3, 1) and expected.abs().min() > 1e-3  # scores that mean something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert is_reward_model_dir(rm_dir)


def test_qwen25_loads_a_transformers_reward_model(tmp_path, tiny_hf_dir, real_tokenizer):
    config = transformers.AutoConfig.from_pretrained(tiny_hf_dir, num_labels=1, pad_token_id=PAD)
    torch.manual_seed(3)
    hf = transformers.Qwen2ForSequenceClassification(config).eval()
    torch.nn.init.normal_(hf.score.weight, std=1.0)
    hf.save_pretrained(tmp_path)
    ids = _ragged_batch()
    with torch.no_grad():
        torch.testing.assert_close(load_reward_model(tmp_path)(ids), hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(tiny_hf_dir)


def test_bradley_terry_closed_form():
    chosen, rejected = torch.tensor([1.0, -2.0, 0.3], dtype=torch.float64), torch.tensor([0.5, 1.0, 0.3],
                                                                                         dtype=torch.float64)
    margin = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    expected = [math.log1p(math.exp(-(c - r - m))) for c, r, m in zip(chosen.tolist(), rejected.tolist(),
                                                                        margin.tolist(), strict=True)]
    assert bradley_terry_loss(chosen, rejected, margin).tolist() == pytest.approx(expected, rel=1e-12)
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx(
        [math.log1p(math.exp(-0.5)), math.log1p(math.exp(3.0)), math.log(2)], rel=1e-12)


def test_reward_loss_and_gradients_equal_trl(rm_dir, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    hf_tok = transformers.AutoTokenizer.from_pretrained(rm_dir)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32)
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=3, report_to="none",
                            use_cpu=True, bf16=False, max_length=128)
    trainer = trl.RewardTrainer(model=hf, args=args, train_dataset=datasets.Dataset.from_list(PAIRS),
                                processing_class=hf_tok)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "margin" in batch and sorted(batch["margin"].tolist()) == [0.0, 0.5, 1.5]
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    trl_loss.backward()
    trl_grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}

    ours = load_reward_model(rm_dir, trainable=True)
    ids = batch["input_ids"]
    n = ids.shape[0] // 2
    plain = PairBatch(ids, torch.full_like(ids, -100), batch["attention_mask"].sum(-1), torch.arange(n), None,
                      batch["margin"], 0, n)
    loss_sum, extras = RewardObjective()(ours, plain, CTX, "float32")
    (loss_sum / n).backward()
    torch.testing.assert_close(loss_sum / n, trl_loss.detach(), rtol=1e-5, atol=1e-6)
    grads = {name: p.grad for name, p in ours.named_parameters() if p.grad is not None}
    assert grads.keys() == trl_grads.keys() and "score.weight" in grads
    for name, grad in grads.items():
        scale = trl_grads[name].abs().max().item()
        assert (grad - trl_grads[name]).abs().max().item() <= 1e-4 * scale + 1e-9, name
    with torch.no_grad():
        scores = hf(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, 0]
    assert extras["accuracy"].item() == (scores[:n] > scores[n:]).sum().item()


def _preference_file(path, n: int, seed: int) -> None:
    """Pairs a tiny model can learn: the chosen reply states the sum, the rejected one a wrong number."""
    rng = __import__("random").Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": f"{a}+{b}=", "chosen": f"{a + b} yes", "rejected": f"{a + b + 1} no"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_train_rm_end_to_end_and_as_a_grpo_reward(tiny_hf_dir, tmp_path, capsys, real_tokenizer):
    from qwen25.train.metrics import read_metrics
    from qwen25.train.rm import RMConfig, main

    train, held_out = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    _preference_file(train, 64, 0)
    _preference_file(held_out, 16, 1)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "1+1=", "chosen": "", "rejected": "3"}) + "\n"
                                        + train.read_text())
    out = tmp_path / "rm"
    cfg = RMConfig(model=str(tiny_hf_dir), data=str(tmp_path / "bad.jsonl"), eval_data=str(held_out),
                   output=str(out), lr=3e-3, max_steps=24, batch_size=8, seq_len=64, eval_every=24,
                   no_progress=True, warmup_ratio=0.0, threads=1)
    assert main(cfg) == 0
    text = capsys.readouterr().out
    assert "skipped empty side 1" in text and "held-out pairwise accuracy" in text
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if "eval_accuracy" in r]
    assert evals and evals[-1]["eval_accuracy"] >= 0.8  # 16 unseen pairs
    assert f"{evals[-1]['eval_accuracy']:.1%}" in text

    # the saved reward model scores prompt + completion as transformers does (GRPO's `--reward rm:DIR`)
    reward, weight = build_reward(f"rm:{out}=0.5")
    assert weight == 0.5 and reward.name == "rm"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    prompts, completions = ["3+4=", "3+4=", "Say hi"], ["7 yes", "8 no", "hello"]
    examples = [{}, {}, {"messages": [{"role": "user", "content": "Say hi"}]}]
    scores = reward(prompts, completions, examples)
    texts = ["3+4=7 yes", "3+4=8 no", hf_tok.apply_chat_template(
        examples[2]["messages"] + [{"role": "assistant", "content": "hello"}], tokenize=False).rstrip("\n")]
    for text, score in zip(texts, scores, strict=True):
        ids = hf_tok(text, return_tensors="pt")["input_ids"]
        if not text.endswith("<|im_end|>"):
            ids = torch.cat([ids, torch.tensor([[real_tokenizer.eos_token_id]])], 1)
        with torch.no_grad():
            assert score == pytest.approx(hf(input_ids=ids).logits[0, 0].item(), rel=1e-4, abs=1e-5)
    assert scores[0] > scores[1]  # it learnt the task
    totals = score_rewards([reward], [1.0], prompts, completions, examples)
    assert totals.totals == pytest.approx(scores, rel=1e-6)


def test_reward_model_of_another_tokenizer_is_refused(rm_dir, real_tokenizer):
    class OtherTokenizer:
        def __len__(self) -> int:
            return 32_000

        def encode(self, text: str) -> list[int]:
            return [ord(c) % 32_000 for c in text]

    with pytest.raises(ValueError, match="another tokenizer"):
        RewardModelReward.load(rm_dir, policy_tokenizer=OtherTokenizer())
    with pytest.raises(ValueError, match="another tokenizer"):
        build_reward(f"rm:{rm_dir}", policy_tokenizer=OtherTokenizer())
    RewardModelReward.load(rm_dir, policy_tokenizer=OtherTokenizer(), allow_other_tokenizer=True)
    RewardModelReward.load(rm_dir, policy_tokenizer=real_tokenizer)


def test_a_reward_model_needs_a_pad_token(rm_dir):
    from train_toy import TOY_CONFIG

    from qwen25.model.qwen2 import Qwen2ForCausalLM

    for bad in (None, -1, TOY_CONFIG.vocab_size):
        with pytest.raises(ValueError, match="pad token"):
            reward_model_from_lm(Qwen2ForCausalLM(TOY_CONFIG), bad)  # type: ignore[arg-type]
    rm = load_reward_model(rm_dir)
    rm.pad_token_id = None
    with pytest.raises(ValueError, match="pad_token_id"):
        rm(_ragged_batch())
