"""Memory: after thousands of distinct, rejected and registered inputs from several
tenants, the process grew by no more than the configured bounds (KV budget, memo,
registry, request buffer pool) plus a stated allowance for the interpreter.

Before the memo and the registry were bounded, each rejected 100 kB segment kept
~1.4 MB of token ids for good: the 200 below alone would have grown the process by
~280 MB. ``SEGCACHE_LONG_TESTS=1`` sends five times as many inputs."""

from __future__ import annotations

import os
import random

from starlette.testclient import TestClient

from segcache.config import CacheConfig, ServerConfig, read_environment
from segcache.engine.kv_pool import KV_POOL_BYTES
from segcache.server import create_app

LONG = read_environment().long_tests  # SEGCACHE_LONG_TESTS=1
SCALE = 5 if LONG else 1
ALLOWANCE = 96 << 20  # interpreter, allocator slack, tokenizer buffers


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_rss_stays_within_the_configured_bounds(tiny_engine_factory, tmp_path):
    import json

    keys = tmp_path / "keys.json"
    tenants = [f"t{i}" for i in range(4)]
    keys.write_text(json.dumps({"keys": {f"sk-{t}": t for t in tenants}}))
    cache = CacheConfig(cache_bytes=16 << 20, memo_bytes=8 << 20, tenant_memo_bytes=2 << 20,
                        registry_bytes=8 << 20, tenant_registry_bytes=2 << 20,
                        tenant_registry_entries=200)
    engine = tiny_engine_factory(cache)
    app = create_app(engine, ServerConfig(api_keys_file=keys, max_request_bytes=1 << 20), cache)
    rng = random.Random(7)
    sent = {"chats": 0, "rejected": 0, "registered": 0, "refused_registrations": 0}
    with TestClient(app, raise_server_exceptions=False) as client:
        def post(tenant, path, body, method="POST"):
            return client.request(method, path, json=body,
                                  headers={"authorization": f"Bearer sk-{tenant}"})

        post("t0", "/v1/chat/completions", {"messages": [{"role": "user", "content": "warm up"}],
                                            "max_tokens": 1})
        base = rss_bytes()
        for i in range(1000 * SCALE):  # distinct chats, each a new segment
            t = tenants[i % 4]
            seg = [{"id": "s", "content": f"document {i} " + "word " * rng.randrange(5, 200)}]
            r = post(t, "/v1/chat/completions", {"messages": [{"role": "user", "content": f"q{i}"}],
                                                 "segments": seg, "max_tokens": 1})
            assert r.status_code == 200, r.text
            sent["chats"] += 1
        for i in range(200 * SCALE):  # rejected: too long for the context window, tokenized
            t = tenants[i % 4]
            big = f"{i} " + "lorem ipsum dolor sit amet " * 3700  # ~100 kB, ~30k tokens
            r = post(t, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                 "segments": [{"id": "big", "content": big}]})
            assert r.status_code == 400, r.text
            sent["rejected"] += 1
        for i in range(1000 * SCALE):  # registered until each tenant's quota says 413
            t = tenants[i % 4]
            r = post(t, f"/v1/segments/n{i}", {"content": "entry " * 400 + str(i)}, "PUT")
            assert r.status_code in (200, 413), r.text
            sent["registered" if r.status_code == 200 else "refused_registrations"] += 1
        grown = rss_bytes() - base
    pool = sum(kv.numel() * kv.element_size() for kv, _ in engine._kv_pool._free)
    assert pool <= KV_POOL_BYTES
    bound = cache.cache_bytes + cache.memo_bytes + cache.registry_bytes + pool + ALLOWANCE
    print(f"\nmemory: {sent}, RSS grew {grown / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB")
    assert sent["refused_registrations"] > 0  # the quota was reached
    assert engine.memo.bytes <= cache.memo_bytes and engine.registry.bytes <= cache.registry_bytes
    assert grown < bound, (grown, bound)
