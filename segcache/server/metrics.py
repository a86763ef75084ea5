"""Prometheus metrics, one registry per app (no module-level collectors).

Request counters and histograms are updated by the server as requests finish;
cache gauges are read from ``engine.metrics()`` at scrape time by
``CacheCollector``, so they are never stale and cost nothing between scrapes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from segcache.engine.types import GenerationResult

log = logging.getLogger(__name__)

# Latency buckets from a cached ~10 ms answer to a cold multi-thousand-token prefill.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "segcache_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("segcache_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter(
            "segcache_cached_tokens", "Prompt tokens served from the KV cache", registry=r
        )
        self.computed_tokens = Counter(
            "segcache_computed_tokens", "Prompt tokens prefilled through every layer (not cached, not reused)", registry=r
        )
        self.completion_tokens = Counter(
            "segcache_completion_tokens", "Generated tokens", registry=r
        )
        self.blended_tokens = Counter(
            "segcache_blended_tokens",
            "Prompt tokens whose KV was reused from a segment computed at another position",
            registry=r,
        )
        self.recomputed_tokens = Counter(
            "segcache_blend_recomputed_tokens",
            "Of the blended tokens, those recomputed for the new context",
            registry=r,
        )
        self.ttft = Histogram(
            "segcache_ttft_seconds",
            "Time from request arrival to the first generated text",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "segcache_request_seconds",
            "Time from request arrival to the end of generation",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.generations = Counter(
            "segcache_generations",
            "Generations by how they ended (cancelled: the client left, also mid-stream)",
            ["finish_reason"],
            registry=r,
        )
        self._prompt_total = 0
        self._cached_total = 0
        r.register(CacheCollector(engine, self))

    def observe_generation(self, result: GenerationResult, ttft_s: float, total_s: float) -> None:
        self.generations.labels(finish_reason=result.finish_reason).inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        self.cached_tokens.inc(result.cached_tokens)
        self.computed_tokens.inc(result.computed_tokens)
        self.blended_tokens.inc(result.blended_tokens)
        self.recomputed_tokens.inc(result.recomputed_tokens)
        self.completion_tokens.inc(result.completion_tokens)
        self._prompt_total += result.prompt_tokens
        self._cached_total += result.cached_tokens
        self.ttft.observe(ttft_s)
        self.request_seconds.observe(total_s)

    def hit_ratio(self) -> float:
        return self._cached_total / self._prompt_total if self._prompt_total else 0.0

    def render(self) -> bytes:
        """Text exposition; blocking (asks the engine), call from a worker thread."""
        return generate_latest(self.registry)


class CacheCollector(Collector):
    """Cache-wide gauges from ``engine.metrics()`` and the hit ratio since start."""

    def __init__(self, engine: Any, metrics: ServerMetrics) -> None:
        self._engine = engine
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # unknown until scraped; keeps registration from calling the engine

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "segcache_cache_hit_ratio",
            "Cached / prompt tokens since the server started",
            value=self._metrics.hit_ratio(),
        )
        try:
            m = self._engine.metrics()
        except Exception:
            log.exception("engine.metrics() failed; cache gauges left out of this scrape")
            return
        gauges = {
            "resident_bytes": "Bytes of KV resident in memory",
            "nodes": "Segment tree nodes",
            "budget_bytes": "KV cache byte budget",
        }
        for key, doc in gauges.items():
            if key in m:
                yield GaugeMetricFamily(f"segcache_cache_{key}", doc, value=m[key])
        if "evictions" in m:
            # A counter (exposed as segcache_cache_evictions_total): it only grows.
            yield CounterMetricFamily(
                "segcache_cache_evictions", "Nodes evicted since start", value=m["evictions"]
            )
        yield from tier_metrics(m.get("tiers") or {})


# Per lower tier (label ``tier``: disk, redis): gauges, then counters since start.
_TIER_GAUGES = {
    "bytes": "Bytes of KV held by the tier (absent for a shared Redis)",
    "entries": "Entries held by the tier (absent for a shared Redis)",
    "disabled": "1 while the tier is disabled (writes failed, or Redis unreachable)",
}
_TIER_COUNTERS = {
    "hits": "Verified loads from the tier",
    "misses": "Lookups the tier could not serve (absent, or rejected)",
    "puts": "Entries written to the tier",
    "errors": "I/O errors of the tier",
    "dropped": "Writes not done (queue full, tier disabled)",
    "promotions": "Nodes loaded from the tier back into RAM",
    "demotions": "Nodes evicted from RAM and queued for the tier",
    "load_s": "Seconds spent in verified loads (mean load latency = this / hits)",
    "load_bytes": "Payload bytes of verified loads (load rate = this / load seconds)",
}


def tier_metrics(tiers: dict[str, Any]) -> Iterator[Metric]:
    """Prometheus families for ``engine.metrics()["tiers"]`` (see ``Tiers.stats``)."""
    stats = {name: s for name, s in tiers.items() if name != "store"}
    if not stats:
        return
    for key, doc in _TIER_GAUGES.items():
        g = GaugeMetricFamily(f"segcache_tier_{key}", doc, labels=["tier"])
        for name, s in stats.items():
            if s.get(key) is not None:
                g.add_metric([name], float(s[key]))
        yield g
    for key, doc in _TIER_COUNTERS.items():
        metric = {"load_s": "segcache_tier_load_seconds"}.get(key, f"segcache_tier_{key}")
        c = CounterMetricFamily(metric, doc, labels=["tier"])
        for name, s in stats.items():
            if key in s:
                c.add_metric([name], float(s[key]))
        yield c
    rejected = CounterMetricFamily("segcache_tier_rejected", "Payloads refused and deleted, by reason",
                                   labels=["tier", "reason"])
    for name, s in stats.items():
        for reason, n in (s.get("rejected") or {}).items():
            rejected.add_metric([name, reason], float(n))
    yield rejected
