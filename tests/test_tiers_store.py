"""TieredStore: demotion to disk, a search in tier order, promotion, purge on every tier."""

from __future__ import annotations

import threading

import pytest

from segcache.kv.tiers import DiskTier, TieredStore
from segcache.kv.tiers.redis_tier import RedisTier
from tests.tier_helpers import LAYOUT, Node, RedisServer


@pytest.fixture
def server(tmp_path):
    srv = RedisServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def store(tmp_path, server):
    s = TieredStore([DiskTier(tmp_path / "disk", 1 << 20), RedisTier(server.url, ttl_s=600)], LAYOUT)
    yield s
    s.close()


def test_demote_writes_the_first_lower_tier_behind_the_caller(store):
    disk, redis_tier = store.tiers
    node = Node("t", "evicted from RAM", n_tokens=16)
    assert store.demote(node.key, node.kv, node.tokens)
    store.flush()
    assert disk.contains(node.key) and not redis_tier.contains(node.key)
    got = store.fetch(node.expect)
    assert got is not None and got.tier == "disk" and (got.kv.array() == node.array).all()
    assert store.demote(node.key, node.kv, node.tokens)  # held already: nothing written again
    store.flush()
    assert disk.stats().puts == 1
    assert store.stats()["store"]["demotions"] == 2


def test_a_redis_hit_is_promoted_to_disk(store):
    disk, redis_tier = store.tiers
    node = Node("t", "computed by another server", n_tokens=8)
    redis_tier.put(node.key, node.payload)
    got = store.fetch(node.expect)
    assert got is not None and got.tier == "redis" and (got.kv.array() == node.array).all()
    store.flush()
    assert disk.contains(node.key)
    assert store.fetch(node.expect).tier == "disk"
    assert store.stats()["store"]["promotions"] == 1
    assert store.fetch(Node("t", "never seen", seed=3).expect) is None


def test_publish_writes_every_tier_and_fetch_async_overlaps(store):
    node = Node("t", "inserted", n_tokens=8)
    assert store.publish(node.key, node.kv, node.tokens)
    store.flush()
    assert store.contains(node.key) == "disk"
    assert all(t.contains(node.key) for t in store.tiers)
    future = store.fetch_async(node.expect)
    got = future.result(timeout=10)
    assert got is not None and got.tier == "disk"


def test_a_rejected_entry_falls_through_to_the_next_tier(store):
    disk, _ = store.tiers
    node = Node("t", "doc", n_tokens=8)
    store.publish(node.key, node.kv, node.tokens)
    store.flush()
    path = disk.root / node.key.ns_hex / (node.key.chain_hex + ".safetensors")
    data = bytearray(path.read_bytes())
    data[-2] ^= 1
    path.write_bytes(bytes(data))
    got = store.fetch(node.expect)
    assert got is not None and got.tier == "redis"
    assert disk.stats().rejected == {"checksum": 1}
    store.flush()
    assert store.fetch(node.expect).tier == "disk"  # promoted again, intact


def test_purge_clears_every_tier_and_the_writes_queued_before_it(store):
    a, b = Node("tenant-a", "guide"), Node("tenant-b", "guide")
    store.publish(a.key, a.kv, a.tokens)
    store.publish(b.key, b.kv, b.tokens)
    store.flush()
    # A write of tenant A still queued (the encoder is held) when A is purged.
    late = Node("tenant-a", "late", seed=4)
    gate = threading.Event()
    real_write = store._write

    def held(*args):
        gate.wait(10)
        real_write(*args)

    store._write = held
    store.publish(late.key, late.kv, late.tokens)
    store.purge(a.ns)
    gate.set()
    store.flush()
    for tier in store.tiers:
        assert not tier.contains(a.key) and not tier.contains(late.key)
        assert tier.contains(b.key)
    assert store.fetch(a.expect) is None and store.fetch(late.expect) is None
    assert store.fetch(b.expect) is not None


def test_stats_report_every_tier(store):
    node = Node("t", "doc")
    store.publish(node.key, node.kv, node.tokens)
    store.flush()
    store.fetch(node.expect)
    store.fetch(Node("t", "missing", seed=9).expect)
    stats = store.stats()
    assert set(stats) == {"disk", "redis", "store"}
    assert (stats["disk"].hits, stats["disk"].misses, stats["disk"].entries) == (1, 1, 1)
    assert (stats["redis"].hits, stats["redis"].misses) == (0, 1)
    assert stats["store"]["publishes"] == 1


def test_a_store_without_redis_still_works_and_redis_down_never_raises(tmp_path, server):
    store = TieredStore([DiskTier(tmp_path / "d", 1 << 20), RedisTier(server.url, ttl_s=60, timeout_s=0.3)],
                        LAYOUT)
    node = Node("t", "x")
    server.stop()
    store.publish(node.key, node.kv, node.tokens)
    store.flush()
    got = store.fetch(node.expect)
    assert got is not None and got.tier == "disk"
    assert store.fetch(Node("t", "y", seed=1).expect) is None
    assert store.stats()["redis"].errors >= 1 and store.stats()["redis"].disabled
    store.close()
    server.start()


def test_a_slow_tier_makes_writes_drop_never_wait_or_pile_up(tmp_path):
    node = Node("t", "a", n_tokens=64)
    store = TieredStore([DiskTier(tmp_path / "d", 1 << 30)], LAYOUT, queue_bytes=3 * node.kv.nbytes)
    gate = threading.Event()
    real_write = store._write

    def stalled(*args):
        gate.wait(10)
        real_write(*args)

    store._write = stalled
    nodes = [Node("t", f"seg {i}", n_tokens=64, seed=i) for i in range(6)]
    queued = [store.demote(n.key, n.kv, n.tokens) for n in nodes]
    # A write counts against the bound until it is done: three fit, the rest drop.
    assert queued == [True] * 3 + [False] * 3
    assert store.stats()["store"]["dropped"] == len(nodes) - sum(queued)
    gate.set()
    store.flush()
    assert store.tiers[0].stats().entries == sum(queued)
    store.close()


def test_a_tier_queue_is_bounded_by_bytes(tmp_path):
    node = Node("t", "a", n_tokens=64)
    tier = DiskTier(tmp_path, 1 << 30, queue_bytes=2 * len(node.payload))
    gate = threading.Event()
    real_put = tier.put

    def stalled(*args):
        gate.wait(10)
        return real_put(*args)

    tier.put = stalled
    results = [tier.put_async(n.key, n.payload)
               for n in (Node("t", f"s{i}", n_tokens=64, seed=i) for i in range(5))]
    assert results == [True] * 2 + [False] * 3
    assert tier.stats().dropped == 5 - sum(results)
    gate.set()
    tier.flush()
    assert tier.stats().entries == sum(results)
    tier.close()
