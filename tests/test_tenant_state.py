"""State beside the KV that grows with input (the token-id memo, the named
segment registry) is bounded in bytes per tenant and in all, and a purge frees
all of a tenant's state."""

from __future__ import annotations

import httpx
import pytest

from segcache.config import CacheConfig, ServerConfig
from segcache.engine.prompt import TokenMemo, ids_bytes
from segcache.engine.types import ChatRequest, ContextOverflowError, SamplingParams, SegmentInput
from segcache.kv.registry import RegistryFull, SegmentRegistry, entry_bytes
from tests.server_harness import running_server

GREEDY = SamplingParams(max_tokens=1, temperature=0.0)
USER = [{"role": "user", "content": "hi"}]


def test_memo_is_bounded_in_bytes_per_tenant_and_in_all(tokenizer):
    memo = TokenMemo(tokenizer, max_bytes=20_000, tenant_max_bytes=8_000)
    for i in range(300):
        for ns in ("a", "b", "c"):
            memo.ids_for(ns, f"document {i} " * 5, f"d{i}")
            assert memo.tenant_bytes(ns) <= 8_000
            assert memo.bytes <= 20_000
    assert memo.bytes == sum(memo.tenant_bytes(ns) for ns in "abc")
    assert memo.known_ids("c", "d299") is not None  # most recent kept
    assert memo.known_ids("a", "d0") is None  # oldest out


def test_memo_keeps_nothing_too_long_for_the_context_and_forget_frees_a_tenant(tokenizer):
    memo = TokenMemo(tokenizer, max_tokens=50)
    long = memo.ids_for("a", "word " * 200, "long")
    assert len(long) > 50 and memo.known_ids("a", "long") is None and memo.bytes == 0
    memo.ids_for("a", "short", "s")
    memo.ids_for("b", "short", "s")
    memo.forget("a")
    assert memo.known_ids("a", "s") is None and memo.tenant_bytes("a") == 0
    assert memo.known_ids("b", "s") is not None
    assert memo.bytes == ids_bytes(len(memo.known_ids("b", "s")))


def test_memo_is_per_tenant(tokenizer):
    """Content one tenant sent is not known (nor tokenized faster) for another."""
    memo = TokenMemo(tokenizer)
    memo.ids_for("a", "shared text", "h")
    assert memo.known_ids("b", "h") is None


def test_registry_bounds_entries_and_bytes_per_tenant_and_in_all():
    reg = SegmentRegistry(max_bytes=entry_bytes("x" * 1000) * 5, tenant_max_bytes=entry_bytes("x" * 1000) * 3,
                          tenant_max_entries=4)
    for i in range(3):
        reg.put("a", f"n{i}", "x" * 1000, "d")
    with pytest.raises(RegistryFull, match="over its limit"):
        reg.put("a", "n3", "x" * 1000, "d")
    reg.put("a", "n0", "y" * 1000, "d")  # replacing frees the old entry first
    for i in range(4):
        reg.put("b", f"s{i}", "s", "d")
    with pytest.raises(RegistryFull, match="registered segments, the limit is 4"):
        reg.put("b", "s4", "s", "d")
    reg.put("c", "big", "x" * 1000, "d")
    with pytest.raises(RegistryFull, match="registry is full"):
        reg.put("c", "big2", "x" * 1000, "d")
    assert reg.bytes == reg.tenant_bytes("a") + reg.tenant_bytes("b") + reg.tenant_bytes("c")
    assert reg.purge("a") == 3 and reg.tenant_bytes("a") == 0
    reg.put("c", "big2", "x" * 1000, "d")  # room again


def test_registry_expired_entries_free_their_room():
    now = [0.0]
    reg = SegmentRegistry(lambda: now[0], tenant_max_entries=1)
    reg.put("a", "n", "x", "d", ttl_s=5)
    now[0] = 10
    reg.put("a", "m", "x", "d")
    assert reg.names("a") == ["m"]


def test_refused_long_segments_leave_no_token_ids(tiny_engine_factory):
    engine = tiny_engine_factory()
    ns = engine.namespace("t")
    for i in range(5):
        huge = f"{i} " + "lorem ipsum dolor sit amet " * 500  # past the tiny model's 2048
        with pytest.raises(ContextOverflowError):
            engine.chat(ChatRequest("t", USER, [SegmentInput(f"s{i}", content=huge)], GREEDY))
    assert engine.memo.tenant_bytes(ns) < 10_000  # the short template bits only, if any


def test_purge_frees_all_of_a_tenants_state(tiny_engine_factory):
    engine = tiny_engine_factory()
    engine.put_segment("t", "doc", "some registered text", None)
    engine.put_segment("u", "doc", "other tenant's text", None)
    engine.chat(ChatRequest("t", USER, [SegmentInput("s", content="cached segment")], GREEDY))
    ns = engine.namespace("t")
    assert engine.memo.tenant_bytes(ns) > 0 and engine.registry.tenant_bytes("t") > 0
    engine.purge("t")
    assert engine.memo.tenant_bytes(ns) == 0
    assert engine.registry.names("t") == [] and engine.registry.tenant_bytes("t") == 0
    assert engine.cache_stats("t")["nodes"] == 0
    assert engine.registry.names("u") == ["doc"]  # another tenant's state is untouched


@pytest.fixture
def small_registry_server(tiny_engine_factory):
    cache = CacheConfig(tenant_registry_bytes=64_000, tenant_registry_entries=3)
    engine = tiny_engine_factory(cache)
    with running_server(engine, ServerConfig(), cache) as url:
        yield url


def test_registry_limit_is_413_over_http_and_purge_frees_it(small_registry_server):
    url = small_registry_server + "/v1/segments/"
    for i in range(3):
        assert httpx.put(url + f"n{i}", json={"content": f"text {i}"}).status_code == 200
    r = httpx.put(url + "n3", json={"content": "one more"})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "quota_exceeded" and "delete some first" in err["message"]
    r = httpx.put(url + "big", json={"content": "x" * 70_000})
    assert r.status_code == 413
    assert httpx.delete(small_registry_server + "/v1/cache").status_code == 200
    assert httpx.get(url + "n0").status_code == 404  # purged with the tenant's cache
    assert httpx.put(url + "n3", json={"content": "one more"}).status_code == 200
