"""Tenant isolation on every endpoint: what one API key's tenant sent, cached,
registered or purged is invisible to and untouched by another; and a timing
audit: cross-tenant "would-be hits" take as long as misses (two-sample KS finds
no difference) while within one tenant hits are told apart from misses."""

from __future__ import annotations

import dataclasses
import json
import math

import httpx
import pytest

from segcache.config import CacheConfig, ServerConfig
from segcache.engine.types import ChatRequest, SamplingParams, SegmentInput
from segcache.kv.hashing import segment_digest
from tests.server_harness import running_server

DOC = "Rule one: every function has a docstring that says what it returns. " * 8
USER = [{"role": "user", "content": "Summarise."}]


@pytest.fixture
def two(tiny_engine_factory, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": {"sk-a": "a", "sk-b": "b"}, "admin_keys": ["sk-ops"]}))
    cache = CacheConfig(blend_layer=0)
    engine = tiny_engine_factory(cache)
    with running_server(engine, ServerConfig(api_keys_file=keys), cache) as url:
        yield url, engine


def call(url: str, key: str, method: str, path: str, body=None) -> httpx.Response:
    return httpx.request(method, url + path, json=body, timeout=60,
                         headers={"authorization": f"Bearer {key}"})


def chat(url, key, segments, messages=USER):
    return call(url, key, "POST", "/v1/chat/completions",
                {"messages": messages, "segments": segments, "max_tokens": 2, "temperature": 0})


def test_every_endpoint_is_scoped_to_the_tenant(two):
    url, engine = two
    seg = [{"id": "doc", "content": DOC, "reuse": "anywhere"}]
    # a: chat, completion, warm, registry, all of it cached
    assert chat(url, "sk-a", seg).status_code == 200
    assert call(url, "sk-a", "POST", "/v1/completions",
                {"prompt": "Once upon a time", "max_tokens": 2}).status_code == 200
    assert call(url, "sk-a", "POST", "/v1/cache/warm",
                {"segments": [{"id": "w", "content": "warm text"}]}).status_code == 200
    assert call(url, "sk-a", "PUT", "/v1/segments/secret", {"content": "a's notes"}).status_code == 200
    a_stats = call(url, "sk-a", "GET", "/v1/cache").json()
    assert a_stats["nodes"] > 0 and a_stats["registered_segments"] == ["secret"]

    # b sees none of it, on any endpoint
    b_stats = call(url, "sk-b", "GET", "/v1/cache").json()
    assert b_stats["nodes"] == 0 and b_stats["radix"]["nodes"] == 0
    assert b_stats["registered_segments"] == [] and b_stats["standalone"]["entries"] == 0
    assert call(url, "sk-b", "GET", "/v1/segments/secret").status_code == 404
    assert call(url, "sk-b", "DELETE", "/v1/segments/secret").status_code == 404
    r = chat(url, "sk-b", [{"id": "doc", "hash": segment_digest(DOC)}])
    assert r.status_code == 409  # a's hash is not b's to reference
    assert chat(url, "sk-b", [{"id": "n", "name": "secret"}]).status_code == 404
    r = chat(url, "sk-b", [{"id": "other", "content": "b's own"}, *seg]).json()["usage"]
    assert r["prompt_tokens_details"]["cached_tokens"] == 0 and r["segcache"]["blended_tokens"] == 0
    r = call(url, "sk-b", "POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2})
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    r = call(url, "sk-b", "POST", "/v1/cache/warm", {"segments": [{"id": "w", "content": "warm text"}]})
    assert {s["status"] for s in r.json()["segments"]} == {"miss"}
    assert call(url, "sk-b", "GET", "/metrics").status_code == 403  # every tenant's counters

    # b's purge and deletes leave a untouched
    assert call(url, "sk-b", "DELETE", "/v1/cache").status_code == 200
    after = call(url, "sk-a", "GET", "/v1/cache").json()
    assert after["nodes"] == a_stats["nodes"] and after["registered_segments"] == ["secret"]
    r = chat(url, "sk-a", seg).json()["usage"]
    assert r["prompt_tokens_details"]["cached_tokens"] > 0
    assert call(url, "sk-a", "GET", "/v1/segments/secret").status_code == 200


def ks_2samp(x: list[float], y: list[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and its asymptotic p-value
    (Numerical Recipes' ``kstwo``/``probks``; scipy is not a dependency)."""
    xs, ys = sorted(x), sorted(y)
    n, m = len(xs), len(ys)
    i = j = 0
    d = 0.0
    while i < n and j < m:
        v = min(xs[i], ys[j])
        while i < n and xs[i] == v:
            i += 1
        while j < m and ys[j] == v:
            j += 1
        d = max(d, abs(i / n - j / m))
    ne = n * m / (n + m)
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    return d, _kolmogorov_q(lam)


def _kolmogorov_q(lam: float) -> float:
    """P(K > lam) for Kolmogorov's distribution; 1 where the series does not converge
    (lam near 0: no evidence of a difference)."""
    total, sign, previous = 0.0, 2.0, 0.0
    for k in range(1, 101):
        term = sign * math.exp(-2 * k * k * lam * lam)
        total += term
        if abs(term) <= 0.001 * previous or abs(term) <= 1e-8 * total:
            return min(1.0, max(0.0, total))
        sign, previous = -sign, abs(term)
    return 1.0


def test_ks_matches_known_values():
    same = [i / 10 for i in range(20)]
    assert ks_2samp(same, same) == (0.0, 1.0)
    d, p = ks_2samp(list(range(20)), [v + 100 for v in range(20)])
    assert d == 1.0 and p < 1e-6
    d, p = ks_2samp([0.1, 0.4, 0.7], [0.2, 0.5, 0.8])  # interleaved
    assert d == pytest.approx(1 / 3) and p > 0.5


@pytest.mark.slow
def test_timing_audit_cross_tenant_hits_look_like_misses(tokenizer):
    """A segment one tenant cached gives another tenant a miss, in time as well as in
    status: TTFTs of such "would-be hits" and of plain misses are not told apart
    (KS p > 0.001), while the same test within one tenant tells hits from misses
    (p < 0.001). A model big enough that a miss costs a visible prefill."""
    from segcache.engine.engine import Engine
    from tests.tiny import TINY, tiny_runtime

    arch = dataclasses.replace(TINY, hidden_size=256, intermediate_size=768, n_layers=4,
                               n_heads=4, n_kv_heads=2, head_dim=64)
    engine = Engine(tiny_runtime(arch=arch), tokenizer, CacheConfig(), "audit")
    greedy = SamplingParams(max_tokens=1, temperature=0.0)

    def ttft(tenant: str, text: str) -> float:
        r = engine.chat(ChatRequest(tenant, USER, [SegmentInput("s", text)], greedy))
        return r.ttft_s

    def doc(tag: str) -> str:
        return f"{tag}: " + " ".join(f"fact {tag}-{k} is {k * 7 % 13}." for k in range(150))

    cross_hit, cross_miss, own_hit, own_miss = [], [], [], []
    try:
        for i in range(20):  # interleaved, so drift in machine load hits all four alike
            ttft("a", doc(f"shared{i}"))  # a caches it
            cross_hit.append(ttft("b", doc(f"shared{i}")))  # b: a hit if tenants leaked
            cross_miss.append(ttft("b", doc(f"fresh{i}")))
            own_hit.append(ttft("a", doc(f"shared{i}")))
            own_miss.append(ttft("a", doc(f"own{i}")))
    finally:
        engine.close(drain=False)
    d_cross, p_cross = ks_2samp(cross_hit, cross_miss)
    d_own, p_own = ks_2samp(own_hit, own_miss)
    print(f"\ntiming audit: cross-tenant D={d_cross:.2f} p={p_cross:.3f}; "
          f"within tenant D={d_own:.2f} p={p_own:.2e}")
    assert p_own < 0.001, (own_hit, own_miss)
    assert p_cross > 0.001, (cross_hit, cross_miss)
