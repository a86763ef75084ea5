"""The engine's cache path on the tiny model: seed 000's scenario, cached == cold,
isolation, fingerprints, eviction, TTL, warm, registry, bad input."""

from __future__ import annotations

import pytest
import torch

from segcache.config import CacheConfig
from segcache.engine.types import (
    ChatRequest,
    EngineError,
    NotFoundError,
    SamplingParams,
    SegmentInput,
    SegmentMismatchError,
    SegmentUnknownError,
)
from segcache.kv.hashing import segment_digest

A = "Global rules: answer in English, cite files, never invent APIs. " * 12
B = "Backend agent: Python, SQL, migrations, pytest. " * 6
C = "Frontend agent: TypeScript, React, CSS, accessibility. " * 6
D = "Task: refactor the auth module into two files."
E = "Task: write docs for the login page."
USER = [{"role": "user", "content": "Start."}]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def segs(*pairs: tuple[str, str]) -> list[SegmentInput]:
    return [SegmentInput(id=i, content=c) for i, c in pairs]


def seg_status(result) -> list[str]:
    """Statuses of the explicit segments (message units are reported too)."""
    return [u.status for u in result.segments if u.kind == "segment"]


def chat(engine, tenant, segments, messages=USER, sampling=GREEDY):
    return engine.chat(ChatRequest(tenant, messages, segments, sampling))


AGENTS = [segs(("A", A), ("B", B), ("D", D)), segs(("A", A), ("C", C), ("E", E)),
          segs(("A", A), ("B", B), ("E", E))]


def test_seed_scenario_cached_prefix_tokens(tiny_engine_factory):
    engine = tiny_engine_factory()
    r1, r2, r3 = (chat(engine, "t", s) for s in AGENTS)
    tok = {u.id: u.tokens for u in r1.segments + r2.segments if u.kind == "segment"}
    assert r1.cached_tokens == 0
    assert r2.cached_tokens == tok["A"]
    assert r3.cached_tokens == tok["A"] + tok["B"]
    assert seg_status(r3) == ["hit", "hit", "miss"]
    for s, first in zip(AGENTS, (r1, r2, r3), strict=True):
        again = chat(engine, "t", s)
        assert seg_status(again) == ["hit"] * 3
        assert again.cached_tokens == sum(u.tokens for u in again.segments)
        assert again.token_ids == first.token_ids
        assert again.chain == first.chain
    engine.tree.check_integrity()
    assert engine.cache_stats("t")["pinned"] == 0


def test_cached_equals_cold_for_every_hit_pattern(tiny_engine_factory):
    warm = tiny_engine_factory()
    for s in AGENTS:
        got = chat(warm, "t", s)
        cold = chat(tiny_engine_factory(), "t", s)
        assert got.token_ids == cold.token_ids
        assert got.prompt_tokens == cold.prompt_tokens


def test_tenants_are_isolated(tiny_engine_factory):
    engine = tiny_engine_factory()
    chat(engine, "tenant1", AGENTS[0])
    assert chat(engine, "tenant2", AGENTS[0]).cached_tokens == 0
    assert chat(engine, "tenant1", AGENTS[0]).cached_tokens > 0
    # a hash-only reference does not resolve across tenants either
    ref = [SegmentInput(id="A", hash=segment_digest(A))]
    with pytest.raises(SegmentUnknownError):
        chat(engine, "tenant3", ref)
    assert chat(engine, "tenant1", ref).segments[0].status == "hit"


def test_model_fingerprint_change_never_serves_old_kv(tokenizer):
    import torch

    from segcache.engine.engine import Engine
    from segcache.model.plan import ExecPlan
    from segcache.model.runtime import ModelRuntime
    from tests.tiny import TINY, tiny_state_dict

    sd = tiny_state_dict()
    f32 = ModelRuntime(TINY, sd, ExecPlan.dense(torch.float32), source_digest="w")
    bf16 = ModelRuntime(TINY, sd, ExecPlan.dense(torch.bfloat16), source_digest="w")
    assert f32.fingerprint != bf16.fingerprint
    engine = Engine(f32, tokenizer, CacheConfig(), "tiny")
    chat(engine, "t", AGENTS[0])
    # Same engine tree, other runtime: the namespace differs, so nothing matches.
    engine.runtime, engine.fingerprint = bf16, bf16.fingerprint
    assert chat(engine, "t", AGENTS[0]).cached_tokens == 0


def test_eviction_keeps_budget_and_outputs(tiny_engine_factory):
    probe = tiny_engine_factory()
    chat(probe, "t", AGENTS[0])
    one_path = probe.tree.resident_bytes
    engine = tiny_engine_factory(CacheConfig(cache_bytes=one_path))
    for s in AGENTS * 2:
        got = chat(engine, "t", s)
        assert engine.tree.resident_bytes <= one_path
        engine.tree.check_integrity()
        assert got.token_ids == chat(tiny_engine_factory(), "t", s).token_ids
    assert engine.metrics()["evictions"] > 0


def test_pinned_nodes_survive_eviction_during_request(tiny_engine_factory):
    engine = tiny_engine_factory(CacheConfig(cache_bytes=0))
    seen = []

    def spy():
        seen.append(engine.cache_stats("t")["pinned"])
        return False

    r = engine.chat(ChatRequest("t", USER, AGENTS[0], GREEDY), is_cancelled=spy)
    assert max(seen) == 4  # 3 segments + the message, pinned while decoding, though over budget
    assert r.completion_tokens > 0
    assert len(engine.tree) == 0  # evicted once released
    engine.tree.check_integrity()


def test_ttl_expiry_turns_hit_into_miss(tiny_engine_factory):
    now = [1000.0]
    engine = tiny_engine_factory(CacheConfig(default_ttl_s=30), clock=lambda: now[0])
    chat(engine, "t", AGENTS[0])
    now[0] += 10
    assert chat(engine, "t", AGENTS[0]).cached_tokens > 0  # a hit refreshes the TTL
    now[0] += 31
    assert chat(engine, "t", AGENTS[0]).cached_tokens == 0


def test_warm_then_full_hit(tiny_engine_factory):
    engine = tiny_engine_factory()
    w = engine.warm("t", AGENTS[0])
    assert w.cached_segments == 3 and w.root_hash.startswith("sha256:")
    r = chat(engine, "t", AGENTS[0])
    assert seg_status(r) == ["hit"] * 3
    assert r.prefix_chain == w.root_hash
    assert engine.warm("t", AGENTS[0]).segments[0].status == "hit"


def test_registry_put_reference_delete(tiny_engine_factory):
    engine = tiny_engine_factory()
    info = engine.put_segment("t", "global-rules", A, ttl_s=None)
    assert info["hash"] == segment_digest(A)
    by_name = [SegmentInput(id="A", name="global-rules")]
    first = chat(engine, "t", by_name)
    assert chat(engine, "t", segs(("A", A))).segments[0].status == "hit"
    assert first.segments[0].hash == segment_digest(A)
    with pytest.raises(NotFoundError):
        chat(engine, "other-tenant", by_name)
    engine.delete_segment("t", "global-rules")
    with pytest.raises(NotFoundError):
        chat(engine, "t", by_name)
    with pytest.raises(NotFoundError):
        engine.get_segment("t", "global-rules")
    with pytest.raises(EngineError):
        engine.put_segment("t", "bad name!", A, None)


@pytest.mark.parametrize("case", ["mismatch", "unknown", "malformed", "empty", "too_many"])
def test_bad_segments_rejected_and_cache_unchanged(tiny_engine_factory, case):
    engine = tiny_engine_factory(CacheConfig(max_segments=4))
    chat(engine, "t", AGENTS[0])
    before = engine.cache_stats("t")
    bad = {
        "mismatch": (SegmentMismatchError, [SegmentInput(id="x", content=A, hash=segment_digest(B))]),
        "unknown": (SegmentUnknownError, [SegmentInput(id="x", hash=segment_digest("never sent"))]),
        "malformed": (EngineError, [SegmentInput(id="x", content=A, hash="md5:abc")]),
        "empty": (EngineError, [SegmentInput(id="x")]),
        "too_many": (EngineError, segs(*[(str(i), f"s{i}") for i in range(5)])),
    }[case]
    with pytest.raises(bad[0]) as e:
        chat(engine, "t", AGENTS[0][:1] + bad[1])
    assert ("'x'" in e.value.message) or case == "too_many"
    after = engine.cache_stats("t")
    assert {k: after[k] for k in ("nodes", "bytes", "tokens")} == {k: before[k] for k in ("nodes", "bytes", "tokens")}
    engine.tree.check_integrity()


def test_error_midway_releases_pins(tiny_engine_factory):
    engine = tiny_engine_factory()
    chat(engine, "t", AGENTS[0])
    orig = engine.runtime.decode

    def boom(*a, **k):
        raise RuntimeError("injected")

    engine.runtime.decode = boom
    with pytest.raises(RuntimeError):
        chat(engine, "t", AGENTS[1], sampling=SamplingParams(max_tokens=5, temperature=0))
    engine.runtime.decode = orig
    assert engine.cache_stats("t")["pinned"] == 0
    engine.tree.check_integrity()
    assert chat(engine, "t", AGENTS[1]).cached_tokens > 0  # C, E were fully prefilled: kept


def test_purge(tiny_engine_factory):
    engine = tiny_engine_factory()
    chat(engine, "t", AGENTS[0])
    assert engine.purge("t") == 5  # 3 segments, the message, the kept reply
    assert chat(engine, "t", AGENTS[0]).cached_tokens == 0


def test_tenant_quota_bounds_each_tenant(tiny_engine_factory):
    probe = tiny_engine_factory()
    chat(probe, "t", AGENTS[0])
    one_path = probe.tree.resident_bytes
    engine = tiny_engine_factory(CacheConfig(tenant_quota_bytes=one_path))
    for s in AGENTS:
        chat(engine, "a", s)
        chat(engine, "b", s)
        for tenant in ("a", "b"):
            assert engine.tree.namespace_bytes(engine.namespace(tenant)) <= one_path
    # quotas are per tenant: both keep their most recent path
    assert chat(engine, "a", AGENTS[2]).cached_tokens > 0
    assert chat(engine, "b", AGENTS[2]).cached_tokens > 0
    engine.tree.check_integrity()


def test_request_kv_buffers_are_reused_without_changing_answers(tiny_engine_factory):
    """A finished request's KV buffer serves the next one (no fresh, page-faulting
    allocation); what was in it never leaks into the next answer."""
    engine = tiny_engine_factory()
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    first = ChatRequest("t", [{"role": "user", "content": "alpha beta gamma " * 40}], [], greedy)
    second = ChatRequest("u", [{"role": "user", "content": "Something shorter."}], [], greedy)
    engine.chat(first)
    ((buffer, _held),) = engine._kv_pool._free
    ptr = buffer.data_ptr()
    got = engine.chat(second)
    assert [b.data_ptr() for b, _ in engine._kv_pool._free] == [ptr]  # taken, used, given back
    assert got.token_ids == tiny_engine_factory().chat(second).token_ids
    engine.tree.check_integrity()


def test_a_kept_buffer_that_holds_the_matched_nodes_is_not_copied_into_again(tiny_engine_factory):
    """The pool hands a request the buffer that already holds the longest run of its
    matched nodes (same node objects, same handles), and _start copies only the rest;
    answers are a cold engine's. After a purge nothing is trusted."""
    engine = tiny_engine_factory()
    taken: list[int] = []
    take = engine._kv_pool.take

    def spy(capacity, nodes=()):
        kv, held = take(capacity, nodes)
        taken.append(held)
        return kv, held

    engine._kv_pool.take = spy
    q2 = [{"role": "user", "content": "And then?"}]
    for agent in AGENTS:  # sequential: one buffer, handed from each request to the next
        chat(engine, "t", agent)
    assert taken == [0, 1, 1]  # A was in it already
    for agent in AGENTS:
        got = chat(engine, "t", agent, q2)
        assert got.token_ids == chat(tiny_engine_factory(), "t", agent, q2).token_ids
    assert taken[3:] == [2, 1, 1]  # after A+B+E: A+B of A+B+D; then A
    again = chat(engine, "t", AGENTS[2], q2)  # the same request: its four units are held
    assert taken[-1] == 4 and again.token_ids == got.token_ids
    engine.purge("t")
    chat(engine, "t", AGENTS[0])
    assert taken[-1] == 0


def _resident_fraction(t: torch.Tensor) -> float:
    """Share of ``t``'s pages in RAM now (the "present" bit in /proc/self/pagemap)."""
    import os

    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    start, n = t.data_ptr(), t.numel() * t.element_size()
    first, last = start // page, (start + n - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first + 1) * 8), dtype="<u8")
    return float(((entries >> np.uint64(63)) & np.uint64(1)).mean())


def test_a_prepared_buffer_is_resident_and_serves_the_first_request(tiny_engine_factory):
    """``KVPool.prepare`` (what ``Engine.load`` does at start-up) leaves one buffer in
    the pool with its pages already in RAM (a fresh mapping's are faulted in only as they
    are written), and the first request that fits takes it instead of faulting a fresh one
    in; its answer is a cold engine's."""
    import mmap

    from segcache.engine.kv_pool import KVPool

    def new(n: int) -> torch.Tensor:  # a fresh anonymous mapping, 4 KB a token
        return torch.frombuffer(mmap.mmap(-1, n << 12), dtype=torch.uint8).view(n, 1 << 12)

    assert _resident_fraction(new(1024)) == 0.0
    pool = KVPool(new, 1 << 30)
    pool.prepare(1000)
    ((buffer, held),) = pool._free
    assert buffer.shape[0] == 1024 and held == [] and _resident_fraction(buffer) == 1.0

    engine = tiny_engine_factory()
    engine._kv_pool.prepare(1000)
    ((buffer, _),) = engine._kv_pool._free
    req = ChatRequest("t", [{"role": "user", "content": "alpha beta gamma " * 120}], [],
                      SamplingParams(max_tokens=6, temperature=0.0))
    got = engine.chat(req)
    assert [b.data_ptr() for b, _ in engine._kv_pool._free] == [buffer.data_ptr()]
    assert got.token_ids == tiny_engine_factory().chat(req).token_ids
