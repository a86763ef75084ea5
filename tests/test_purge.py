"""A purge purges: once ``DELETE /v1/cache`` returns, nothing of the tenant's
earlier requests is served from any structure (prefix tree, standalone blend
copies, radix tail, token-id memo, registry), even when requests or background
jobs were running at that moment and insert afterwards."""

from __future__ import annotations

import time

import httpx
import pytest

from segcache.config import CacheConfig, SchedulerConfig
from segcache.engine.types import (
    ChatRequest,
    NotFoundError,
    SamplingParams,
    SegmentInput,
    SegmentUnknownError,
)
from segcache.kv.hashing import segment_digest
from tests.server_harness import running_server

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
USER = [{"role": "user", "content": "Summarise the rules above."}]
X = "Rule one: every function has a docstring that says what it returns. " * 6
Y = "Rule two: tests name the behaviour they check, not the function. " * 5
BLEND = CacheConfig(blend_layer=0)


def idle(engine) -> None:
    end = time.monotonic() + 30
    while engine.scheduler.load() != {"running": 0, "waiting": 0}:
        assert time.monotonic() < end
        time.sleep(0.02)


def nothing_served(engine, tenant: str) -> None:
    """Every way back to the tenant's earlier content is a miss."""
    r = engine.chat(ChatRequest(tenant, USER, [SegmentInput("y", Y),
                                               SegmentInput("x", X, reuse="anywhere")], GREEDY))
    assert r.cached_tokens == 0 and r.blended_tokens == 0, r.segments
    assert {s.status for s in r.segments} == {"miss"}


def test_a_standalone_job_in_flight_at_the_purge_inserts_nothing_servable(tiny_engine_factory):
    engine = tiny_engine_factory(BLEND)
    orig = engine.runtime.unrope_keys
    purged = []

    def purge_between_prefill_and_insert(*a, **k):
        if not purged:  # DELETE /v1/cache lands while the background job computes
            purged.append(engine.purge("t"))
        return orig(*a, **k)

    engine.runtime.unrope_keys = purge_between_prefill_and_insert
    engine.chat(ChatRequest("t", USER, [SegmentInput("x", X, reuse="anywhere")], GREEDY))
    idle(engine)
    assert purged, "the background job never ran"
    engine.runtime.unrope_keys = orig
    assert engine.cache_stats("t")["standalone"]["entries"] == 0
    assert engine.residency.retired == set()  # what the job inserted late was swept when it ended
    nothing_served(engine, "t")
    engine.tree.check_integrity()


def test_a_chat_in_flight_at_the_purge_leaves_nothing_servable(tiny_engine_factory):
    engine = tiny_engine_factory(scheduler=SchedulerConfig(prefill_chunk=16))
    orig = engine.runtime.prefill
    calls = []

    def purge_midway(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            engine.purge("t")
        return orig(*a, **k)

    engine.runtime.prefill = purge_midway
    first = engine.chat(ChatRequest("t", USER, [SegmentInput("y", Y), SegmentInput("x", X)], GREEDY))
    engine.runtime.prefill = orig
    assert first.finish_reason in ("stop", "length")
    assert engine.cache_stats("t")["nodes"] == 0
    nothing_served(engine, "t")
    engine.tree.check_integrity()


def test_a_completion_in_flight_at_the_purge_leaves_nothing_servable(tiny_engine_factory):
    engine = tiny_engine_factory(scheduler=SchedulerConfig(prefill_chunk=16))
    orig = engine.runtime.prefill
    calls = []

    def purge_midway(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            engine.purge("t")
        return orig(*a, **k)

    prompt = "Once upon a time " * 10
    engine.runtime.prefill = purge_midway
    engine.complete("t", prompt, GREEDY)
    engine.runtime.prefill = orig
    again = engine.complete("t", prompt, GREEDY)
    assert again.cached_tokens == 0
    assert engine.cache_stats("t")["radix"]["nodes"] == 1  # only what ``again`` kept


def test_purge_forgets_hashes_and_names(tiny_engine_factory):
    engine = tiny_engine_factory()
    engine.put_segment("t", "doc", Y, None)
    engine.chat(ChatRequest("t", USER, [SegmentInput("x", X)], GREEDY))
    engine.purge("t")
    with pytest.raises(SegmentUnknownError):
        engine.chat(ChatRequest("t", USER, [SegmentInput("x", hash=segment_digest(X))], GREEDY))
    with pytest.raises(NotFoundError):
        engine.chat(ChatRequest("t", USER, [SegmentInput("d", name="doc")], GREEDY))


def test_repeat_cold_over_http_with_background_jobs_never_blends(tiny_engine_factory):
    """What ``bench repo-docs --repeat-cold`` does: purge before every request. No
    request may see anything of the ones before it, blended copies included."""
    engine = tiny_engine_factory(BLEND)
    with running_server(engine, cache_cfg=BLEND) as url:
        docs = [{"id": "x", "content": X, "reuse": "anywhere"},
                {"id": "y", "content": Y, "reuse": "anywhere"}]
        for order in (docs, docs[::-1], docs, docs[::-1]):
            assert httpx.delete(url + "/v1/cache").status_code == 200
            r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": USER, "segments": order, "max_tokens": 2, "temperature": 0})
            usage = r.json()["usage"]
            assert usage["segcache"]["blended_tokens"] == 0
            assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    idle(engine)


@pytest.mark.slow
def test_real_model_purge_with_a_blend_job_in_flight(real_engine):
    """On the real model: a chat whose marked segments are computed standalone in the
    background, a purge right after its answer (the job queued or running), and the
    next request sees nothing: no hit, no blend."""
    from segcache.engine.engine import Engine

    engine = Engine(real_engine.runtime, real_engine.tokenizer, CacheConfig(), "real")
    try:
        segs = [SegmentInput("x", X, reuse="anywhere"), SegmentInput("y", Y, reuse="anywhere")]
        cold = engine.chat(ChatRequest("p", USER, segs, GREEDY))
        engine.purge("p")
        idle(engine)
        again = engine.chat(ChatRequest("p", USER, segs[::-1], GREEDY))
        assert again.cached_tokens == 0 and again.blended_tokens == 0
        assert engine.cache_stats("p")["standalone"]["entries"] <= 2  # again's own, if done
        engine.purge("p")
        idle(engine)
        assert engine.chat(ChatRequest("p", USER, segs, GREEDY)).token_ids == cold.token_ids
    finally:
        engine.close(drain=False)
