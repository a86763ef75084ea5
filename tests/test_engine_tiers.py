"""The engine over the cache tiers (tiny model, real disk, a real redis-server):
write-through, demotion, promotion with its tier in usage, restart, purge on every
tier, isolation, budgets, fingerprints, bad payloads, stats."""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch

from segcache.config import CacheConfig, SchedulerConfig
from segcache.engine.tiering import Loads, handle_of
from segcache.engine.types import ChatRequest, SamplingParams, SegmentInput
from segcache.kv.tiers import DiskTier, decode
from segcache.kv.tiers.buffers import MMAP_BYTES, BufferReserve
from segcache.kv.tiers.redis_tier import RedisTier
from tests.tier_helpers import Node

A = "Global rules: answer in English, cite files, never invent APIs. " * 12
B = "Backend agent: Python, SQL, migrations, pytest. " * 6
C = "Frontend agent: TypeScript, React, CSS, accessibility. " * 6
D = "Task: refactor the auth module into two files."
E = "Task: write docs for the login page."
USER = [{"role": "user", "content": "Start."}]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
AGENTS = [[("A", A), ("B", B), ("D", D)], [("A", A), ("C", C), ("E", E)], [("A", A), ("B", B), ("E", E)]]


def chat(engine, tenant, pairs, messages=USER):
    segs = [SegmentInput(id=i, content=c) for i, c in pairs]
    return engine.chat(ChatRequest(tenant, messages, segs, GREEDY))


def tiers_of(result) -> list[str | None]:
    return [u.tier for u in result.segments if u.kind == "segment"]


def disk_cfg(root: Path, **kw) -> CacheConfig:
    return CacheConfig(disk_cache_dir=root, **kw)


def settle(engine) -> None:
    """Wait until every queued tier write has landed (the writes run behind requests)."""
    engine.store.flush()


def check_budgets(engine) -> None:
    """Every tier within its budget, its index equal to its files; the tree consistent."""
    engine.tree.check_integrity()
    assert engine.tree.resident_bytes + engine.radix.resident_bytes <= engine.cache_cfg.cache_bytes
    for tier in engine.store.tiers:
        if isinstance(tier, DiskTier):
            tier.check_integrity()




def test_loads_are_issued_once_each_in_order_and_a_taken_one_is_gone():
    class Store:
        def __init__(self) -> None:
            self.fetched = []

        def fetch_async(self, expect):
            self.fetched.append(expect)
            done = Future()
            done.set_result(None)
            return done

    store, loads = Store(), Loads(2, ["u2", "u3", "u4", "u5", "u6"])  # what units 2..6 would be read as
    loads.issue(store, 2 + 3)
    assert store.fetched == ["u2", "u3", "u4"] and loads.covers(6) and not loads.covers(7)
    assert loads.take(2) is not None
    loads.issue(store, 3 + 3)  # the walk moved on: only the unit new to the window
    assert store.fetched == ["u2", "u3", "u4", "u5"]
    assert loads.take(2) is None  # taken: the caller computes it, nothing is read again
    loads.issue(store, 100)
    assert store.fetched == ["u2", "u3", "u4", "u5", "u6"]


def test_each_unit_is_read_from_disk_at_most_once_per_request(tiny_engine_factory, tmp_path):
    """The loads kept in flight ahead of the unit being computed are issued once per unit:
    a unit loaded (or found missing) is not read again when the walk moves on, nor in the
    second pass after the loads-only one (a disk hit used to read every unit twice)."""
    first = tiny_engine_factory(disk_cfg(tmp_path))
    cold = chat(first, "t", AGENTS[0])
    first.close()
    second = tiny_engine_factory(disk_cfg(tmp_path))
    for pairs, expect in ((AGENTS[0], ["disk"] * 3), ([("A", A), ("B", B), ("E", E)], ["ram", "ram", None])):
        before = second.store.stats()["disk"]
        r = chat(second, "t", pairs)
        after = second.store.stats()["disk"]
        assert tiers_of(r) == expect
        assert after.hits - before.hits == sum(u.tier == "disk" for u in r.segments)
        assert (after.hits + after.misses - before.hits - before.misses  # a lookup per unit not in RAM
                == sum(u.tier != "ram" for u in r.segments))
    assert chat(second, "t", AGENTS[0]).token_ids == cold.token_ids


def test_restart_on_the_same_disk_is_a_full_hit_from_disk_and_equals_cold(tiny_engine_factory, tmp_path):
    first = tiny_engine_factory(disk_cfg(tmp_path))
    cold = [chat(first, "t", a) for a in AGENTS]
    assert all(t is None or t == "ram" for r in cold for t in tiers_of(r))
    first.close()  # drains the queued writes
    assert first.store.stats()["store"]["publishes"] > 0
    second = tiny_engine_factory(disk_cfg(tmp_path))
    assert second.store.tiers[0].startup.entries >= 7  # A, B, C, D, E under A's chain, + messages
    for pairs, before in zip(AGENTS, cold, strict=True):
        r = chat(second, "t", pairs)
        assert r.token_ids == before.token_ids
        assert [u.status for u in r.segments if u.kind == "segment"] == ["hit"] * 3
    r = chat(tiny_engine_factory(disk_cfg(tmp_path)), "t", AGENTS[0])
    assert tiers_of(r) == ["disk"] * 3
    assert r.cached_tokens == sum(u.tokens for u in r.segments if u.kind == "segment") + \
        sum(u.tokens for u in r.segments if u.kind == "message" and u.status == "hit")
    assert r.segments[0].as_dict()["tier"] == "disk"
    check_budgets(second)


def test_eviction_demotes_and_a_miss_in_ram_promotes_back(tiny_engine_factory, tmp_path, monkeypatch):
    probe = tiny_engine_factory()
    chat(probe, "t", AGENTS[0])
    one = sum(n.nbytes for n in probe.tree.nodes())
    # RAM for about one agent's prompt: the next agents evict the earlier ones' nodes
    engine = tiny_engine_factory(disk_cfg(tmp_path, cache_bytes=one + 1000))
    # no write-through (as if every publish had been dropped): only demotion fills the disk
    monkeypatch.setattr(engine.tiers, "publish", lambda node, handle: None)
    first = chat(engine, "t", AGENTS[0])
    settle(engine)
    assert engine.store.tiers[0].stats().entries == 0
    for pairs in AGENTS[1:]:
        chat(engine, "t", pairs)
        settle(engine)
        check_budgets(engine)
    assert engine.tree.stats(max_depth=0).get("evictions", 0) > 0
    again = chat(engine, "t", AGENTS[0])
    assert again.token_ids == first.token_ids
    assert "disk" in tiers_of(again)
    stats = engine.cache_stats("t")["tiers"]
    assert stats["disk"]["hits"] >= 1 and stats["disk"]["entries"] > 0
    assert stats["store"]["demotions"] > 0 and stats["store"]["publishes"] == 0
    check_budgets(engine)
    assert engine.cache_stats("t")["pinned"] == 0


def test_the_disk_budget_holds_after_every_request(tiny_engine_factory, tmp_path):
    engine = tiny_engine_factory(disk_cfg(tmp_path, disk_bytes=400_000))
    for i in range(6):
        chat(engine, "t", [("X", f"Document number {i}: " + "words " * 40), ("D", D)])
        settle(engine)
        tier = engine.store.tiers[0]
        tier.check_integrity()
        assert tier.stats().bytes <= 400_000
    assert engine.store.tiers[0].stats().entries > 0


def test_purge_removes_a_tenants_entries_on_every_tier_and_only_theirs(tiny_engine_factory, tmp_path,
                                                                        redis_server):
    cfg = disk_cfg(tmp_path / "disk", redis_url=redis_server.url)
    engine = tiny_engine_factory(cfg)
    chat(engine, "alice", AGENTS[0])
    chat(engine, "bob", AGENTS[0])
    settle(engine)
    engine.purge("alice")
    fresh = tiny_engine_factory(cfg)  # RAM empty: anything it hits comes from a lower tier
    assert all(t is None for t in tiers_of(chat(fresh, "alice", AGENTS[0])))
    assert tiers_of(chat(fresh, "bob", AGENTS[0])) == ["disk"] * 3
    # alice's request above was computed again (and written through): purge it once more,
    # and Redis alone has no entry of alice's left, bob's all
    settle(fresh)
    fresh.purge("alice")
    fresh.close()
    shutil.rmtree(tmp_path / "disk")
    redis_only = tiny_engine_factory(CacheConfig(redis_url=redis_server.url))
    assert all(t is None for t in tiers_of(chat(redis_only, "alice", AGENTS[0])))
    assert tiers_of(chat(redis_only, "bob", AGENTS[0])) == ["redis"] * 3


def test_tenants_never_load_each_others_entries_on_any_tier(tiny_engine_factory, tmp_path, redis_server):
    cfg = disk_cfg(tmp_path, redis_url=redis_server.url)
    engine = tiny_engine_factory(cfg)
    chat(engine, "alice", AGENTS[0])
    settle(engine)
    other = tiny_engine_factory(cfg)
    r = chat(other, "mallory", AGENTS[0])
    assert r.cached_tokens == 0 and all(t is None for t in tiers_of(r))


def test_two_engines_share_kv_through_redis(tiny_engine_factory, tmp_path, redis_server):
    a = tiny_engine_factory(CacheConfig(redis_url=redis_server.url))
    b = tiny_engine_factory(CacheConfig(redis_url=redis_server.url))
    cold = tiny_engine_factory()
    ra = chat(a, "t", AGENTS[0])
    settle(a)
    rb = chat(b, "t", AGENTS[0])
    assert tiers_of(rb) == ["redis"] * 3
    assert rb.token_ids == ra.token_ids == chat(cold, "t", AGENTS[0]).token_ids
    assert b.cache_stats("t")["tiers"]["redis"]["hits"] >= 3


def test_a_changed_prefill_chunk_or_dtype_never_serves_old_entries(tiny_engine_factory, tmp_path):
    import torch

    from tests.tiny import tiny_runtime

    engine = tiny_engine_factory(disk_cfg(tmp_path))
    chat(engine, "t", AGENTS[0])
    engine.close()
    other_chunk = tiny_engine_factory(disk_cfg(tmp_path), scheduler=SchedulerConfig(prefill_chunk=64))
    assert other_chunk.fingerprint != engine.fingerprint
    assert all(t is None for t in tiers_of(chat(other_chunk, "t", AGENTS[0])))
    from segcache.engine.engine import Engine

    bf16 = Engine(tiny_runtime(torch.bfloat16), engine.tokenizer, disk_cfg(tmp_path), "tiny")
    try:
        assert bf16.fingerprint != engine.fingerprint
        assert all(t is None for t in tiers_of(chat(bf16, "t", AGENTS[0])))
    finally:
        bf16.close()
    same = tiny_engine_factory(disk_cfg(tmp_path))
    assert tiers_of(chat(same, "t", AGENTS[0])) == ["disk"] * 3


def sched_of(damage: str) -> SchedulerConfig:
    return SchedulerConfig(prefill_chunk=64) if damage == "other-fingerprint" else SchedulerConfig()


def _entry_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.safetensors"))


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "other-tenant", "other-fingerprint"])
def test_a_damaged_or_misplaced_file_is_recomputed_never_served(tiny_engine_factory, tmp_path, damage):
    engine = tiny_engine_factory(disk_cfg(tmp_path))
    cold = chat(engine, "t", [("A", A)])
    engine.close()
    (path,) = [p for p in _entry_files(tmp_path) if p.stat().st_size > 10_000]  # A's KV
    if damage == "corrupt":
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-1000])
    else:  # the same file under the key another tenant / fingerprint would read
        other = tiny_engine_factory(disk_cfg(tmp_path / "other"), scheduler=sched_of(damage))
        tenant = "mallory" if damage == "other-tenant" else "t"
        chat(other, tenant, [("A", A)])
        other.close()
        (target,) = [p for p in _entry_files(tmp_path / "other") if p.stat().st_size > 10_000]
        shutil.copy(path, target)
        engine, tmp_path = other, tmp_path / "other"
        cold = chat(tiny_engine_factory(scheduler=sched_of(damage)), tenant, [("A", A)])
    fresh = tiny_engine_factory(disk_cfg(tmp_path), scheduler=sched_of(damage))
    tenant = "mallory" if damage == "other-tenant" else "t"
    r = chat(fresh, tenant, [("A", A)])
    assert tiers_of(r) == [None] and r.token_ids == cold.token_ids
    disk = fresh.store.tiers[0]
    rejected = sum(disk.stats().rejected.values())
    assert rejected == 1  # counted, deleted (at start-up for a truncated file, else at get)
    settle(fresh)
    disk.check_integrity()


def test_stats_and_metrics_report_every_tier(tiny_engine_factory, tmp_path, redis_server):
    engine = tiny_engine_factory(disk_cfg(tmp_path, redis_url=redis_server.url))
    chat(engine, "t", AGENTS[0])
    settle(engine)
    tiers = engine.metrics()["tiers"]
    assert set(tiers) == {"disk", "redis", "store"}
    for name in ("disk", "redis"):
        assert {"bytes", "entries", "hits", "misses", "puts", "errors", "load_s", "rejected",
                "disabled"} <= set(tiers[name])
        assert tiers[name]["puts"] > 0
    assert tiers["disk"]["bytes"] > 0 and tiers["redis"]["bytes"] is None
    assert {"demotions", "publishes", "promotions"} <= set(tiers["store"])


def test_without_tiers_usage_says_ram_for_hits_and_none_for_misses(tiny_engine_factory):
    engine = tiny_engine_factory()
    assert engine.store is None
    assert tiers_of(chat(engine, "t", AGENTS[0])) == [None] * 3
    assert tiers_of(chat(engine, "t", AGENTS[2])) == ["ram", "ram", None]
    assert engine.cache_stats("t")["tiers"] == {}


def test_a_unit_missing_from_every_tier_is_computed_while_the_next_ones_load(tiny_engine_factory, tmp_path):
    first = tiny_engine_factory(disk_cfg(tmp_path))
    cold = chat(first, "t", AGENTS[0])
    first.close()
    a_node = first.tree.match(first.namespace("t"), [u.hash for u in cold.segments[:1]])[0]
    (tmp_path / a_node.namespace.split(":")[1] / (a_node.chain.split(":")[1] + ".safetensors")).unlink()
    engine = tiny_engine_factory(disk_cfg(tmp_path))
    events: list[str] = []
    fetch, prefill = engine.store.fetch_async, engine.scheduler.runner.prefill
    engine.store.fetch_async = lambda expect: events.append("load") or fetch(expect)
    engine.scheduler.runner.prefill = lambda *a, **kw: events.append("prefill") or prefill(*a, **kw)
    r = chat(engine, "t", AGENTS[0])
    assert tiers_of(r) == [None, "disk", "disk"]  # A computed; B and D (after A) loaded
    assert r.token_ids == cold.token_ids
    # the loads of the units after A were issued before A's prefill ran: they overlap it
    assert events.index("prefill") >= 3 and events[:3] == ["load"] * 3


def test_a_request_cancelled_while_its_kv_loads_releases_everything(tiny_engine_factory, tmp_path):
    from concurrent.futures import Future

    first = tiny_engine_factory(disk_cfg(tmp_path))
    chat(first, "t", AGENTS[0])
    first.close()
    engine = tiny_engine_factory(disk_cfg(tmp_path))
    pending: list[Future] = []

    def never_done(expect):
        pending.append(Future())  # a load that does not finish before the client goes
        return pending[-1]

    engine.store.fetch_async = never_done
    cancelled = {"now": False}
    segs = [SegmentInput(id=i, content=c) for i, c in AGENTS[0]]

    def cancel_when_waiting():
        while not pending:
            threading.Event().wait(0.01)
        cancelled["now"] = True

    threading.Thread(target=cancel_when_waiting, daemon=True).start()
    r = engine.chat(ChatRequest("t", USER, segs, GREEDY), is_cancelled=lambda: cancelled["now"])
    assert r.finish_reason == "cancelled"
    assert engine.cache_stats("t")["pinned"] == 0 and not engine._inflight
    engine.tree.check_integrity()


def test_the_next_turn_of_a_conversation_after_a_restart_equals_cold(tiny_engine_factory, tmp_path):
    engine = tiny_engine_factory(disk_cfg(tmp_path))
    turn1 = chat(engine, "t", AGENTS[1])
    engine.close()
    messages = USER + [{"role": "assistant", "content": turn1.text},
                       {"role": "user", "content": "And then?"}]
    warm = chat(tiny_engine_factory(disk_cfg(tmp_path)), "t", AGENTS[1], messages)
    cold = chat(tiny_engine_factory(), "t", AGENTS[1], messages)
    assert warm.token_ids == cold.token_ids
    assert tiers_of(warm) == ["disk"] * 3
    assert [u.tier for u in warm.segments if u.kind == "message"][0] == "disk"  # the first user turn


def test_the_start_up_log_names_the_tiers_without_a_redis_password(tmp_path, caplog):
    import logging

    from segcache.engine.tiering import build_store

    caplog.set_level(logging.INFO, logger="segcache.engine.tiering")
    store = build_store(CacheConfig(disk_cache_dir=tmp_path, redis_url="redis://:s3cret@127.0.0.1:9/0"),
                        "layout")
    try:
        assert [t.name for t in store.tiers] == ["disk", "redis"]
        assert "disk tier" in caplog.text and "redis://:***@127.0.0.1:9/0" in caplog.text
        assert "s3cret" not in caplog.text
    finally:
        store.close()


def test_tier_writes_run_behind_the_request_and_a_ram_hit_reads_no_tier(tiny_engine_factory, tmp_path):
    engine = tiny_engine_factory(disk_cfg(tmp_path))
    disk = engine.store.tiers[0]
    release = threading.Event()
    write = disk._write

    def stuck_write(*args):  # a disk that does not answer until released
        release.wait(60)
        return write(*args)

    disk._write = stuck_write
    try:
        first = chat(engine, "t", AGENTS[0])  # returns although no write has finished
        assert disk.stats().puts == 0
        fetches = []
        fetch = engine.store.fetch_async
        engine.store.fetch_async = lambda expect: fetches.append(expect) or fetch(expect)
        again = chat(engine, "t", AGENTS[0])  # everything in RAM: no lower tier is asked
        assert tiers_of(again) == ["ram"] * 3 and fetches == []
        assert again.token_ids == first.token_ids
    finally:
        release.set()
    settle(engine)
    assert disk.stats().puts > 0


def test_a_node_the_tree_already_holds_is_not_written_again(tiny_engine_factory, tmp_path):
    engine = tiny_engine_factory(disk_cfg(tmp_path))
    chat(engine, "t", AGENTS[0])
    settle(engine)
    publishes = engine.store.stats()["store"]["publishes"]
    chat(engine, "t", AGENTS[0])  # the same reply again: the kept reply's node exists already
    settle(engine)
    assert engine.store.stats()["store"]["publishes"] == publishes


def test_a_request_still_running_after_the_store_closed_computes_instead(tiny_engine_factory, tmp_path):
    first = tiny_engine_factory(disk_cfg(tmp_path))
    cold = chat(first, "t", AGENTS[0])
    first.close()
    engine = tiny_engine_factory(disk_cfg(tmp_path))
    engine.store.close()  # as at the end of a shutdown whose drain timed out
    r = chat(engine, "t", AGENTS[0])
    assert tiers_of(r) == [None] * 3 and r.token_ids == cold.token_ids
    assert engine.store.stats()["store"]["publishes"] == 0  # nothing queued that nobody writes


def test_redis_going_away_mid_run_never_fails_a_request_and_hits_resume(tiny_engine_factory, redis_server):
    a = tiny_engine_factory(CacheConfig(redis_url=redis_server.url))
    b = tiny_engine_factory(CacheConfig(redis_url=redis_server.url))
    chat(a, "t", AGENTS[0])
    settle(a)
    redis_server.stop()
    for pairs in AGENTS:  # RAM only now: every request still answers
        assert chat(b, "t", pairs).finish_reason in ("stop", "length")
    assert b.cache_stats("t")["tiers"]["redis"]["errors"] > 0
    redis_server.start()  # same port, its data back from the RDB it saved
    # b's client reconnects once its back-off window has passed: A's next new segment is a hit
    deadline, n = time.monotonic() + 60, 0
    while time.monotonic() < deadline:
        pairs = [("A", A), ("N", f"New task {n}: review the SQL migrations.")]
        chat(a, "t", pairs)
        settle(a)
        if tiers_of(chat(b, "t", pairs))[1] == "redis":
            break
        n, _ = n + 1, time.sleep(0.2)
    else:
        raise AssertionError("b never loaded from Redis again")


def test_exact_kv_from_a_tier_is_preferred_to_blending(tiny_engine_factory, tmp_path):
    y, x = ("y", B), ("x", C)
    first = tiny_engine_factory(disk_cfg(tmp_path))
    cold = chat(first, "t", [y, x])  # y then x: both on disk, exact
    first.close()
    engine = tiny_engine_factory(disk_cfg(tmp_path))
    anywhere = [SegmentInput(id="x", content=C, reuse="anywhere")]
    engine.chat(ChatRequest("t", USER, anywhere, GREEDY))  # x alone: its standalone entry in RAM
    deadline = time.monotonic() + 20
    while engine.cache_stats("t")["standalone"]["entries"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    segs = [SegmentInput(id="y", content=B), SegmentInput(id="x", content=C, reuse="anywhere")]
    r = engine.chat(ChatRequest("t", USER, segs, GREEDY))
    assert [(u.status, u.tier) for u in r.segments if u.kind == "segment"] == [("hit", "disk")] * 2
    assert r.token_ids == cold.token_ids


def test_a_full_disk_disables_the_tier_and_serving_goes_on(tiny_engine_factory, tmp_path, caplog):
    import errno
    import logging

    engine = tiny_engine_factory(disk_cfg(tmp_path))
    disk = engine.store.tiers[0]

    def full(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device")

    disk._write_file = full
    caplog.set_level(logging.WARNING, logger="segcache.kv.tiers")
    answers = [chat(engine, "t", pairs) for pairs in AGENTS]
    settle(engine)
    assert all(r.finish_reason in ("stop", "length") for r in answers)
    stats = engine.cache_stats("t")["tiers"]["disk"]
    assert stats["disabled"] and "ENOSPC" in stats["disabled_reason"] and stats["puts"] == 0
    assert caplog.text.count("disk tier disabled") == 1
    assert tiers_of(chat(engine, "t", AGENTS[0])) == ["ram"] * 3


def test_what_a_request_running_across_a_purge_inserts_is_never_written(tiny_engine_factory, tmp_path):
    from concurrent.futures import Future

    engine = tiny_engine_factory(disk_cfg(tmp_path))
    old_ns = engine.namespace("t")
    released, pending = threading.Event(), []

    def held_load(expect):  # loads that answer "miss" only once the purge is done
        f = Future()
        if released.is_set():
            f.set_result(None)
        pending.append(f)
        return f

    engine.store.fetch_async = held_load
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=chat(engine, "t", AGENTS[0])))
    worker.start()
    while not pending:
        time.sleep(0.01)
    engine.purge("t")  # the request is waiting for its first load, in the old namespace
    released.set()
    for f in list(pending):
        if not f.done():
            f.set_result(None)
    worker.join(60)
    assert result["r"].finish_reason in ("stop", "length")
    settle(engine)
    assert not list(tmp_path.glob(f"{old_ns.split(':')[1]}/*"))  # nothing of it on disk
    engine.store.tiers[0].check_integrity()
    assert engine.namespace("t") != old_ns


def test_after_a_purge_new_entries_survive_a_restart_and_old_ones_never_return(tiny_engine_factory,
                                                                                tmp_path):
    engine = tiny_engine_factory(disk_cfg(tmp_path))
    chat(engine, "t", AGENTS[0])
    settle(engine)
    engine.purge("t")  # the tenant's tree moves to generation 1; its disk entries are gone
    after = chat(engine, "t", AGENTS[1])
    engine.close()
    restarted = tiny_engine_factory(disk_cfg(tmp_path))  # generation 0 again
    again = chat(restarted, "t", AGENTS[1])
    assert tiers_of(again) == ["disk"] * 3 and again.token_ids == after.token_ids
    # A+B+D: only A was computed again after the purge; B and D after A never return
    assert tiers_of(chat(restarted, "t", AGENTS[0])) == ["ram", None, None]


def test_servers_sharing_redis_agree_on_a_tenant_whichever_purged(tiny_engine_factory, redis_server):
    a = tiny_engine_factory(CacheConfig(redis_url=redis_server.url))
    b = tiny_engine_factory(CacheConfig(redis_url=redis_server.url))
    chat(a, "t", AGENTS[0])
    settle(a)
    a.purge("t")  # on every tier: B, which never saw a purge, finds nothing either
    assert all(t is None for t in tiers_of(chat(b, "t", AGENTS[0])))
    chat(a, "t", AGENTS[1])  # A, now at generation 1, computes; B (generation 0) loads it
    settle(a)
    assert tiers_of(chat(b, "t", AGENTS[1])) == ["ram", "redis", "redis"]  # A+C+E; A was in B's RAM


@pytest.mark.parametrize("tier_name", ["disk", "redis"])
# 1.3 KB; 14 MB, past MMAP_BYTES (another buffer kind), into a fresh or a ready buffer
@pytest.mark.parametrize("n_tokens,ready", [(7, False), (300, False), (300, True)])
def test_a_loaded_nodes_tensor_is_the_buffer_the_tier_read_into(tmp_path, redis_server, tier_name,
                                                                 n_tokens, ready):
    """No copy between the tier's read and the node's KV: the tensor wraps the tier's
    buffer (a ready one, ``ready``), and keeps it alive once the hit is gone. Bytes a
    caller cannot write are copied."""
    big = n_tokens > 7
    node = Node("t", "doc", n_tokens=n_tokens, **({"n_layers": 30, "head_dim": 64} if big else {}))
    assert (len(node.payload) > MMAP_BYTES) == big
    tier = (DiskTier(tmp_path, 1 << 30) if tier_name == "disk"
            else RedisTier(redis_server.url, 60, 4 << 20 if big else 256))
    assert tier.put(node.key, node.payload)
    if ready:
        tier.buffers = BufferReserve(1, 16 << 20)
        tier.buffers.start()
        assert tier.buffers.wait_ready(30)
    hit = tier.get(node.expect)
    if ready:
        assert tier.buffers.counts["taken"] == 1
        tier.buffers.close()
    handle = handle_of(hit.kv)
    assert not memoryview(hit.kv.data).readonly
    assert handle.data_ptr() == np.frombuffer(hit.kv.data, dtype=np.uint8).ctypes.data
    del hit
    gc.collect()
    garbage = [bytearray(os.urandom(1 << 16)) for _ in range(64)]  # reuse any freed memory
    assert garbage and torch.equal(handle, torch.from_numpy(node.array))
    copied = handle_of(decode(node.payload, node.expect))  # from immutable bytes: a copy
    assert torch.equal(copied, handle) and copied.data_ptr() != np.frombuffer(node.payload, np.uint8).ctypes.data
    tier.close()


def test_kv_at_an_odd_address_is_copied_to_an_aligned_tensor():
    """A payload whose header is not padded to 8 bytes (another writer) leaves the tensor
    bytes unaligned: the node's tensor is then an aligned copy, with the same values."""
    node = Node("t", "doc", n_tokens=5)
    n = int.from_bytes(node.payload[:8], "little")
    odd = (n + 1).to_bytes(8, "little") + node.payload[8:8 + n] + b" " + node.payload[8 + n:]
    kv = decode(bytearray(odd), node.expect)
    assert np.frombuffer(kv.data, dtype=np.uint8).ctypes.data % 4 != 0
    handle = handle_of(kv)
    assert handle.data_ptr() % 4 == 0 and torch.equal(handle, torch.from_numpy(node.array))
