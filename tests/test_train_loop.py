"""The shared training loop and its optimizer: loss and gradients against transformers and a manual CE, gradient
accumulation, clipping, parameter groups, the schedule, metrics/PNG/TensorBoard output, bf16 and activation
checkpointing. Tiny model (hidden 32, vocab 256) and the in-test ToyLoader: each test runs in about a second."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from qwen25.model.init import model_from_config
from qwen25.train.config import TrainArgs
from qwen25.train.distributed import DistContext
from qwen25.train.loop import evaluate, token_loss_sum, train
from qwen25.train.optim import OptimSettings, build_optimizer, clip_gradients, lr_factor, param_groups
from train_toy import TOY_CONFIG, ToyLoader

CTX = DistContext()
FINGERPRINT = {"kind": "test", "model": TOY_CONFIG.to_dict()}


def run(tmp_path, name="run", loader=None, **overrides):
    args = TrainArgs(output=str(tmp_path / name), **{"max_steps": 6, "lr": 3e-3, "no_progress": True,
                                                      "warmup_steps": 1, **overrides})
    model = model_from_config(TOY_CONFIG, seed=0)
    loader = loader or ToyLoader(seq_len=32, batch_size=args.batch_size)
    return model, train(model, loader, args, ctx=CTX, fingerprint=FINGERPRINT)


def test_loss_and_gradients_equal_transformers_on_the_same_weights():
    transformers = pytest.importorskip("transformers")
    model = model_from_config(TOY_CONFIG, seed=3)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TOY_CONFIG.to_dict()))
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    ids = torch.randint(2, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)  # next tokens, none for the last
    batch = type("B", (), dict(input_ids=ids, labels=labels, document_ids=torch.zeros_like(ids),
                               num_loss_tokens=int((labels != -100).sum())))
    ours = token_loss_sum(model, batch, CTX) / batch.num_loss_tokens
    ours.backward()
    theirs = hf(input_ids=ids, labels=ids).loss  # HF shifts internally and averages over the same tokens
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_packed_loss_is_the_manual_cross_entropy_over_loss_tokens():
    model = model_from_config(TOY_CONFIG, seed=1)
    batch = next(iter(ToyLoader(seq_len=32, batch_size=3)))
    logits = model(batch.input_ids, document_ids=batch.document_ids)
    logp = torch.log_softmax(logits.double(), dim=-1)
    keep = batch.labels != -100
    manual = -logp[keep].gather(-1, batch.labels[keep].unsqueeze(-1)).sum()
    torch.testing.assert_close(token_loss_sum(model, batch, CTX).double(), manual, rtol=1e-6, atol=1e-6)
    assert batch.num_loss_tokens == int(keep.sum())


def test_first_logged_step_is_the_initial_models_loss(tmp_path):
    loader = ToyLoader(seq_len=32, batch_size=4)
    expected = evaluate(model_from_config(TOY_CONFIG, seed=0), [next(iter(ToyLoader(seq_len=32, batch_size=4)))], CTX)
    _, result = run(tmp_path, loader=loader, max_steps=1)
    assert result.losses[0] == pytest.approx(expected, rel=1e-6)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    _, big = run(tmp_path, "big", batch_size=4, grad_accum=1)
    _, accumulated = run(tmp_path, "acc", batch_size=2, grad_accum=2)
    assert accumulated.losses == pytest.approx(big.losses, rel=1e-5, abs=1e-6)


def test_loss_falls_and_metrics_are_written(tmp_path):
    eval_loader = ToyLoader(seq_len=32, batch_size=4, seed=7, documents=60)
    args = TrainArgs(output=str(tmp_path / "run"), max_steps=40, lr=1e-2, warmup_steps=4, eval_every=20,
                     no_progress=True, batch_size=4)
    model = model_from_config(TOY_CONFIG, seed=0)
    result = train(model, ToyLoader(seq_len=32, batch_size=4), args, ctx=CTX, fingerprint=FINGERPRINT,
                   eval_loader=eval_loader)
    assert result.losses[-1] < result.losses[0] - 1.5
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(steps[0])
    assert steps[0]["tokens"] == 4 * 32
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / "checkpoint-40" / "trainer_state.json").is_file()


def test_tensorboard_only_when_asked(tmp_path):
    pytest.importorskip("tensorboard")
    run(tmp_path, "plain", max_steps=2)
    assert not (tmp_path / "plain" / "tensorboard").exists()
    run(tmp_path, "tb", max_steps=2, report_to="tensorboard")
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    _, plain = run(tmp_path, "plain")
    _, checkpointed = run(tmp_path, "ac", activation_checkpointing=True)
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-6)


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    _, fp32 = run(tmp_path, "fp32")
    _, bf16 = run(tmp_path, "bf16", dtype="bfloat16")
    assert bf16.losses == pytest.approx(fp32.losses, rel=3e-2)
    assert bf16.losses[-1] < bf16.losses[0]


def test_param_groups_exempt_norms_biases_and_embeddings():
    model = model_from_config(TOY_CONFIG.replace(tie_word_embeddings=False), seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in exempt and "model.norm.weight" in exempt
    assert "model.layers.0.self_attn.q_proj.bias" in exempt and "model.layers.0.input_layernorm.weight" in exempt
    assert "model.layers.0.mlp.down_proj.weight" in decayed and "lm_head.weight" in decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decayed) + len(exempt) == len(list(model.parameters()))


def test_schedule_warms_up_then_decays_to_the_floor():
    s = OptimSettings(lr=7e-6, min_lr=7e-7, warmup_steps=4, total_steps=20)
    factors = [lr_factor(i, s) for i in range(25)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == 1.0 and factors[19] == pytest.approx(0.1) and factors[24] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    mid = lr_factor(4 + 15 // 2, s)  # half way through the cosine: (1 + floor) / 2, up to the half-step
    assert 0.5 < mid < 0.65
    linear = OptimSettings(lr=1.0, min_lr=0.0, schedule="linear", total_steps=11)
    assert [lr_factor(i, linear) for i in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_factor(7, OptimSettings(lr=1.0, min_lr=0.0, schedule="constant", total_steps=3)) == 1.0


def test_lr_in_metrics_follows_the_schedule(tmp_path):
    _, result = run(tmp_path, max_steps=10, warmup_steps=2, lr=1e-3, min_lr=1e-4)
    s = OptimSettings(lr=1e-3, min_lr=1e-4, warmup_steps=2, total_steps=10)
    assert [r["lr"] for r in result.history if "lr" in r] == pytest.approx([1e-3 * lr_factor(i, s) for i in range(10)])


def test_clipping_reports_the_norm_before_and_scales_to_max_norm():
    model = model_from_config(TOY_CONFIG, seed=0)
    batch = next(iter(ToyLoader(seq_len=32, batch_size=2)))
    (token_loss_sum(model, batch, CTX) * 10).backward()
    params = list(model.parameters())
    expected = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
    assert clip_gradients(params, 1.0) == pytest.approx(expected, rel=1e-5)
    after = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
    assert after == pytest.approx(1.0, rel=1e-4)


def test_optimizer_skips_frozen_parameters():
    model = model_from_config(TOY_CONFIG, seed=0)
    model.model.embed_tokens.weight.requires_grad_(False)
    opt = build_optimizer(model, OptimSettings(lr=1e-3, min_lr=0.0))
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.model.embed_tokens.weight) not in held


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        TrainArgs(output="x", batch_size=0)
    with pytest.raises(ValueError, match="min-lr"):
        TrainArgs(output="x", lr=1e-5, min_lr=1e-4)
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        run(tmp_path, max_steps=None, grad_accum=1000)


def test_cross_entropy_ignores_minus_100():
    logits = torch.randn(1, 3, 5)
    labels = torch.tensor([[1, -100, 2]])
    full = F.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1), ignore_index=-100, reduction="sum")
    manual = -(torch.log_softmax(logits, -1)[0, 0, 1] + torch.log_softmax(logits, -1)[0, 2, 2])
    torch.testing.assert_close(full, manual)


def test_chunked_loss_equals_the_full_logits_loss_in_value_and_gradient(monkeypatch):
    import qwen25.train.loop as loop

    batch = next(iter(ToyLoader(seq_len=32, batch_size=3)))
    full_model, chunked_model = model_from_config(TOY_CONFIG, seed=2), model_from_config(TOY_CONFIG, seed=2)
    logits = full_model(batch.input_ids, document_ids=batch.document_ids)
    full = F.cross_entropy(logits.reshape(-1, 256), batch.labels.reshape(-1), ignore_index=-100, reduction="sum")
    full.backward()
    fused = loop.linear_cross_entropy
    monkeypatch.setattr(loop, "linear_cross_entropy", lambda *a, **k: fused(*a, **k, chunk=7))  # ragged last chunk
    chunked = token_loss_sum(chunked_model, batch, CTX)
    chunked.backward()
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    grads = dict(full_model.named_parameters())
    for name, p in chunked_model.named_parameters():  # summed (not mean) loss: grads up to ~10, fp32 rounding
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-5, msg=name)


def test_a_micro_batch_without_loss_tokens_contributes_zero():
    model = model_from_config(TOY_CONFIG, seed=0)
    batch = next(iter(ToyLoader(seq_len=32, batch_size=2)))
    batch.labels = torch.full_like(batch.labels, -100)
    loss = token_loss_sum(model, batch, CTX)
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(float(p.grad.abs().sum()) == 0.0 for p in model.parameters())


def test_loss_png_names_the_objectives_loss(tmp_path, monkeypatch):
    """loss.png's y-axis says what the loss is: token CE by default, the objective's own `loss_label` (DPO, IPO,
    the reward model's Bradley-Terry, GRPO with its normalisation) otherwise."""
    from qwen25.train import metrics
    from qwen25.train.dpo_objective import DPOObjective
    from qwen25.train.grpo_objective import GRPOObjective
    from qwen25.train.reward_model import RewardObjective

    labels = []
    monkeypatch.setattr(metrics, "plot_loss", lambda history, path, title="", loss_label="": labels.append(loss_label))
    run(tmp_path, "plain", max_steps=1)
    assert labels == ["loss (mean token CE, nats)"]

    def labelled(model, batch, ctx, dtype="float32"):  # noqa: ANN001, ANN202
        return token_loss_sum(model, batch, ctx), {}
    labelled.loss_label = "DPO loss per pair"
    args = TrainArgs(output=str(tmp_path / "own"), max_steps=1, no_progress=True, batch_size=4)
    train(model_from_config(TOY_CONFIG, seed=0), ToyLoader(seq_len=32, batch_size=4), args, ctx=CTX,
          fingerprint=FINGERPRINT, objective=labelled)
    assert labels[-1] == "DPO loss per pair"
    assert DPOObjective(0.1).loss_label.startswith("DPO loss per pair, -log sigmoid(beta x margin)")
    assert DPOObjective(0.1, "ipo").loss_label.startswith("IPO loss per pair")
    assert RewardObjective().loss_label.startswith("Bradley-Terry loss per pair")
    assert GRPOObjective("dapo", beta=0.04).loss_label == "GRPO clipped-ratio loss (dapo normalisation) + 0.04 x KL"
