"""Cache control for the engine: stats, purge, metrics and the named segment
registry. A mixin over ``Engine``'s tree, registry, memo and lock."""

from __future__ import annotations

import time
from typing import Any

from segcache.engine.types import EngineError, NotFoundError, QuotaExceededError
from segcache.kv.hashing import segment_digest
from segcache.kv.registry import RegistryEntry, RegistryFull


class CacheControl:
    # Provided by Engine: tree, radix, registry, memo, cache_cfg, model_name,
    # fingerprint, _lock (tree, radix), namespace(), blender.

    def cache_stats(self, tenant: str) -> dict[str, Any]:
        with self._lock:
            ns = self.namespace(tenant)
            stats = self.tree.stats(ns)
            radix = self.radix.stats(ns)
            stats["radix"] = {k: radix[k] for k in ("nodes", "bytes", "tokens", "hits", "pinned",
                                                    "evictions")}
            standalone = self.tree.stats(self.blender.standalone_namespace(ns), max_depth=0)
            stats["standalone"] = {"entries": standalone.get("nodes", 0),
                                   "bytes": standalone.get("bytes", 0),
                                   "tokens": standalone.get("tokens", 0)}
            stats["blend"] = {"mode": self.cache_cfg.blend, "ratio": self.cache_cfg.blend_ratio,
                              "layer": self.cache_cfg.blend_layer}
            stats["budget_bytes"] = self.cache_cfg.cache_bytes
            stats["tenant_quota_bytes"] = self.cache_cfg.tenant_quota_bytes
            stats["registered_segments"] = self.registry.names(tenant)
            stats["model"] = self.model_name
            stats["fingerprint"] = self.fingerprint
        stats["tiers"] = self.tier_stats()  # disk, Redis (outside the lock: Redis may be slow)
        return stats

    def purge(self, tenant: str) -> int:
        """Drop everything this tenant's earlier requests left: cached KV, standalone
        copies, token ids and registered names. The tenant moves to a new namespace,
        so nothing from before is reachable once this returns, whatever requests or
        background jobs are still running: what they hold or insert later stays in
        the retired namespace, swept when they end (``_sweep_retired``)."""
        self.registry.purge(tenant)
        with self._lock:
            ns = self.namespace(tenant)
            ns_s = self.blender.standalone_namespace(ns)
            self._purges[ns_s] = self._purges.get(ns_s, 0) + 1  # queued background jobs skip work
            self._generation[tenant] = self._generation.get(tenant, 0) + 1
            removed = (len(self.tree.purge(ns)) + len(self.tree.purge(ns_s))
                       + len(self.radix.purge(ns)))
            self._retired |= {ns, ns_s}
            self._sweep_retired()
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
