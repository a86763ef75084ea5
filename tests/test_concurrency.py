"""Concurrent serving (tiny model): shared units computed once, back-pressure,
cancellation, randomised arrivals."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from segcache.config import CacheConfig, SchedulerConfig
from segcache.engine.types import ChatRequest, OverloadedError, SamplingParams, SegmentInput

A = "Shared global rules for every agent in the fleet. " * 100  # ~1k tokens
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


def agent_request(i: int, tenant: str = "t") -> ChatRequest:
    segs = [SegmentInput(id="A", content=A), SegmentInput(id=f"B{i}", content=f"Agent {i} skills. " * 5),
            SegmentInput(id=f"D{i}", content=f"Task {i}: fix bug #{i}.")]
    return ChatRequest(tenant, [{"role": "user", "content": f"Go, agent {i}."}], segs, GREEDY)


def test_shared_missing_segment_is_computed_once(tiny_engine_factory):
    engine = tiny_engine_factory(scheduler=SchedulerConfig(max_running=8))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: engine.chat(agent_request(i)), range(8)))
    a_status = [next(u for u in r.segments if u.id == "A").status for r in results]
    assert a_status.count("miss") == 1 and a_status.count("hit") == 7
    a_tokens = next(u for u in results[0].segments if u.id == "A").tokens
    assert a_tokens > 900
    computed = sum(r.prompt_tokens - r.cached_tokens for r in results)
    private = sum(r.prompt_tokens - a_tokens for r in results)
    assert computed == a_tokens + private  # A once, everything else once per request
    cold = tiny_engine_factory()
    for i, r in enumerate(results):
        assert cold.chat(agent_request(i, tenant=f"cold{i}")).token_ids == r.token_ids
    assert engine.cache_stats("t")["pinned"] == 0
    engine.tree.check_integrity()


def _blocking_prefill(engine):
    """Make every prefill wait for ``gate`` so requests pile up deterministically."""
    gate = threading.Event()
    orig = engine.runtime.prefill

    def slow(*a, **k):
        gate.wait(10)
        return orig(*a, **k)

    engine.runtime.prefill = slow
    return gate


def test_queue_full_is_429_and_running_requests_complete(tiny_engine_factory):
    engine = tiny_engine_factory(scheduler=SchedulerConfig(max_running=1, max_waiting=2))
    gate = _blocking_prefill(engine)
    def wait_for(load: dict) -> None:
        deadline = time.monotonic() + 10
        while engine.scheduler.load() != load and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.scheduler.load() == load

    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(engine.chat, agent_request(0))]
        wait_for({"running": 1, "waiting": 0})  # admitted (and stuck in its prefill)
        running += [pool.submit(engine.chat, agent_request(i)) for i in (1, 2)]
        wait_for({"running": 1, "waiting": 2})
        with pytest.raises(OverloadedError) as e:
            engine.chat(agent_request(9))
        assert e.value.status == 429 and e.value.retry_after_s >= 1
        gate.set()
        assert all(f.result(timeout=30).completion_tokens > 0 for f in running)
    engine.tree.check_integrity()


def test_cancel_mid_prefill_and_mid_decode_releases_pins(tiny_engine_factory):
    engine = tiny_engine_factory(scheduler=SchedulerConfig(prefill_chunk=16))
    stop = threading.Event()
    steps = []
    orig = engine.runtime.prefill

    def counting(*a, **k):
        steps.append(1)
        if len(steps) == 3:
            stop.set()  # the client goes away during the third prefill chunk
        return orig(*a, **k)

    engine.runtime.prefill = counting
    r = engine.chat(agent_request(1), is_cancelled=stop.is_set)
    assert r.finish_reason == "cancelled" and r.completion_tokens == 0
    assert engine.cache_stats("t")["pinned"] == 0
    engine.runtime.prefill = orig
    seen: list[str] = []
    long = ChatRequest("t", [{"role": "user", "content": "Go."}], [], SamplingParams(max_tokens=40,
                                                                                     temperature=0.0))
    r = engine.chat(long, on_text=seen.append, is_cancelled=lambda: len(seen) >= 2)
    assert r.finish_reason == "cancelled" and r.completion_tokens < 40
    assert engine.cache_stats("t")["pinned"] == 0
    engine.tree.check_integrity()
    assert engine.chat(agent_request(2)).completion_tokens > 0  # still serving


def test_randomised_arrivals_finish_without_deadlock(tiny_engine_factory):
    engine = tiny_engine_factory(CacheConfig(cache_bytes=400_000),
                                 scheduler=SchedulerConfig(max_running=3, max_waiting=4, prefill_chunk=32))
    rng = random.Random(7)
    plan = [(rng.random() * 0.2, rng.randrange(6), rng.random() < 0.2) for _ in range(24)]
    outcomes: list[str] = []

    def client(delay: float, agent: int, cancel: bool) -> None:
        time.sleep(delay)
        t0 = time.monotonic()
        try:
            r = engine.chat(agent_request(agent, tenant=f"t{agent % 2}"),
                            is_cancelled=(lambda: time.monotonic() - t0 > 0.05) if cancel else None)
            outcomes.append(r.finish_reason)
        except OverloadedError:
            outcomes.append("rejected")

    threads = [threading.Thread(target=client, args=p) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock: a client never got an answer"
    assert len(outcomes) == len(plan)
    assert set(outcomes) <= {"stop", "length", "cancelled", "rejected"}
    assert engine.scheduler.load() == {"running": 0, "waiting": 0}
    for tenant in ("t0", "t1"):
        assert engine.cache_stats(tenant)["pinned"] == 0
    engine.tree.check_integrity()
    assert engine.tree.resident_bytes + engine.radix.resident_bytes <= 400_000


def test_sliced_prefill_is_bit_identical_to_one_prefill():
    """forward_steps: the same operations as forward, a few layers at a time."""
    from tests.tiny import tiny_runtime

    rt = tiny_runtime()
    ids, pos = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(3)), torch.arange(5, 45)
    whole, sliced = rt.new_kv(64), rt.new_kv(64)
    for kv in (whole, sliced):
        kv.zero_()
    with torch.inference_mode():
        rt.prefill(ids[:5], torch.arange(5), whole, 0)
        rt.prefill(ids[:5], torch.arange(5), sliced, 0)
        want = rt.prefill(ids, pos, whole, 5)
        steps = rt.prefill_steps(ids, pos, sliced, 5, 1)
        done = []
        while True:
            try:
                done.append(next(steps))
            except StopIteration as end:
                got = end.value
                break
    assert done == list(range(1, rt.arch.n_layers))
    assert torch.equal(got, want) and torch.equal(sliced, whole)


def _prompt_kv(engine, tenant):
    """The KV of ``tenant``'s first unit (the prompt's message; below it sits the
    kept reply, whose decode steps were batched with other streams on one engine)."""
    (node,) = [n for n in engine.tree.nodes(engine.namespace(tenant)) if n.depth == 1]
    return node.handle


def test_long_prefill_runs_in_slices_while_streams_decode(tiny_engine_factory):
    """With streams decoding, a chunk runs a few layers per tick with decode steps in
    between; its KV and answer are bit-identical to an idle engine's."""
    engine = tiny_engine_factory(scheduler=SchedulerConfig(prefill_chunk=64, decode_pause_s=1e-9))
    calls: list[tuple[float | None, bool, int]] = []
    runner = engine.scheduler.runner
    orig = runner.prefill

    def record(work, n, pause_s=None):
        orig(work, n, pause_s)
        calls.append((pause_s, work.slices is not None, engine.scheduler.steps))

    runner.prefill = record
    stream = threading.Thread(target=engine.chat, args=(ChatRequest(
        "s", [{"role": "user", "content": "Count."}],
        sampling=SamplingParams(max_tokens=1500, temperature=0.0)),))
    stream.start()
    while engine.scheduler.steps == 0:
        time.sleep(0.001)
    calls.clear()
    long = ChatRequest("t", [{"role": "user", "content": "other " * 300}], sampling=GREEDY)
    busy = engine.chat(long)
    stream.join()
    mid = [(p, steps) for p, mid_chunk, steps in calls if mid_chunk]
    assert mid and all(p is not None for p, _ in mid)  # sliced only while decoding
    assert len({steps for _, steps in mid}) == len(mid)  # a decode step between slices
    idle = tiny_engine_factory(scheduler=SchedulerConfig(prefill_chunk=64, decode_pause_s=1e9))
    alone = idle.chat(long)
    assert alone.token_ids == busy.token_ids
    assert torch.equal(_prompt_kv(engine, "t"), _prompt_kv(idle, "t"))
    engine.tree.check_integrity()


def test_only_the_tail_goes_through_the_lm_head(tiny_engine_factory):
    """Units are prefilled for their KV only; the logits come from the tail's last row."""
    engine = tiny_engine_factory(scheduler=SchedulerConfig(prefill_chunk=64))
    runtime = engine.runtime
    rows: list[int] = []

    prefill, prefill_steps = runtime.prefill, runtime.prefill_steps

    def counted(*args, **kwargs):
        logits = prefill(*args, **kwargs)
        rows.append(logits.shape[0])  # rows of logits this call computed
        return logits

    def counted_steps(*args, **kwargs):
        logits = yield from prefill_steps(*args, **kwargs)
        rows.append(logits.shape[0])
        return logits

    runtime.prefill, runtime.prefill_steps = counted, counted_steps
    r = engine.chat(agent_request(3))  # A (~1k tokens, 64-token chunks), B, D, the message, the tail
    assert len(r.segments) >= 4 and r.completion_tokens > 0
    assert len(rows) > 5 and sum(rows) == 1  # many chunks, one row of logits
