"""Cache controls, the segment registry, /metrics and the dashboard."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from segcache.kv.hashing import segment_digest
from tests.fakes import FakeEngine

USER = [{"role": "user", "content": "hi"}]
RULES = "global rules and tool schemas " * 10


@pytest.fixture
def engine():
    return FakeEngine()


def test_warm_then_chat_is_a_full_hit(base_url, client):
    segments = [{"id": "rules", "content": RULES}, {"id": "agent", "content": "backend agent"}]
    r = httpx.post(base_url + "/v1/cache/warm", json={"model": "m", "segments": segments})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cached_segments"] == 2 and body["root_hash"].startswith("sha256:")
    assert [s["id"] for s in body["segments"]] == ["rules", "agent"]

    by_hash = [{"id": s["id"], "hash": segment_digest(s["content"])} for s in segments]
    r = client.chat.completions.create(model="fake-model", messages=USER, extra_body={"segments": by_hash})
    assert r.usage.model_extra["cached_prefix_tokens"] == 52
    assert r.usage.model_extra["segcache"]["chain"] == body["root_hash"]


def test_warm_needs_segments(base_url):
    r = httpx.post(base_url + "/v1/cache/warm", json={"segments": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "segments"


def test_segment_registry(base_url, client):
    url = base_url + "/v1/segments/rules"
    assert httpx.get(url).status_code == 404
    r = httpx.put(url, json={"content": RULES, "ttl": 60})
    assert r.status_code == 200
    meta = r.json()
    assert meta["hash"] == segment_digest(RULES) and meta["expires_at"] is not None
    assert httpx.get(url).json()["hash"] == meta["hash"]

    ref = {"segments": [{"id": "rules", "name": "rules"}]}
    r = client.chat.completions.create(model="fake-model", messages=USER, extra_body=ref)
    assert r.usage.model_extra["segcache"]["segments"][0]["hash"] == meta["hash"]

    assert httpx.delete(url).json() == {"name": "rules", "deleted": True}
    err = httpx.delete(url)
    assert err.status_code == 404 and "'rules'" in err.json()["error"]["message"]
    r = httpx.post(base_url + "/v1/chat/completions", json={"messages": USER, **ref})
    assert r.status_code == 404

    r = httpx.put(url, json={"ttl": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "content"


def test_cache_stats_and_purge(base_url, client):
    segs = {"segments": [{"id": "a", "content": "aa"}, {"id": "b", "content": "bb"}]}
    client.chat.completions.create(model="fake-model", messages=USER, extra_body=segs)
    stats = httpx.get(base_url + "/v1/cache").json()
    assert stats["tenant"] == "local" and stats["nodes"] == 2
    assert httpx.delete(base_url + "/v1/cache").json() == {"purged_nodes": 2}
    assert httpx.get(base_url + "/v1/cache").json()["nodes"] == 0


def scrape(base_url: str) -> dict[str, float]:
    r = httpx.get(base_url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


def test_metrics_move(base_url, client, engine):
    before = scrape(base_url)
    assert before["segcache_cache_hit_ratio"] == 0.0
    segs = {"segments": [{"id": "a", "content": "one two three four"}]}
    for _ in range(2):
        client.chat.completions.create(model="fake-model", messages=USER, extra_body=segs)
    httpx.post(base_url + "/v1/chat/completions", json={"messages": USER, "n": 0})
    engine.evictions = 3
    m = scrape(base_url)
    route = "route=/v1/chat/completions"
    assert m[f"segcache_requests_total{{{route},status=200}}"] == 2
    assert m[f"segcache_requests_total{{{route},status=400}}"] == 1
    assert m["segcache_prompt_tokens_total"] == 12
    assert m["segcache_cached_tokens_total"] == 4
    assert m["segcache_computed_tokens_total"] == 8
    assert m["segcache_completion_tokens_total"] == 4
    assert m["segcache_cache_hit_ratio"] == pytest.approx(4 / 12)
    assert m["segcache_ttft_seconds_count"] == 2 and m["segcache_request_seconds_count"] == 2
    assert m["segcache_cache_nodes"] == 1 and m["segcache_cache_resident_bytes"] == 4000
    assert m["segcache_cache_evictions_total"] == 3 and m["segcache_cache_budget_bytes"] == 1e9


def test_metrics_count_refusals_before_routing(base_url):
    httpx.post(base_url + "/v1/completions", content=b"x" * (9 << 20))
    httpx.get(base_url + "/no/such/path")
    m = scrape(base_url)
    assert m["segcache_requests_total{route=/v1/completions,status=413}"] == 1
    assert m["segcache_requests_total{route=unmatched,status=404}"] == 1


def test_metrics_survive_a_failing_engine(base_url, engine):
    def broken() -> dict:
        raise RuntimeError("boom")

    engine.metrics = broken
    m = scrape(base_url)
    assert "segcache_cache_hit_ratio" in m and "segcache_cache_nodes" not in m


def test_dashboard(base_url):
    r = httpx.get(base_url + "/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "fake-model" in r.text and "resident_bytes" in r.text
