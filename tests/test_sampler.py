"""Sampling filters and penalties against transformers' logits processors; SamplingParams validation;
stop-string matching."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import generation as hfgen  # noqa: E402

from qwen25.engine.sampler import apply_penalties, filter_logits, greedy_token, sample_next  # noqa: E402
from qwen25.engine.stop import StopMatcher  # noqa: E402
from qwen25.sampling_params import SamplingParams  # noqa: E402

V = 500


def _kept(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top_k,top_p,min_p", [(20, 1.0, 0.0), (0, 0.8, 0.0), (0, 0.3, 0.0), (0, 1.0, 0.05),
                                               (0, 1.0, 0.3)])
def test_filters_match_transformers(seed, top_k, top_p, min_p):
    torch.manual_seed(seed)
    logits = torch.randn(V) * 3
    ours = filter_logits(logits, top_k, top_p, min_p)
    if top_k:
        ref = hfgen.TopKLogitsWarper(top_k)(None, logits[None].clone())[0]
    elif top_p < 1:
        ref = hfgen.TopPLogitsWarper(top_p)(None, logits[None].clone())[0]
    else:
        ref = hfgen.MinPLogitsWarper(min_p)(None, logits[None].clone())[0]
    assert torch.equal(_kept(ours), _kept(ref))
    torch.testing.assert_close(ours[_kept(ours)], logits[_kept(ours)])


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(0)
    logits = torch.randn(V)
    prompt, output = torch.tensor([3, 7, 7, 42]), torch.tensor([42, 100, 5])
    ours = apply_penalties(logits, prompt, output, 1.3, 0.0, 0.0)
    ref = hfgen.RepetitionPenaltyLogitsProcessor(1.3)(torch.cat([prompt, output])[None], logits[None].clone())[0]
    torch.testing.assert_close(ours, ref)


def test_presence_and_frequency_penalties_closed_form():
    logits = torch.zeros(10)
    out = apply_penalties(logits, torch.tensor([1]), torch.tensor([2, 2, 2, 5]), 1.0, 0.5, 0.25)
    expected = torch.zeros(10)
    expected[2] = -(0.5 + 3 * 0.25)
    expected[5] = -(0.5 + 1 * 0.25)
    torch.testing.assert_close(out, expected)  # the prompt token 1 is untouched (OpenAI semantics)


@pytest.mark.parametrize("case", ["random", "ties", "all_equal", "neg_inf", "nan", "two_nans", "strided", "bf16"])
def test_greedy_token_is_torch_argmax(case):
    """greedy_token (numpy on float32 CPU rows) picks what torch.argmax picks: the first maximum, NaN largest."""
    g = torch.Generator().manual_seed(7)
    row = torch.randn(151936, generator=g)
    if case == "ties":
        row[[10, 500, 90000]] = row.max() + 1
    elif case == "all_equal":
        row = torch.full((V,), -3.0)
    elif case == "neg_inf":
        row[:] = float("-inf")
        row[1234] = -1e30
    elif case == "nan":
        row[777] = float("nan")
    elif case == "two_nans":
        row[[900, 33]] = float("nan")
    elif case == "strided":
        row = torch.randn(4, 151936, generator=g)[:, 5]  # a non-contiguous view
    elif case == "bf16":
        row = row.to(torch.bfloat16)  # not float32: torch's own argmax
    assert greedy_token(row) == int(row.argmax())


def test_greedy_is_argmax_and_seed_reproduces():
    torch.manual_seed(1)
    logits = torch.randn(V)
    empty = torch.tensor([], dtype=torch.long)
    assert sample_next(logits, SamplingParams(temperature=0), empty, empty, None) == int(logits.argmax())
    params = SamplingParams(temperature=1.0, top_p=0.9)
    draws = []
    for _ in range(2):
        g = torch.Generator().manual_seed(1234)
        draws.append([sample_next(logits, params, empty, empty, g) for _ in range(20)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    g = torch.Generator().manual_seed(0)
    empty = torch.tensor([], dtype=torch.long)
    counts = torch.bincount(torch.tensor([sample_next(logits, SamplingParams(), empty, empty, g)
                                          for _ in range(3000)]), minlength=3).float() / 3000
    torch.testing.assert_close(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_p=1.5), dict(top_p=0), dict(top_k=-2),
                                    dict(min_p=2), dict(repetition_penalty=0), dict(presence_penalty=3),
                                    dict(max_tokens=0), dict(n=0), dict(stop=[""])])
def test_invalid_sampling_params_are_rejected(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_stop_matcher_holds_back_partial_matches_and_cuts():
    m = StopMatcher(["\n```", "END"], include_stop=False)
    pieces = [m.feed(t, final=False) for t in ["def f():\n", "    return 1\n`", "``\nmore"]]
    assert "".join(p[0] for p in pieces) == "def f():\n    return 1"
    assert pieces[-1][1] is True
    m = StopMatcher(["END"], include_stop=True)
    assert m.feed("abcEN", False) == ("abc", False)
    assert m.feed("D tail", False) == ("END", True)
    m = StopMatcher(["END"], include_stop=False)
    assert m.feed("abcEN", False) == ("abc", False)
    assert m.feed("", True) == ("EN", False)  # the end of the stream releases held-back text
