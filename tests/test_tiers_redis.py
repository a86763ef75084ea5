"""The Redis tier against a real redis-server started on a free port."""

from __future__ import annotations

import json
import logging
import random
import time

import pytest
import redis

from segcache.kv.tiers.redis_bulk import read_values
from segcache.kv.tiers.redis_tier import DEFAULT_PREFIX, RedisTier
from tests.tier_helpers import FP_OTHER, Node


@pytest.fixture
def raw(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def _tier(redis_server, **kw) -> RedisTier:
    kw.setdefault("ttl_s", 600)
    return RedisTier(redis_server.url, **kw)


def _keys(raw) -> list[str]:
    return sorted(k.decode() for k in raw.scan_iter(match=f"{DEFAULT_PREFIX}:*"))


def test_two_clients_share_entries(redis_server):
    a_srv, b_srv = _tier(redis_server), _tier(redis_server)
    node = Node("tenant-a", "compliance guide", n_tokens=32)
    assert a_srv.put(node.key, node.payload)
    hit = b_srv.get(node.expect)
    assert hit is not None and (hit.kv.array() == node.array).all()
    assert b_srv.contains(node.key)
    assert (a_srv.stats().puts, b_srv.stats().hits) == (1, 1)
    assert b_srv.stats().bytes is None and b_srv.stats().load_s > 0


def test_a_large_value_is_chunked_with_a_ttl_on_every_key(redis_server, raw):
    tier = _tier(redis_server, ttl_s=120, chunk_bytes=64 << 10)
    node = Node("t", "big", n_tokens=2048)  # ~390 KB: 7 chunks
    tier.put(node.key, node.payload)
    keys = _keys(raw)
    n_chunks = -(-len(node.payload) // (64 << 10))
    assert len(keys) == 1 + n_chunks
    base = _base(node)
    assert base in keys and all(k.startswith(base) for k in keys)
    assert all(0 < raw.pttl(k) <= 120_000 for k in keys)
    assert max(raw.strlen(k) for k in keys) == 64 << 10
    hit = tier.get(node.expect)
    assert hit is not None and hit.payload == node.payload


def _base(node: Node) -> str:
    """The manifest key: prefix, namespace, fingerprint, chain."""
    fp_hex = node.key.fingerprint.split(":", 1)[1]
    return f"{DEFAULT_PREFIX}:{node.key.ns_hex}:{fp_hex}:{node.key.chain_hex}"


def test_entries_expire_with_their_ttl(redis_server):
    tier = _tier(redis_server, ttl_s=0.3)
    node = Node("t", "short-lived")
    tier.put(node.key, node.payload)
    assert tier.get(node.expect) is not None
    deadline = time.monotonic() + 10
    while tier.contains(node.key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tier.get(node.expect) is None


def test_a_rewrite_never_mixes_chunks_and_a_corrupted_chunk_is_rejected(redis_server, raw):
    tier = _tier(redis_server, chunk_bytes=4096)
    node = Node("t", "doc", n_tokens=256)
    base = _base(node)
    tier.put(node.key, node.payload)
    first = json.loads(raw.get(base))["nonce"]
    tier.put(node.key, node.payload)  # a second write: its own chunks, the manifest moves atomically
    nonce = json.loads(raw.get(base))["nonce"]
    assert nonce != first and tier.get(node.expect).payload == node.payload
    chunk = f"{base}:{nonce}:2"
    data = bytearray(raw.get(chunk))
    data[100] ^= 0xFF
    raw.set(chunk, bytes(data), keepttl=True)
    assert tier.get(node.expect) is None and tier.stats().rejected == {"checksum": 1}
    assert not tier.contains(node.key) and not [k for k in _keys(raw) if k.startswith(base)]


def test_tenant_isolation_and_purge_by_scan(redis_server, raw):
    tier = _tier(redis_server)
    a1, a2 = Node("tenant-a", "guide"), Node("tenant-a", "other", seed=1)
    b1 = Node("tenant-b", "guide")
    other_fp = Node("tenant-a", "guide", fp=FP_OTHER)
    for n in (a1, a2, b1):
        tier.put(n.key, n.payload)
    # B's keys never name A's entries, and A's payload stored under B's key is refused.
    assert tier.get(Node("tenant-b", "other", seed=1).expect) is None
    tier.put(other_fp.key, a1.payload)
    assert tier.get(other_fp.expect) is None and tier.stats().rejected == {"namespace": 1}
    assert tier.get(b1.expect) is not None
    tier.delete_namespace(a1.ns)
    assert not [k for k in _keys(raw) if a1.key.ns_hex in k]
    assert tier.get(a1.expect) is None and tier.get(a2.expect) is None
    assert tier.get(b1.expect) is not None


def test_redis_going_away_is_counted_logged_once_and_hits_resume(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="segcache.kv.tiers")
    tier = _tier(redis_server, timeout_s=0.5, backoff_s=(0.2, 0.4))
    before = Node("t", "written before the outage")
    during = Node("t", "written during the outage", seed=1)
    tier.put(before.key, before.payload)
    redis_server.stop()
    t0 = time.monotonic()
    results = [tier.get(before.expect) for _ in range(20)] + [tier.put(during.key, during.payload)]
    assert time.monotonic() - t0 < 10  # back-off: the calls do not each wait on the network
    assert results == [None] * 20 + [False]
    s = tier.stats()
    assert s.disabled and "unreachable" in s.disabled_reason
    assert 1 <= s.errors <= 3 and s.misses == 20 and s.dropped == 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

    redis_server.start()  # same port, same data (SHUTDOWN SAVE)
    deadline = time.monotonic() + 15
    hit = None
    while hit is None and time.monotonic() < deadline:
        hit = tier.get(before.expect)
        time.sleep(0.05)
    assert hit is not None and (hit.kv.array() == before.array).all()
    assert not tier.stats().disabled
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert tier.put(during.key, during.payload) and tier.get(during.expect) is not None
    tier.close()


def test_an_unreachable_url_from_the_start_only_misses(tmp_path):
    from tests.tier_helpers import free_port

    tier = RedisTier(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60, timeout_s=0.2)
    node = Node("t", "x")
    assert tier.get(node.expect) is None and not tier.put(node.key, node.payload)
    assert not tier.contains(node.key)
    tier.delete_namespace(node.ns)
    assert tier.stats().errors == 1 and tier.stats().disabled


def _pool_idle(client: redis.Redis) -> bool:
    return not client.connection_pool._in_use_connections


def test_values_are_read_straight_into_one_buffer_and_the_connection_stays_clean(redis_server, raw):
    rng = random.Random(7)
    values = [rng.randbytes(n) for n in (0, 1, 5 << 20, 3, 70_000, 2 << 20)]  # > any socket buffer
    keys = [f"bulk:{i}" for i in range(len(values))]
    for k, v in zip(keys, values, strict=True):
        raw.set(k, v)
    client = redis.Redis.from_url(redis_server.url, protocol=2)
    for _ in range(3):  # the same connection again and again: nothing left unread on it
        out = read_values(client, keys)
        assert not out.readonly and bytes(out) == b"".join(values)
        assert read_values(client, keys[::-1]) == b"".join(values[::-1])
        assert read_values(client, [*keys[:2], "bulk:none", keys[2]]) is None
        assert client.ping() and _pool_idle(client)
    client.close()


def test_a_reply_that_is_not_a_value_raises_and_drops_the_connection(redis_server, raw):
    raw.set("bulk:a", b"x" * 100_000)
    raw.rpush("bulk:list", "not a string")
    client = redis.Redis.from_url(redis_server.url, protocol=2)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        read_values(client, ["bulk:a", "bulk:list"])  # fails after the first value's size
    assert _pool_idle(client) and client.get("bulk:a") == b"x" * 100_000  # a fresh connection
    assert bytes(read_values(client, ["bulk:a"])) == b"x" * 100_000
    client.close()


def test_a_stalled_redis_times_out_and_the_tier_misses(redis_server, raw):
    tier = _tier(redis_server, timeout_s=0.3, backoff_s=(0.05, 0.05))
    node = Node("t", "doc", n_tokens=64)
    tier.put(node.key, node.payload)
    keys = [k for k in _keys(raw) if k != _base(node)]
    raw.execute_command("CLIENT", "PAUSE", 1500, "ALL")  # every command waits 1.5 s
    with pytest.raises(redis.TimeoutError):
        read_values(tier._client, keys)
    assert _pool_idle(tier._client)
    time.sleep(1.6)
    hit = tier.get(node.expect)
    assert hit is not None and hit.payload == node.payload
    tier.close()


def test_a_resp3_url_reads_through_the_pipeline_and_gets_the_same_bytes(redis_server):
    tier3 = RedisTier(redis_server.url + "?protocol=3", ttl_s=600, chunk_bytes=4096)
    tier2 = _tier(redis_server, chunk_bytes=4096)
    node = Node("t", "doc", n_tokens=300)
    assert tier2.put(node.key, node.payload)
    for tier in (tier2, tier3):
        hit = tier.get(node.expect)
        assert hit is not None and hit.payload == node.payload and not memoryview(hit.kv.data).readonly
    assert tier3._client.connection_pool.connection_kwargs["protocol"] == 3
    tier2.close()
    tier3.close()
