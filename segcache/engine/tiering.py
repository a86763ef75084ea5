"""The engine side of the cache tiers (RAM -> disk -> Redis): ``Tiers``, one per engine.

The storage is ``segcache.kv.tiers`` (torch-free); this module is the adapter:
keys from tree nodes, torch tensors <-> ``KVData``, and the four hooks.

    write-through   ``_insert`` -> ``publish(node)``: every lower tier gets the node,
                    behind the request (the store's encoder and writer threads), so a
                    restart or a crash loses nothing and a second server finds it.
    demotion        the tree's ``on_remove(node, "evict")`` -> ``store.demote``: a node
                    RAM lets go of reaches disk (a no-op where the write-through put it
                    there already; it covers a write-through dropped by a full queue).
                    Expiry, purge and replacement drop the node: they never demote.
    promotion       ``CachePath.prefill_units``, before computing a unit missing from RAM, calls
                    ``promote``: the unit's KV loaded from the first tier that has it,
                    verified, inserted into the tree (pinned) and copied into the
                    request's buffer; None (compute it) on a miss.
    overlap         the chains of every unit of a prompt are known before any of it is
                    computed, so ``promote`` keeps ``WINDOW`` loads in flight on the
                    store's loader threads ahead of the unit being computed: while the
                    engine thread prefills unit k, unit k+1 is being read. The request
                    waits (``LoadWait``: the scheduler runs other jobs meanwhile) only for
                    the load of the unit it needs next.

A loaded message unit is served without its token digest (a kept reply holds the
ids the model generated, which the next prompt does not have: the chain binds the
message's content) and only when its token count is the prompt's for that unit
(the request's buffer and context check were sized from it). Loaded KV must have
the runtime's KV dtype and shape, or it is computed instead.

Keys are rooted at the tenant's generation-0 namespace whatever generation its tree
is at (``tier_root``): generations are per process, tier entries outlive it.

The radix tail is not tiered (its nodes have no chain digest); neither are blend
standalone entries promoted (they are demoted like any node under their own
namespace, and purged with the tenant).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch

from segcache.config import CacheConfig
from segcache.engine.prompt import Prompt
from segcache.engine.scheduler import LoadWait
from segcache.kv.hashing import chain_digest
from segcache.kv.segment_tree import SegmentNode, SegmentTree
from segcache.kv.tiers import (
    CacheKey,
    DiskTier,
    Expected,
    Fetched,
    KVData,
    TieredStore,
    token_digest,
)
from segcache.kv.tiers.redis_tier import RedisTier

WINDOW = 3  # loads in flight ahead of the unit being computed
log = logging.getLogger(__name__)


def build_store(cache: CacheConfig, layout: str) -> TieredStore | None:
    """The lower tiers ``cache`` configures (disk first, then Redis), or None."""
    tiers = []
    if cache.disk_cache_dir is not None:
        disk = DiskTier(cache.disk_cache_dir, cache.disk_bytes)
        r = disk.startup
        log.info("disk tier %s: %d entries (%.1f MiB) indexed in %.2f s", cache.disk_cache_dir, r.entries,
                 r.bytes / (1 << 20), r.seconds)
        tiers.append(disk)
    if cache.redis_url is not None:
        tiers.append(RedisTier(cache.redis_url, cache.redis_ttl_s))
        log.info("redis tier %s: entries live %.0f s", _without_password(cache.redis_url), cache.redis_ttl_s)
    return TieredStore(tiers, layout) if tiers else None


def _without_password(url: str) -> str:
    """``url`` fit for a log line: a password in it replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def kv_data(handle: torch.Tensor) -> KVData:
    """A node handle [n_layers, 2, n_kv_heads, n_tokens, head_dim] as bytes, without a
    copy on the CPU (the view keeps the tensor alive; handles are never written after
    insert)."""
    t = handle.detach().cpu().contiguous()
    return KVData(t.view(torch.uint8).numpy().data, str(t.dtype).removeprefix("torch."), tuple(t.shape))


def handle_of(kv: KVData) -> torch.Tensor:
    """A loaded payload's KV as a tensor [n_layers, 2, n_kv_heads, n_tokens, head_dim]:
    over its bytes where they are writable and aligned (the tiers read into a buffer of
    their own, which the tensor keeps alive; safetensors pads the header to 8 bytes),
    else over a copy."""
    dtype = getattr(torch, kv.dtype)
    view = memoryview(kv.data)
    if view.nbytes == 0:
        return torch.empty(kv.shape, dtype=dtype)
    aligned = np.frombuffer(view, dtype=np.uint8).ctypes.data % dtype.itemsize == 0
    data = view if aligned and not view.readonly else bytearray(view)
    return torch.frombuffer(data, dtype=dtype).view(kv.shape)


@dataclass
class Loads:
    """One request's loads from the lower tiers: what is expected of units ``start..``
    (their chains follow from the parent chain at ``start``), the futures issued and not
    yet taken, and ``issued``: units ``start..issued - 1`` have had their load issued
    (a taken future is gone from ``futures``; its unit is never loaded again)."""

    start: int
    expects: list[Expected]
    futures: dict[int, Future] = field(default_factory=dict)
    issued: int = field(init=False)

    def __post_init__(self) -> None:
        self.issued = self.start

    def covers(self, i: int) -> bool:
        return 0 <= i - self.start < len(self.expects)

    def issue(self, store: TieredStore, upto: int) -> None:
        """Loads of units ``issued..upto - 1`` (on the store's loader threads), in order."""
        for j in range(self.issued, min(upto, self.start + len(self.expects))):
            self.futures[j] = store.fetch_async(self.expects[j - self.start])
            self.issued = j + 1

    def take(self, i: int) -> Future | None:
        """The future of unit ``i``'s load (issued before), or None if it was taken already."""
        return self.futures.pop(i, None)


class Tiers:
    """The engine's lower tiers: ``store`` (None: RAM only) and the hooks above. It
    reads and inserts into the engine's ``tree`` (on the engine thread) and calls
    ``enforce_budget(namespace)`` after a promotion."""

    def __init__(self, store: TieredStore | None, tree: SegmentTree, fingerprint: str,
                 cache_cfg: CacheConfig, enforce_budget: Callable[[str], None]) -> None:
        self.store = store
        self.tree = tree
        self.fingerprint = fingerprint
        self.cache_cfg = cache_cfg
        self._enforce_budget = enforce_budget
        self._promoted: Counter[str] = Counter()  # tier name -> nodes loaded back into RAM
        # namespaces purged in this process: nothing of theirs is written again
        self._purged: set[str] = set()
        # a purged tenant's tree namespace -> the namespace its tier entries live under
        self._tier_roots: dict[str, str] = {}

    def note_generation(self, ns: str, base: str) -> None:
        """Tree namespace ``ns`` (a purged tenant's later generation) keys its tier
        entries under ``base`` (its generation 0)."""
        if self.store is not None:
            self._tier_roots[ns] = base

    def tier_root(self, ns: str) -> str:
        """The namespace tier entries of tree namespace ``ns`` are keyed under: the
        tenant's namespace of generation 0. A purge moves the tenant's tree to a new
        namespace (``Engine.namespace``), but generations are per process: a restarted
        server, or another one sharing Redis, starts at 0. The purge deletes the
        tenant's entries on every tier instead, and nothing a request of an older
        generation inserts is written afterwards (``_purged``)."""
        return self._tier_roots.get(ns, ns)

    def _tier_key(self, node: SegmentNode) -> CacheKey:
        root = self.tier_root(node.namespace)
        if root == node.namespace:
            return CacheKey(node.namespace, self.fingerprint, node.parent.chain, node.digest, node.chain)
        path = []
        while node.parent is not None:  # chains re-rooted at the tier namespace
            path.append(node.digest)
            node = node.parent
        return self._chain_keys(root, path[::-1])[-1]

    def _chain_keys(self, root: str, digests: list[str]) -> list[CacheKey]:
        keys, parent = [], root
        for digest in digests:
            keys.append(CacheKey(root, self.fingerprint, parent, digest, chain_digest(parent, digest)))
            parent = keys[-1].chain
        return keys

    # ------------------------------------------------------------------ writes
    def publish(self, node: SegmentNode, handle: object) -> None:
        """Write-through of a just-inserted node to every lower tier (queued); nothing
        when the tree kept an existing node (its KV is not ``handle``: written already)."""
        if self.store is not None and node.handle is handle and node.namespace not in self._purged:
            self.store.publish(self._tier_key(node), kv_data(node.handle), token_digest(node.token_ids))

    def on_tree_remove(self, node: SegmentNode, reason: str) -> None:
        """The tree's ``on_remove``: an evicted node is demoted (queued); the others dropped."""
        if (reason == "evict" and self.store is not None and node.handle is not None
                and node.namespace not in self._purged):
            self.store.demote(self._tier_key(node), kv_data(node.handle), token_digest(node.token_ids))

    # ------------------------------------------------------------------ reads
    def promote(self, run: Any, prompt: Prompt, i: int, stop: int | None):
        """Unit ``i``'s KV from a lower tier: inserted into the tree after ``run.parent``
        (pinned), copied into ``run.kv`` at ``run.pos``; returns (node, tier name), or
        None to compute it. Yields ``LoadWait`` while its load is in flight."""
        if self.store is None:
            return None
        if run.loads is None or not run.loads.covers(i):
            run.loads = self._plan_loads(run, prompt, i, len(prompt.units) if stop is None else stop)
        try:
            run.loads.issue(self.store, i + WINDOW)
        except RuntimeError:  # the store was closed under a request still running: compute
            return None
        future = run.loads.take(i)
        if future is None:  # loaded once already and not used then: compute it
            return None
        while not future.done():
            yield LoadWait(future)
        fetched: Fetched | None = future.result()
        unit = prompt.units[i]
        if fetched is None or not self._fits(run, fetched.kv, len(unit.ids)):
            return None
        handle = handle_of(fetched.kv)
        n = handle.shape[3]
        node = self.tree.insert(run.parent, unit.key.digest, unit.ids, handle,
                                handle.numel() * handle.element_size(),
                                ttl_s=unit.key.ttl_s or self.cache_cfg.default_ttl_s)
        self.tree.pin([node])
        run.pinned.append(node)
        run.kv[:, :, :, run.pos:run.pos + n] = handle
        self._enforce_budget(run.parent.namespace)
        self._promoted[fetched.tier] += 1
        return node, fetched.tier

    def _plan_loads(self, run: Any, prompt: Prompt, i: int, end: int) -> Loads:
        """What units ``i..end`` would be read as (keys chained from the tier namespace
        over every unit before them)."""
        root = self.tier_root(run.parent.namespace)
        keys = self._chain_keys(root, [u.key.digest for u in prompt.units[:end]])[i:]
        expects = []
        for unit, key in zip(prompt.units[i:end], keys, strict=True):
            # A kept reply holds the generated ids, not the re-tokenized message: no digest.
            digest = None if unit.key.kind == "message" else token_digest(unit.ids)
            expects.append(Expected(key, self.store.layout, digest))
        return Loads(i, expects)

    def _fits(self, run: Any, kv: KVData, n_tokens: int) -> bool:
        """Whether loaded KV can stand for a unit of ``n_tokens`` in ``run.kv``."""
        buf = run.kv
        return (kv.dtype == str(buf.dtype).removeprefix("torch.") and kv.shape[3] == n_tokens
                and (kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[4])
                == (buf.shape[0], buf.shape[1], buf.shape[2], buf.shape[4]))

    # ------------------------------------------------------------------ control
    def purge(self, *namespaces: str) -> None:
        """Every tier drops these namespaces' entries (blocking I/O: not under the lock),
        and what requests still running in them insert later is never written: a purged
        tenant moves to a new namespace, and an entry left under the old one would be
        served again after a restart (generations start at 0 in a new process)."""
        if self.store is not None:
            self._purged.update(namespaces)
            for ns in namespaces:
                self.store.purge(self.tier_root(ns))

    def stats(self) -> dict[str, Any]:
        """Per tier: bytes, entries, hits, misses, puts, errors, dropped, load seconds
        (mean load latency = load_s / hits), rejected payloads by reason, disabled (and
        why), ``promotions`` (nodes loaded back into RAM from it) and, for the first tier,
        ``demotions`` (evicted nodes queued for it). ``"store"``: the store's demotions,
        publishes (write-through), promotions (copies into an upper lower tier), dropped
        writes and errors."""
        if self.store is None:
            return {}
        out: dict[str, Any] = {}
        for name, s in self.store.stats().items():
            if isinstance(s, dict):
                out[name] = s
                continue
            out[name] = s.as_dict() | {"promotions": self._promoted[name]}
        first = self.store.tiers[0].name
        out[first]["demotions"] = out["store"]["demotions"]
        return out

    def prepare(self) -> None:
        """Keep read buffers ready for loads from now on (``TieredStore.prepare_buffers``)."""
        if self.store is not None:
            self.store.prepare_buffers()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
