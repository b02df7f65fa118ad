"""Scheduler without a model: admission limits, chunked prefill, decodes progressing during a long prefill,
preemption by recompute, abort, stop tokens. A fake runner "samples" a fixed token for every finished row."""

from __future__ import annotations

from qwen25.engine.block_manager import BlockManager
from qwen25.engine.scheduler import ScheduledBatch, Scheduler
from qwen25.engine.sequence import Sequence, SequenceStatus
from qwen25.sampling_params import SamplingParams

TOKEN = 7


def make_seq(rid: str, n_prompt: int, max_tokens: int = 4, stop: frozenset[int] = frozenset()) -> Sequence:
    return Sequence(rid, [100 + (ord(rid[0]) * 7 + i) % 50 for i in range(n_prompt)], SamplingParams(temperature=0),
                    stop, max_tokens)


def fake_run(batch: ScheduledBatch, token: int = TOKEN) -> list[list[int]]:
    return [[token] if s.num_computed_tokens + n == s.num_tokens else [] for s, n in zip(batch.seqs, batch.num_new_tokens)]


def step(sched: Scheduler, token: int = TOKEN) -> dict[str, int]:
    batch = sched.schedule()
    plan = {s.request_id: n for s, n in zip(batch.seqs, batch.num_new_tokens)}
    assert batch.num_batched_tokens <= sched.max_num_batched_tokens and len(batch) <= sched.max_num_seqs
    sched.postprocess(batch, fake_run(batch, token))
    return plan


def run_to_completion(sched: Scheduler, limit: int = 1000) -> list[dict[str, int]]:
    plans = []
    while sched.has_unfinished():
        plans.append(step(sched))
        assert len(plans) < limit, "scheduler made no progress"
    return plans


def test_admission_respects_max_num_seqs_and_token_budget():
    sched = Scheduler(max_num_seqs=2, max_num_batched_tokens=10, block_manager=BlockManager(64, 4))
    for rid in "abc":
        sched.add(make_seq(rid, 6))
    assert step(sched) == {"a": 6, "b": 4}  # b's prompt is chunked to the remaining budget; c must wait
    assert len(sched.running) == 2 and [s.request_id for s in sched.waiting] == ["c"]
    assert step(sched) == {"a": 1, "b": 2}  # a decodes; b finishes its prompt
    plans = run_to_completion(sched)
    assert any("c" in p for p in plans)
    assert sched.block_manager.num_used_blocks == 0


def test_chunked_prefill_splits_a_long_prompt():
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=8, block_manager=BlockManager(64, 4))
    seq = make_seq("long", 25, max_tokens=2)
    sched.add(seq)
    plans = run_to_completion(sched)
    assert [p["long"] for p in plans] == [8, 8, 8, 1, 1]  # 4 prompt chunks, then one decode
    assert seq.output_token_ids == [TOKEN, TOKEN] and seq.finish_reason == "length"


def test_decodes_keep_progressing_while_a_long_prompt_prefills():
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=8, block_manager=BlockManager(64, 4))
    short = make_seq("short", 3, max_tokens=10)
    sched.add(short)
    step(sched)  # short's prefill; it samples its first token
    sched.add(make_seq("long", 40, max_tokens=1))
    plans = [step(sched) for _ in range(5)]
    assert all(p["short"] == 1 for p in plans)  # one decode token every step ...
    assert [p["long"] for p in plans] == [7, 7, 7, 7, 7]  # ... and the prompt gets the rest of the budget
    assert short.num_output_tokens == 6


def test_preemption_when_blocks_run_out_and_the_victim_completes():
    bm = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, block_manager=bm)
    seqs = [make_seq(rid, 6, max_tokens=6) for rid in ("a", "b", "c")]  # 12 tokens each at the end: 3 blocks
    for s in seqs:
        sched.add(s)
    plans = run_to_completion(sched)
    assert sched.num_preemptions >= 1
    victims = [s for s in seqs if s.num_preemptions]
    assert victims and all(s.request_id != "a" for s in victims)  # the latest admitted are preempted first
    for s in seqs:
        assert s.finish_reason == "length" and s.output_token_ids == [TOKEN] * 6
    assert any(p.get(victims[0].request_id, 0) > 1 for p in plans[1:])  # the victim was prefilled again
    assert bm.num_used_blocks == 0 and all(b.ref_count == 0 for b in bm.blocks)


def test_preempted_sequence_reuses_its_cached_prefix():
    bm = BlockManager(num_blocks=5, block_size=4)
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, block_manager=bm)
    a, b = make_seq("a", 8, max_tokens=8), make_seq("b", 8, max_tokens=8)
    sched.add(a)
    sched.add(b)
    run_to_completion(sched)
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert b.num_cached_tokens > 0 and bm.hit_tokens > 0  # readmitted with its full blocks still cached


def test_abort_frees_blocks_running_or_waiting():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(max_num_seqs=1, max_num_batched_tokens=16, block_manager=bm)
    a, b = make_seq("a", 10, max_tokens=50), make_seq("b", 5)
    sched.add(a)
    sched.add(b)
    step(sched)
    step(sched)
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    sched.abort(b)
    assert not sched.waiting and b.finish_reason == "abort"
    sched.abort(a)
    assert a.finish_reason == "abort" and not sched.running and not sched.has_unfinished()
    assert bm.num_used_blocks == 0 and all(blk.ref_count == 0 for blk in bm.blocks)
    assert len(sched.schedule()) == 0


def test_stop_token_finishes_without_being_appended():
    sched = Scheduler(max_num_seqs=2, max_num_batched_tokens=16, block_manager=BlockManager(16, 4))
    seq = make_seq("s", 5, max_tokens=10, stop=frozenset({TOKEN}))
    sched.add(seq)
    batch = sched.schedule()
    events = sched.postprocess(batch, fake_run(batch))
    assert events == [(seq, [])]
    assert seq.finish_reason == "stop" and seq.output_token_ids == [] and not sched.has_unfinished()
    assert sched.block_manager.num_used_blocks == 0
