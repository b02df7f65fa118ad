"""DPO: the loss and its gradients against TRL's DPOTrainer on the same batch (sigmoid and IPO), pair encoding
against TRL's tokenization, bad pairs skipped and counted, the reference log-probs cached and reused,
and `qwen25 train dpo` end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen25.train.distributed import DistContext
from qwen25.train.dpo_objective import DPOObjective, cached_reference_logps, reference_logps
from qwen25.train.logprobs import sequence_logps
from qwen25.train.pairs import PairBatch, PairLoader, encode_pair_record, load_pairs
from qwen25.train.preference_losses import dpo_loss
from qwen25.weights.loader import load_weights

transformers = pytest.importorskip("transformers")
CTX = DistContext()
PAIRS = [
    {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5, I think"}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}],
     "chosen": [{"role": "assistant", "content": "Hi there!"}], "rejected": [{"role": "assistant", "content": "No."}]},
    {"prompt": [{"role": "user", "content": "Name a prime."}], "chosen": [{"role": "assistant", "content": "7"}],
     "rejected": [{"role": "assistant", "content": "Eight, which is even"}]},
]


def _tiny_config(**kw):
    return transformers.Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, **kw)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, real_tokenizer):
    """A policy and a (different) reference: tiny random transformers Qwen2s with the real tokenizer."""
    out = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        torch.manual_seed(seed)
        path = tmp_path_factory.mktemp(name)
        transformers.Qwen2ForCausalLM(_tiny_config()).save_pretrained(path)
        real_tokenizer.save(path)
        out[name] = path
    return out


def _batch_from_trl(batch: dict, ref_logps: torch.Tensor | None = None) -> PairBatch:
    ids, mask = batch["input_ids"], batch["completion_mask"]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    n = ids.shape[0] // 2
    return PairBatch(ids, labels, batch["attention_mask"].sum(-1), torch.arange(n), ref_logps, torch.zeros(n),
                     int((labels != -100).sum()), n)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_gradients_equal_trl(dirs, loss_type):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    hf_tok = transformers.AutoTokenizer.from_pretrained(dirs["policy"])
    policy_hf = transformers.AutoModelForCausalLM.from_pretrained(dirs["policy"], dtype=torch.float32)
    ref_hf = transformers.AutoModelForCausalLM.from_pretrained(dirs["reference"], dtype=torch.float32)
    args = trl.DPOConfig(output_dir=str(dirs["policy"] / "trl"), beta=0.3, loss_type=[loss_type],
                         per_device_train_batch_size=3, report_to="none", use_cpu=True, max_length=128,
                         bf16=False)  # TRL defaults to bf16 autocast, even on CPU: compare in fp32
    trainer = trl.DPOTrainer(model=policy_hf, ref_model=ref_hf, args=args,
                             train_dataset=datasets.Dataset.from_list(PAIRS), processing_class=hf_tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer._compute_loss(trainer.model, batch, False)
    trl_loss.backward()
    trl_grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}

    ours = load_weights(dirs["policy"], trainable=True).model.train()
    reference = load_weights(dirs["reference"]).model
    plain = _batch_from_trl(batch)
    ref = torch.cat(list(reference_from_batch(reference, plain)))
    loss_sum, extras = DPOObjective(beta=0.3, loss_type=loss_type)(ours, _batch_from_trl(batch, ref), CTX,
                                                                   "float32")
    loss = loss_sum / plain.num_loss_units
    loss.backward()
    torch.testing.assert_close(loss, trl_loss.detach(), rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert grads.keys() == trl_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert_grad_close(grad, trl_grads[name], name)


def assert_grad_close(ours: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    """Within 1e-4 of the tensor's largest entry: fp32 sums in another order differ in the last bits, which an
    elementwise relative tolerance magnifies on the embedding rows that get almost no gradient."""
    scale = reference.abs().max().item()
    assert (ours - reference).abs().max().item() <= 1e-4 * scale + 1e-9, (name, scale)


def reference_from_batch(model, batch: PairBatch):
    with torch.no_grad():
        logps, _ = sequence_logps(model, batch.input_ids, batch.labels, CTX)
    n = batch.num_loss_units
    return logps[:n].double(), logps[n:].double()


def test_dpo_loss_closed_form():
    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in ([-3.0, -10.0], [-4.0, -2.0], [-3.5, -9.0],
                                                                    [-3.5, -3.0]))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    logits = ((pc - rc) - (pr - rr)).tolist()
    expected = [torch.log1p(torch.exp(torch.tensor(-0.5 * x, dtype=torch.float64))).item() for x in logits]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert chosen.tolist() == pytest.approx([0.25, -0.5]) and rejected.tolist() == pytest.approx([-0.25, 0.5])
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", chosen_tokens=torch.tensor([2, 4]),
                         rejected_tokens=torch.tensor([1, 1]))
    assert ipo.tolist() == pytest.approx([(0.25 + 0.5 - 1) ** 2, (-0.25 - 1 - 1) ** 2])
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


def test_pair_encoding_matches_trl_less_the_newline_after_im_end(dirs, real_tokenizer):
    hf_tok = transformers.AutoTokenizer.from_pretrained(dirs["policy"])
    for record in PAIRS:
        pair = encode_pair_record(record, real_tokenizer, real_tokenizer.chat_template, "test")
        prompt = hf_tok.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=False)
        full = hf_tok.apply_chat_template(record["prompt"] + record["chosen"], tokenize=False)
        assert pair.prompt == hf_tok(prompt)["input_ids"]
        # TRL trains on "<|im_end|>\n"; generation stops at <|im_end|>, so qwen25 leaves the newline out
        assert pair.prompt + pair.chosen + hf_tok("\n")["input_ids"] == hf_tok(full)["input_ids"]
        assert pair.chosen[-1] == 151645


def test_bad_pairs_are_skipped_and_counted(tmp_path, real_tokenizer):
    path = tmp_path / "pairs.jsonl"
    long_prompt = "word " * 300
    rows = [PAIRS[0], {"prompt": "Q: 1+1?", "chosen": "", "rejected": "3"},  # empty side
            {"prompt": "Q", "chosen": "same", "rejected": "same"},  # identical
            {"prompt": long_prompt, "chosen": "a", "rejected": "b"},  # prompt longer than the context
            {"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": " "}],
             "rejected": "fine"},  # empty assistant turn
            {"prompt": "Q: 2+2?", "chosen": "4" * 1, "rejected": "four " * 100}]  # overlong rejected side
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, stats = load_pairs(path, real_tokenizer, real_tokenizer.chat_template, max_length=64)
    assert len(pairs) == 1 and stats["pairs"] == 6
    assert stats["skipped_empty_side"] == 2 and stats["skipped_identical"] == 1
    assert stats["skipped_prompt_too_long"] == 1 and stats["skipped_overlong"] == 1
    truncated, stats = load_pairs(path, real_tokenizer, real_tokenizer.chat_template, 64, overlong="truncate")
    assert len(truncated) == 2 and stats["truncated"] == 1 and max(map(len, truncated)) <= 64
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2"):
        load_pairs(path, real_tokenizer, None, 64)
    path.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match="no usable preference pair"):
        load_pairs(path, real_tokenizer, None, 64)


def test_content_that_spells_control_tokens_stays_text(real_tokenizer):
    record = {"prompt": [{"role": "user", "content": "hi<|im_end|>"}], "chosen": "<|im_start|>system", "rejected": "a"}
    pair = encode_pair_record(record, real_tokenizer, real_tokenizer.chat_template, "test")
    assert pair.prompt.count(151645) == 2  # the system turn's and the user turn's own ends, not the content's
    assert 151644 not in pair.chosen[:-1] and pair.chosen[-1] == 151645


def test_reference_logps_are_cached_and_reused(dirs, tmp_path, real_tokenizer):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    pairs, _ = load_pairs(data, real_tokenizer, real_tokenizer.chat_template, 128)
    model = load_weights(dirs["reference"]).model
    values, path, reused = cached_reference_logps(model, pairs, CTX, 151643, data=data, reference=dirs["reference"],
                                                  batch_size=2)
    assert not reused and path.is_file() and path.parent == tmp_path and values.shape == (3, 2)
    again, path2, reused = cached_reference_logps(None, pairs, CTX, 151643, data=data, reference=dirs["reference"])
    assert reused and path2 == path and (again == values).all()
    # the batched computation equals one pair at a time
    for i, p in enumerate(pairs):
        assert reference_logps(model, [p], CTX, 151643) == pytest.approx(values[i:i + 1], rel=1e-5)


def test_pair_loader_resumes_and_deals_disjoint_rows(real_tokenizer, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 4))
    pairs, _ = load_pairs(data, real_tokenizer, None, 128)
    whole = [b.pair_ids.tolist() for b in PairLoader(pairs, 4, 0, 151643)]
    halves = [[b.pair_ids.tolist() for b in PairLoader(pairs, 2, 0, 151643, rank=r, world_size=2)] for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == whole
    loader = PairLoader(pairs, 4, 0, 151643)
    it = iter(loader)
    next(it)
    resumed = PairLoader(pairs, 4, 0, 151643)
    resumed.load_state_dict(loader.state_dict())
    assert [b.pair_ids.tolist() for b in resumed] == whole[1:]
    b = PairLoader(pairs, 2, 0, 151643).__iter__().__next__()
    assert b.input_ids.shape[0] == 4 and b.num_loss_units == 2 and (b.lengths <= b.input_ids.shape[1]).all()


def test_train_dpo_end_to_end(dirs, tmp_path, capsys):
    from qwen25.train.dpo import DPOConfig, main
    from qwen25.train.metrics import read_metrics

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 4))
    out = tmp_path / "run"
    cfg = DPOConfig(model=str(dirs["policy"]), data=str(data), eval_data=str(data), output=str(out), lr=3e-3,
                    max_steps=8, batch_size=4, seq_len=128, no_progress=True, warmup_ratio=0.0, threads=1)
    assert main(cfg) == 0
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy starts equal to the reference
    # beta 0.1 on a tiny random model: 8 steps lift every pair's margin (accuracy 1) and cut the loss by a quarter
    assert steps[-1]["loss"] < 0.6 and steps[-1]["reward_accuracy"] == 1.0
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.1
    assert records[-1]["eval_reward_accuracy"] == 1.0
    assert (out / "model.safetensors").is_file() and list(tmp_path.glob("pairs.jsonl.ref-*.npz"))
    text = capsys.readouterr().out
    assert "computed, cached in" in text
    cfg2 = DPOConfig(model=str(dirs["policy"]), data=str(data), output=str(tmp_path / "run2"), max_steps=1,
                     batch_size=4, seq_len=128, no_progress=True, threads=1, lora=True, loss_type="ipo")
    assert main(cfg2) == 0
    assert "read from" in capsys.readouterr().out  # the second run reuses the cached reference log-probs
    assert (tmp_path / "run2" / "adapter_model.safetensors").is_file()


def test_cli_help_and_one_line_errors(tmp_path, capsys, tiny_hf_dir):
    from qwen25.cli import main as cli_main

    for stage in ("rm", "dpo"):
        with pytest.raises(SystemExit):
            cli_main(["train", stage, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and "--resume" in out and '"chosen"' in out and "skipped and counted" in out
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    for stage in ("rm", "dpo"):
        code = cli_main(["train", stage, "--model", str(tiny_hf_dir), "--data", str(bad), "--output",
                         str(tmp_path / stage)])
        err = capsys.readouterr().err.strip()
        assert code == 1 and err.startswith("qwen25: error: ") and err.count("\n") == 0 and "pairs.jsonl:2" in err
    code = cli_main(["train", "dpo", "--data", str(bad), "--output", str(tmp_path / "o"), "--beta", "0"])
    assert code != 0 and "--beta must be > 0" in capsys.readouterr().err


def test_limit_heap_retention(monkeypatch):
    import subprocess
    import sys

    from qwen25.runtime import limit_heap_retention

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert limit_heap_retention() is False  # the environment's choice stands
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    code = "from qwen25.runtime import limit_heap_retention as f; print(f())"  # in a child: a process-wide setting
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import platform

    assert out == ("True" if platform.libc_ver()[0] == "glibc" else out)
