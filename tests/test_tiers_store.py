"""TieredStore: demotion to disk, a search in tier order, promotion, purge on every tier."""

from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from segcache.kv.tiers import DiskTier, TieredStore
from segcache.kv.tiers.redis_tier import RedisTier
from tests.tier_helpers import LAYOUT, Node, RedisServer


@pytest.fixture
def store(tmp_path, redis_server):
    s = TieredStore([DiskTier(tmp_path / "disk", 1 << 20), RedisTier(redis_server.url, ttl_s=600)], LAYOUT)
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


def test_a_store_without_redis_still_works_and_redis_down_never_raises(tmp_path, redis_server):
    store = TieredStore([DiskTier(tmp_path / "d", 1 << 20), RedisTier(redis_server.url, ttl_s=60, timeout_s=0.3)],
                        LAYOUT)
    node = Node("t", "x")
    redis_server.stop()
    store.publish(node.key, node.kv, node.tokens)
    store.flush()
    got = store.fetch(node.expect)
    assert got is not None and got.tier == "disk"
    assert store.fetch(Node("t", "y", seed=1).expect) is None
    assert store.stats()["redis"].errors >= 1 and store.stats()["redis"].disabled
    store.close()
    redis_server.start()


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


# ---------------------------------------------------------------- state machine

_TENANTS = ("tenant-a", "tenant-b")
_NODES = [Node(t, f"seg {i}", n_tokens=1 + (i * 7) % 13, seed=i) for t in _TENANTS for i in range(5)]
_SHARED: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _machine_redis(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis-sm"))
    srv.start()
    _SHARED["server"] = srv
    yield
    srv.stop()


class StoreMachine(RuleBasedStateMachine):
    """demote / publish / fetch (promote) / purge / disk restart in any order, disk + Redis:
    a fetch serves exactly the node asked for or nothing, a purged tenant's entry never
    comes back, and the disk index matches its files within budget."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="segcache-store-sm-"))
        self.prefix = f"sm-{uuid.uuid4().hex}"  # this run's keys in the shared redis-server
        self.budget = 3 * len(_NODES[0].payload)
        self.store = self._open()
        self.gone = {n.key.chain for n in _NODES}  # may not be served
        self.written: set[str] = set()  # published: on Redis whatever the disk evicts

    def _open(self) -> TieredStore:
        url = _SHARED["server"].url
        return TieredStore([DiskTier(self.root, self.budget, fsync=False),
                            RedisTier(url, ttl_s=600, chunk_bytes=1024, prefix=self.prefix)], LAYOUT)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)

    @rule(i=st.integers(0, len(_NODES) - 1))
    def demote(self, i):
        node = _NODES[i]
        self.store.demote(node.key, node.kv, node.tokens)
        self.store.flush()
        self.gone.discard(node.key.chain)

    @rule(i=st.integers(0, len(_NODES) - 1))
    def publish(self, i):
        node = _NODES[i]
        self.store.publish(node.key, node.kv, node.tokens)
        self.store.flush()
        self.gone.discard(node.key.chain)
        self.written.add(node.key.chain)

    @rule(i=st.integers(0, len(_NODES) - 1))
    def fetch(self, i):
        node = _NODES[i]
        got = self.store.fetch(node.expect)
        self.store.flush()
        if got is None:
            assert node.key.chain not in self.written or node.key.chain in self.gone
            return
        assert node.key.chain not in self.gone
        assert (got.kv.array() == node.array).all()
        if got.tier == "redis" and len(node.payload) <= self.budget:  # promoted to disk
            assert self.store.tiers[0].contains(node.key)

    @rule(t=st.sampled_from(_TENANTS))
    def purge(self, t):
        ns = Node(t, "x").ns
        self.store.purge(ns)
        dropped = {n.key.chain for n in _NODES if n.key.namespace == ns}
        self.gone |= dropped
        self.written -= dropped

    @rule()
    def restart_disk(self):
        self.store.close()
        self.store = self._open()

    @invariant()
    def disk_index_matches_files_within_budget(self):
        disk = self.store.tiers[0]
        disk.check_integrity()
        assert disk.stats().bytes <= self.budget
        assert sum(s.errors for s in self.store.stats().values() if hasattr(s, "errors")) == 0


StoreMachine.TestCase.settings = settings(max_examples=20, stateful_step_count=25, deadline=None)
TestStoreMachine = StoreMachine.TestCase
