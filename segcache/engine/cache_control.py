"""Cache administration for one engine: stats, purge, metrics and the named
segment registry (``CacheAdmin``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from segcache.config import CacheConfig
from segcache.engine.prompt import TokenMemo
from segcache.engine.types import EngineError, NotFoundError, QuotaExceededError
from segcache.kv.hashing import segment_digest
from segcache.kv.radix import RadixTree
from segcache.kv.registry import RegistryEntry, RegistryFull, SegmentRegistry
from segcache.kv.segment_tree import SegmentTree


class CacheAdmin:
    """What an operator or a tenant asks of the cache itself. It reads the engine's
    tree, radix tail, registry and memo (under the engine's ``lock``) and reaches the
    rest of the engine through the callables it is given: ``namespace(tenant)``, the
    tenant's current namespace; ``retire(tenant)``, which moves the tenant to a new
    namespace, drops what it held in RAM and returns (old namespace, its standalone
    namespace, nodes removed); ``standalone_namespace(ns)``; ``tier_stats()`` and
    ``purge_tiers(*namespaces)`` of the lower tiers; ``check_text_size(n_chars, param)``."""

    def __init__(self, *, tree: SegmentTree, radix: RadixTree, registry: SegmentRegistry,
                 memo: TokenMemo, lock: threading.RLock, cache_cfg: CacheConfig, model_name: str,
                 fingerprint: str, namespace: Callable[[str], str],
                 retire: Callable[[str], tuple[str, str, int]],
                 standalone_namespace: Callable[[str], str],
                 tier_stats: Callable[[], dict[str, Any]],
                 purge_tiers: Callable[..., None],
                 check_text_size: Callable[[int, str], None]) -> None:
        self.tree, self.radix, self.registry, self.memo = tree, radix, registry, memo
        self._lock = lock
        self.cache_cfg = cache_cfg
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.namespace = namespace
        self._retire = retire
        self.standalone_namespace = standalone_namespace
        self.tier_stats = tier_stats
        self._purge_tiers = purge_tiers
        self._check_text_size = check_text_size

    def cache_stats(self, tenant: str) -> dict[str, Any]:
        with self._lock:
            ns = self.namespace(tenant)
            stats = self.tree.stats(ns)
            radix = self.radix.stats(ns)
            stats["radix"] = {k: radix[k] for k in ("nodes", "bytes", "tokens", "hits", "pinned",
                                                    "evictions")}
            standalone = self.tree.stats(self.standalone_namespace(ns), max_depth=0)
            stats["standalone"] = {"entries": standalone.get("nodes", 0),
                                   "bytes": standalone.get("bytes", 0),
                                   "tokens": standalone.get("tokens", 0)}
            stats["blend"] = {"mode": self.cache_cfg.blend, "ratio": self.cache_cfg.blend_ratio,
                              "layer": self.cache_cfg.blend_layer,
                              "filter_layer": self.cache_cfg.blend_filter_layer}
            stats["budget_bytes"] = self.cache_cfg.cache_bytes
            stats["tenant_quota_bytes"] = self.cache_cfg.tenant_quota_bytes
            stats["registered_segments"] = self.registry.names(tenant)
            stats["model"] = self.model_name
            stats["fingerprint"] = self.fingerprint
        stats["tiers"] = self.tier_stats()  # disk, Redis (outside the lock: Redis may be slow)
        return stats

    def purge(self, tenant: str) -> int:
        """Drop everything this tenant's earlier requests left: cached KV, standalone
        copies, token ids and registered names, on every tier. The tenant moves to a
        new namespace (``retire``), so nothing from before is reachable once this
        returns, whatever requests or background jobs are still running."""
        self.registry.purge(tenant)
        ns, ns_s, removed = self._retire(tenant)
        self.memo.forget(ns)
        self._purge_tiers(ns, ns_s)  # every lower tier too (blocking I/O, outside the lock)
        return removed

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            s = self.tree.stats(max_depth=0)
            r = self.radix.stats()
            out = {"resident_bytes": self.tree.resident_bytes + self.radix.resident_bytes,
                   "nodes": len(self.tree) + len(self.radix),
                   "evictions": s.get("evictions", 0) + r.get("evictions", 0),
                   "budget_bytes": self.cache_cfg.cache_bytes}
        out["tiers"] = self.tier_stats()
        return out

    def put_segment(self, tenant: str, name: str, content: str, ttl_s: float | None) -> dict:
        self._check_text_size(len(content), "content")
        digest = segment_digest(content)
        try:
            entry = self.registry.put(tenant, name, content, digest, ttl_s)
        except RegistryFull as exc:
            raise QuotaExceededError(str(exc), "content") from exc
        except ValueError as exc:
            raise EngineError(str(exc), "name") from exc
        ids = self.memo.ids_for(self.namespace(tenant), content, digest)
        return self._segment_info(entry, len(ids))

    def get_segment(self, tenant: str, name: str) -> dict:
        entry = self.registry.get(tenant, name)
        if entry is None:
            raise NotFoundError(f"no segment is registered under the name {name!r}", "name")
        ids = self.memo.ids_for(self.namespace(tenant), entry.content, entry.digest)
        return self._segment_info(entry, len(ids))

    def delete_segment(self, tenant: str, name: str) -> None:
        if not self.registry.delete(tenant, name):
            raise NotFoundError(f"no segment is registered under the name {name!r}", "name")

    def _segment_info(self, entry: RegistryEntry, n_tokens: int) -> dict:
        # The registry runs on the monotonic clock; clients get wall-clock Unix time.
        expires_at = None
        if entry.expires_at is not None:
            expires_at = time.time() + (entry.expires_at - self.registry.now())
        return {"name": entry.name, "hash": entry.digest, "tokens": n_tokens,
                "bytes": len(entry.content.encode()), "expires_at": expires_at}
