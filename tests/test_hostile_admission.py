"""Fair admission: one request that needs most of the KV cache, or a long prompt being prefilled, must not lock
every other request out. Scheduler without a model (running prefills leave room for the queue's head; why the
head waits is reported), the engine on a tiny model (a full-context request and a short one share a pool sized
for two, and the short one finishes first; with a pool for one it cannot start, and the engine says so), the
default pool size, and /health on a real checkpoint."""

from __future__ import annotations

import pytest
import torch

from qwen25.config import ModelConfig
from qwen25.engine.block_manager import BlockManager
from qwen25.engine.engine import LLMEngine
from qwen25.engine.scheduler import ScheduledBatch, Scheduler
from qwen25.engine.sequence import Sequence
from qwen25.model.qwen2 import Qwen2ForCausalLM
from qwen25.sampling_params import SamplingParams

from tiny_models import unit_scale_

TOKEN = 7


def make_seq(rid: str, n_prompt: int, max_tokens: int = 4) -> Sequence:
    return Sequence(rid, [100 + (ord(rid[0]) * 7 + i) % 50 for i in range(n_prompt)], SamplingParams(temperature=0),
                    frozenset(), max_tokens)


def step(sched: Scheduler) -> dict[str, int]:
    batch: ScheduledBatch = sched.schedule()
    sampled = [[TOKEN] if s.num_computed_tokens + n == s.num_tokens else []
               for s, n in zip(batch.seqs, batch.num_new_tokens)]
    sched.postprocess(batch, sampled)
    return {s.request_id: n for s, n in zip(batch.seqs, batch.num_new_tokens)}


def test_a_running_prefill_leaves_room_for_the_next_waiting_prompt() -> None:
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=16, block_manager=BlockManager(128, 4),
                      long_prefill_tokens=1000)  # not "long": it keeps sharing steps
    sched.add(make_seq("long", 200, max_tokens=2))
    assert step(sched) == {"long": 16}
    sched.add(make_seq("short", 5, max_tokens=3))
    assert step(sched) == {"long": 11, "short": 5}  # the short prompt starts at once, next to the long prefill
    plans = [step(sched) for _ in range(3)]
    assert [p.get("short") for p in plans] == [1, 1, None]  # it decodes to the end while the long one prefills
    assert all(p["long"] >= 8 for p in plans)  # which keeps at least half the budget
    assert sched.blocked_on is None


def test_a_long_prompt_yields_to_decodes_and_shorter_prompts() -> None:
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=16, block_manager=BlockManager(256, 4),
                      long_prefill_tokens=100, long_prefill_pause=6, long_prefill_chunk=16)
    sched.add(make_seq("long", 400, max_tokens=2))
    assert step(sched) == {"long": 16}  # alone, it runs at full speed
    sched.add(make_seq("short", 5, max_tokens=4))
    plans = [step(sched) for _ in range(4)]
    assert plans == [{"short": 5}, {"short": 1}, {"short": 1}, {"short": 1}]  # paused while the short one runs
    assert step(sched) == {"long": 16}  # and back to full speed once it is done
    sched.add(make_seq("query", 5, max_tokens=50))
    sched.add(make_seq("long2", 300))  # a long prompt first in the queue is passed over by the shorter one ...
    sched.waiting.rotate(1)
    assert step(sched) == {"query": 5} and [s.request_id for s in sched.waiting] == ["long2"]
    plans = [step(sched) for _ in range(7)]
    assert [sorted(p) for p in plans] == [["query"]] * 5 + [["long", "long2", "query"], ["query"]]
    assert sched.long_prefill_paused == 1  # ... but never starved: after 6 paused steps the long ones run once


def test_a_long_prompt_runs_in_small_chunks_that_shrink_with_depth() -> None:
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, block_manager=BlockManager(512, 4),
                      long_prefill_tokens=100, long_prefill_chunk=8, long_prefill_pairs=800)
    long = make_seq("long", 1000, max_tokens=1)
    sched.add(long)
    chunks = []
    while long.is_prefill and len(chunks) < 2000:
        depth = long.num_computed_tokens
        chunks.append((depth, step(sched)["long"]))
    assert chunks[0] == (0, 8) and all(n <= 8 and (n * max(d, 100) <= 800 or n == 1) for d, n in chunks)
    assert [n for d, n in chunks if d >= 800] and all(n == 1 for d, n in chunks if d >= 800)
    assert sum(n for _, n in chunks) == 999  # every prompt token once (the last one as a decode)
    assert step(sched) == {"long": 1} and long.is_finished
    sched.add(make_seq("normal", 90))
    assert step(sched) == {"normal": 64}  # prompts under the threshold are not limited
    default = Scheduler(max_num_seqs=8, max_num_batched_tokens=512, block_manager=BlockManager(16, 16))
    assert (default.long_prefill_tokens, default.long_prefill_chunk, default.long_prefill_pairs) == (4096, 32, 65536)


def test_without_waiting_prompts_a_prefill_takes_the_whole_budget() -> None:
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=16, block_manager=BlockManager(128, 4))
    sched.add(make_seq("long", 100))
    assert [step(sched)["long"] for _ in range(3)] == [16, 16, 16]


def test_why_the_head_waits_is_reported() -> None:
    sched = Scheduler(max_num_seqs=1, max_num_batched_tokens=64, block_manager=BlockManager(64, 4))
    sched.add(make_seq("a", 8, max_tokens=3))
    sched.add(make_seq("b", 8))
    step(sched)
    assert sched.blocked_on == "max_num_seqs"
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, block_manager=BlockManager(6, 4))
    sched.add(make_seq("big", 21, max_tokens=3))  # 24 tokens at the end: all 6 blocks
    sched.add(make_seq("small", 4))
    step(sched)
    assert sched.blocked_on == "kv_cache" and [s.request_id for s in sched.waiting] == ["small"]
    for _ in range(50):
        if not sched.waiting:
            break
        step(sched)
    assert sched.blocked_on is None and not sched.running or sched.running[0].request_id == "small"


def test_a_head_blocked_by_the_cache_does_not_slow_the_running_prefill() -> None:
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=16, block_manager=BlockManager(18, 4))
    sched.add(make_seq("long", 64, max_tokens=1))  # 16 tokens a step; 16 of the 18 blocks
    sched.add(make_seq("next", 12))  # 3 blocks: does not fit
    assert step(sched) == {"long": 16}
    assert step(sched) == {"long": 8} and sched.blocked_on == "kv_cache"  # room held back once, then it is known
    assert step(sched) == {"long": 16}  # no budget held back for a head that cannot start
    assert step(sched) == {"long": 16} and sched.blocked_on == "kv_cache"


# --- the engine on a tiny model -----------------------------------------------------------------------------------
class Printable:
    special_ids: frozenset[int] = frozenset()

    def token_bytes(self, token_id: int) -> bytes:
        return chr(32 + token_id % 95).encode()

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(32 + t % 95) for t in ids)


@pytest.fixture(scope="module")
def tiny() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return unit_scale_(Qwen2ForCausalLM(config).eval())


def run_pair(model: Qwen2ForCausalLM, num_blocks: int) -> tuple[list[str], list[float]]:
    """A full-context request, then (one step later) a 4-token one; the order they finish in, and the
    engine's queue_blocked_on_kv_cache after each step."""
    engine = LLMEngine(model, Printable(), max_num_seqs=4, max_num_batched_tokens=32, block_size=16,
                       num_blocks=num_blocks, max_model_len=128)
    engine.add_request("full", [(i * 7) % 256 for i in range(120)], SamplingParams(temperature=0, max_tokens=7,
                                                                                  ignore_eos=True))
    finished, blocked = [], []
    for i in range(200):
        if i == 1:
            engine.add_request("short", [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        finished += [o.request_id for o in engine.step() if o.finish_reason is not None]
        blocked.append(engine.stats()["queue_blocked_on_kv_cache"])
        if not engine.has_unfinished_requests():
            break
    return finished, blocked


def test_a_full_context_request_does_not_lock_out_a_short_one(tiny) -> None:  # noqa: ANN001
    finished, blocked = run_pair(tiny, num_blocks=2 * 128 // 16)  # the pool the server sizes: two full contexts
    assert finished == ["short", "full"] and not any(blocked)
    finished, blocked = run_pair(tiny, num_blocks=128 // 16)  # a pool for one: the short request must wait ...
    assert finished == ["full", "short"] and any(blocked)  # ... and the engine reports why


@pytest.fixture(scope="module")
def checkpoint(tiny_hf_dir):  # noqa: ANN001, ANN201
    from qwen25.checkpoint import load

    return load(tiny_hf_dir)


def test_the_default_pool_holds_two_full_contexts(checkpoint) -> None:  # noqa: ANN001
    window = checkpoint.config.max_position_embeddings
    engine = LLMEngine.from_checkpoint(checkpoint, max_model_len=window)
    assert engine.cache_capacity >= 2 * window and engine.max_model_len == window


def test_health_shows_the_queue_on_a_real_checkpoint(checkpoint) -> None:  # noqa: ANN001
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from qwen25.server.app import create_app_from_checkpoint

    app = create_app_from_checkpoint(checkpoint, served_model_name="tiny", max_concurrency=2)
    with TestClient(app) as client:
        health = client.get("/health")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "ok" and body["admitting"] and body["queue"]["head_blocked_on"] is None
        assert "first come, first served" in body["policy"] and body["kv_cache_usage"] == 0
        assert "qwen25_engine_queue_blocked_on_kv_cache 0" in client.get("/metrics").text
