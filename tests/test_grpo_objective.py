"""GRPO's objective: advantages and each loss normalisation on hand-computed values, and loss + gradients equal
to TRL 1.16's GRPOTrainer._compute_loss run on the same tensors (TRL's own code, driven with a minimal `self`)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from qwen25.train.grpo_objective import ADV_EPS, group_advantages, grpo_token_loss, mask_truncated


def test_group_advantages_hand_computed():
    adv, equal = group_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), 2)
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    assert torch.allclose(adv, torch.tensor([0.5 / (s + ADV_EPS), -0.5 / (s + ADV_EPS), 0.0, 0.0]))
    assert equal.tolist() == [False, True]
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), 2, scale="none")  # Dr. GRPO
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0]


def test_degenerate_groups_zero_advantage_no_nan():
    for scale in ("group", "batch", "none"):
        adv, equal = group_advantages(torch.zeros(8), 4, scale=scale)
        assert torch.equal(adv, torch.zeros(8)) and equal.all()
    logps = torch.randn(8, 5, requires_grad=True)
    out = grpo_token_loss(logps, None, torch.zeros(8), torch.ones(8, 5), ref_logps=logps.detach(), beta=0.04)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.isfinite(logps.grad).all() and not logps.grad.any()


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_token_loss(torch.zeros(1, 1), None, torch.zeros(1), torch.ones(1, 1), beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_token_loss(torch.zeros(1, 1), None, torch.zeros(1), torch.ones(1, 1), loss_type="dr_grpo")


# rows: A = +1 over 2 tokens, A = -2 over 3 tokens; ratio 1 so l_t = -A: row sums -2 and +6
_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
_ADV = torch.tensor([1.0, -2.0])


@pytest.mark.parametrize("loss_type,kwargs,expected", [
    ("grpo", {}, ((-2 / 2) + (6 / 3)) / 2),  # per-sequence mean, then mean over sequences
    ("bnpo", {}, (-2 + 6) / 5),  # token mean over the micro-batch
    ("dr_grpo", {"max_completion_length": 4}, (-2 + 6) / (2 * 4)),  # constant normaliser
    ("dapo", {"num_items": 10}, (-2 + 6) / 10),  # token mean over the global batch
    ("dapo", {}, (-2 + 6) / 5),
])
def test_loss_normalisations_hand_computed(loss_type, kwargs, expected):
    logps = torch.zeros(2, 3)
    out = grpo_token_loss(logps, None, _ADV, _MASK, loss_type=loss_type, **kwargs)
    assert out.loss.item() == pytest.approx(expected)
    assert out.tokens.item() == 5


def test_clip_and_k3_hand_computed():
    old = torch.zeros(2, 1)
    logps = torch.log(torch.tensor([[1.5], [0.5]]))
    ref = logps + math.log(2.0)  # ref - logp = ln 2: k3 = 2 - ln 2 - 1
    out = grpo_token_loss(logps, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1), ref_logps=ref, beta=0.1,
                          loss_type="bnpo")
    # row 0: min(1.5, 1.2) * 1 -> -1.2 ; row 1: min(0.5 * -1, 0.8 * -1) = -0.8 -> +0.8 ; both clipped
    k3 = 1 - math.log(2.0)
    assert out.loss.item() == pytest.approx(((-1.2 + 0.1 * k3) + (0.8 + 0.1 * k3)) / 2)
    assert out.clipped_sum.item() == 2 and out.kl_sum.item() == pytest.approx(2 * k3)
    high = grpo_token_loss(logps, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1), eps_high=0.28,
                           loss_type="bnpo")  # clip-higher: row 0 capped at 1.28
    assert high.loss.item() == pytest.approx((-1.28 + 0.8) / 2)


def test_mask_truncated():
    m = mask_truncated(torch.ones(3, 2), torch.tensor([False, True, False]))
    assert m.tolist() == [[1, 1], [0, 0], [1, 1]]


# --- against TRL's own loss code


def _trl_loss(loss_type: str, logps: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, adv: torch.Tensor,
              mask: torch.Tensor, beta: float, eps_low: float, eps_high: float, max_len: int,
              num_items: float) -> torch.Tensor:
    from trl.trainer.grpo_trainer import GRPOTrainer

    b, t = logps.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros(b, t), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
        _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": torch.tensor(num_items)}
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(stub, None, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,eps_high,truncate", [(0.0, 0.2, False), (0.04, 0.28, True)])
def test_equals_trl_loss_and_gradients(loss_type, beta, eps_high, truncate):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    b, t, max_len = 6, 7, 9
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    if truncate:
        mask = mask_truncated(mask, lengths == 7)
    base = torch.randn(b, t, generator=g) - 2
    old = base + 0.3 * torch.randn(b, t, generator=g)  # ratios in and out of the clip region
    ref = base + 0.2 * torch.randn(b, t, generator=g)
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 1.0]), 2)
    num_items = float(mask.sum()) + 11  # a global batch larger than this micro-batch
    ours_in = base.clone().requires_grad_(True)
    theirs_in = base.clone().requires_grad_(True)
    ours = grpo_token_loss(ours_in, old, adv, mask, ref_logps=ref if beta else None, beta=beta, eps_low=0.2,
                           eps_high=eps_high, loss_type=loss_type, max_completion_length=max_len,
                           num_items=num_items)
    theirs = _trl_loss(loss_type, theirs_in, old, ref if beta else None, adv, mask, beta, 0.2, eps_high, max_len,
                       num_items)
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-6, atol=1e-7)
    ours.loss.backward()
    theirs.backward()
    assert ours_in.grad.abs().sum() > 0
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("truncate", [False, True])
def test_dropping_zero_advantage_rows_changes_no_loss_gradient_or_metric(loss_type, truncate):
    """beta = 0: the objective over a batch without its zero-advantage rows (the units still the full batch's)
    gives the full batch's loss, gradients, kl and clip fraction; only the work shrinks."""
    from qwen25.config import ModelConfig
    from qwen25.model.qwen2 import Qwen2ForCausalLM
    from qwen25.train.distributed import DistContext
    from qwen25.train.grpo_objective import GRPOObjective, loss_units_for
    from qwen25.train.grpo_rollout import RolloutBatch, drop_zero_advantage_rows

    torch.manual_seed(0)
    config = ModelConfig.from_dict(dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model = Qwen2ForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (6, 12), generator=g)
    labels = torch.full_like(ids, -100)
    for i, (start, stop) in enumerate([(3, 11), (4, 7), (2, 11), (5, 9), (3, 6), (4, 11)]):
        labels[i, start:stop] = ids[i, start + 1:stop + 1]
    adv, all_equal = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), 2)  # groups 2 and 3: equal
    assert all_equal.tolist() == [False, True, True] and bool((adv[2:] == 0).all())
    truncated = torch.tensor([True, False, False, True, False, False])
    objective = GRPOObjective(loss_type, beta=0.0, max_completion_length=8, drop_truncated=truncate)

    def run(batch):
        model.zero_grad()
        loss_sum, extras = objective(model, batch, DistContext(), "float32")
        (loss_sum / batch.num_loss_units).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        ratio = {k: float(extras[k] / extras["masked_tokens"]) for k in ("kl", "clip_fraction")}
        return float(loss_sum.detach() / batch.num_loss_units), grads, ratio, extras

    from qwen25.train.logprobs import token_logps

    with torch.no_grad():  # a sampling policy near the current one: ratios in and out of the clip range
        old = token_logps(model, ids, labels, DistContext()).logps + 0.4 * torch.randn(6, 12, generator=g)
    full = RolloutBatch(ids, labels, adv, truncated, None, old_logps=old)
    full.num_loss_units = loss_units_for(loss_type, labels, truncated, truncate)
    full.num_loss_tokens = int((labels != -100).sum())
    dropped = drop_zero_advantage_rows(full, truncate)
    assert dropped.input_ids.shape[0] == 2 and dropped.num_loss_units == full.num_loss_units
    mask = (labels != -100) & ~(truncated.unsqueeze(1) if truncate else torch.zeros(6, 1, dtype=torch.bool))
    assert dropped.dropped_tokens == int(mask[2:].sum())
    loss_a, grads_a, ratio_a, extras_a = run(full)
    loss_b, grads_b, ratio_b, extras_b = run(dropped)
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-9)  # grpo: (sum / rows) x rows in fp32
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)  # fp32 sums over 6 vs 2 rows
    assert (truncate or ratio_a["clip_fraction"] > 0) and ratio_b == pytest.approx(ratio_a, abs=1e-9)
    assert float(extras_b["masked_tokens"]) == float(extras_a["masked_tokens"])
    assert float(extras_b["entropy_tokens"]) == float(mask[:2].sum())  # entropy: over the rows that ran


def test_dropping_keeps_one_row_and_refuses_kl_batches():
    from qwen25.train.grpo_rollout import RolloutBatch, drop_zero_advantage_rows

    ids = torch.zeros(4, 5, dtype=torch.long)
    labels = torch.tensor([[-100, 1, 2, -100, -100]] * 4)
    batch = RolloutBatch(ids, labels, torch.zeros(4), torch.zeros(4, dtype=torch.bool), None)
    kept = drop_zero_advantage_rows(batch)
    assert kept.input_ids.shape[0] == 1 and kept.dropped_tokens == 6
    with pytest.raises(ValueError, match="KL"):
        drop_zero_advantage_rows(RolloutBatch(ids, labels, torch.zeros(4), torch.zeros(4, dtype=torch.bool),
                                              torch.zeros(4, 5)))
