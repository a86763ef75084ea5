"""Cache tiers below the RAM tree: local disk, then Redis (issue 17).

What is here (torch-free; kv/ may use numpy, safetensors and redis, never torch):

    keys.py        CacheKey (namespace, fingerprint, parent chain, segment digest, chain);
                   fingerprint_with (engine settings folded into the model fingerprint)
    payload.py     the one payload format: a safetensors blob whose header names its entry
    base.py        the Tier contract, TierStats, the bounded write queue
    disk.py        DiskTier(root, budget_bytes): a file per node, atomic, LRU, header-only restart
    redis_tier.py  RedisTier(url, ttl_s, chunk_bytes): chunked, MULTI/EXEC, back-off on outages
    redis_bulk.py  read_values: a node's chunks off the socket straight into one buffer
    store.py       TieredStore(tiers, layout): demote / publish / fetch (+ promote) / purge / stats

How the engine wires it in (``segcache/engine/tiering.py``, the plan below as built)
===================================================================================

Where the build differs from this plan: the write-through (``publish`` at insert)
runs for every configured tier, disk included, not only with Redis (a restart or
``kill -9`` then loses nothing; demotion covers a write-through dropped by a full
queue); a loaded message unit is served only when its token count is the prompt's
for that unit; the window of loads is ``tiering.WINDOW`` (3); since a purge moves a
tenant's tree to a new namespace generation (per process), tier keys are rooted at the
tenant's generation-0 namespace (``Tiers.tier_root``) and a purge deletes the
tenant's entries on every tier; with blending on, units a tier holds are loaded
before any blended reuse is planned.

Construction (``Engine.__init__``, config in ``CacheConfig``, flags in the CLI)::

    fingerprint = fingerprint_with(runtime.fingerprint, prefill_chunk=scheduler.prefill_chunk)
    tiers = []
    if cache.disk_cache_dir:   # --disk-cache DIR, --disk-bytes N
        tiers.append(DiskTier(cache.disk_cache_dir, cache.disk_bytes))
    if cache.redis_url:        # --redis-url URL, --redis-ttl S
        tiers.append(RedisTier(cache.redis_url, cache.redis_ttl_s))
    self.store = TieredStore(tiers, layout=KV_LAYOUT_VERSION) if tiers else None
    self.tree = SegmentTree(..., on_remove=self._on_tree_remove)

``self.fingerprint`` must become that extended fingerprint, since
``Engine.namespace`` = H(tenant, fingerprint) is every key's root. The items
the issue lists, and where each is covered: weights digest
(``runtime._fingerprint`` "weights"), dtype and KV dtype ("dtypes"),
tokenizer and chat template (``ChatTokenizer.digest`` hashes both, passed as
"tokenizer"), the kernel version (``kernels.KERNEL_VERSION``, a digest of
csrc/ and the compile flags, "kernels"), the KV layout ("kv_layout"), the
small-prefill threshold and prefill weights; missing from the runtime's digest
today and added by ``fingerprint_with``: the scheduler's ``prefill_chunk``
(chunk boundaries change float32 bits on the dense path). ``Engine.close``
calls ``self.store.close()`` (drains queued writes).

Handles <-> KVData (engine side, torch): a node handle ``t`` of shape
``[n_layers, 2, n_kv_heads, n_tokens, head_dim]`` (CPU; ``.cpu()`` first on a
device) becomes ``KVData(t.contiguous().view(torch.uint8).numpy().data,
str(t.dtype).removeprefix("torch."), tuple(t.shape))`` with no copy (the numpy
view keeps the tensor alive until the encoder has written it; handles are
never written after insert, so sharing them is safe). Back:
``torch.frombuffer(kv.data, dtype=getattr(torch, kv.dtype)).view(kv.shape)``
(``kv.data`` is a writable view of the buffer the tier read the payload into:
no copy; the tensor keeps that buffer alive).

Keys: a node's key is ``CacheKey(ns, fingerprint, node.parent.chain,
node.digest, node.chain)``; for unit i of a prompt it can be computed before
the tree is touched, ``chain_i = chain_digest(chain_{i-1}, digest_i)`` from
``chain_0 = ns``. What a reader expects: ``Expected(key, KV_LAYOUT_VERSION,
token_digest(unit.ids))``; for a kept reply (a message unit whose node holds
the model's generated ids, not the re-tokenized message) pass
``token_digest=None`` and take ``n_tokens`` from the payload (the chain
already binds the exact message content).

1. Demotion (RAM -> disk). ``CachePath.insert`` calls ``Residency.enforce``,
   which runs ``radix.evict_until`` and ``tree.evict_until``; ``LruTree.
   _evict_lru`` unlinks leaves and reports each through the tree's
   ``on_remove(node, reason)`` *after* unlinking, with ``node.parent`` and
   ``node.handle`` still set. So ``_on_tree_remove`` does, for reason
   "evict" only (not "purge", "expire" or "replace")::

       self.store.demote(key_of(node), kv_data(node.handle), token_digest(node.token_ids))

   ``demote`` only queues (bounded by count and bytes; a full queue drops and
   counts): encoding runs on the store's encoder thread, I/O on the tier's
   writer thread, never on the request. It must not call back into the tree.
   Pinned nodes are never evicted, so never demoted. The radix tail is not
   tiered: its nodes are token-keyed and have no chain digest (a later issue
   could key them by H(ns, token-id prefix)). Also call ``store.publish`` in
   ``CachePath.insert`` (write-through to every tier, behind the request) when Redis
   is configured, so server B finds what A computed without waiting for A's
   eviction, and so a crash loses nothing; ``demote`` is then a no-op for
   entries the disk already holds. Entries of the blend standalone namespace
   (``standalone_namespace(ns)``) are keyed the same way under that namespace.

2. Promotion on a miss in the unit walk. ``CachePath.start`` matches the RAM
   tree (``tree.match`` -> units[0:h]); ``CachePath.prefill_units`` then computes units
   h.. one by one. With a store, before computing unit i it consults the
   lower tiers: ``Fetched`` -> insert the node into the tree with the loaded
   handle (``tree.insert(run.parent, digest, unit ids, handle, nbytes)``, pin
   it), copy it into ``run.kv[:, :, :, pos:pos+n]`` and ``CachePath.advance`` with
   status "hit"; None -> prefill it as today. A fetch is blocking I/O, so it
   runs on the store's loader threads (``fetch_async``) and the request's
   generator yields a new scheduler work item, ``LoadWait(future)`` (next to
   ``WaitFor`` in engine/scheduler.py: the scheduler runs other jobs' prefill
   and decode until ``future.done()``), instead of blocking the engine
   thread. A hit on disk or Redis costs a wait only where the request needs
   that KV next.

3. Overlap: loading node k+1 while prefilling what is missing. Because all
   chains of the prompt are known up front, ``CachePath.prefill_units`` keeps a window
   of ``fetch_async`` futures for the next W (2-4) units after the RAM match,
   issued in order when the run starts. At unit i: if its future is done and
   hit, use it; if it missed, prefill unit i while the loads for i+1..i+W
   continue on the loader threads (the prefill is the engine thread's work;
   the loads are the loaders'); the future of i+W is issued as i completes.
   A miss at i does not invalidate a hit at i+1: a chain names "the KV after
   exactly these segments", the same bits whoever computed them (that is
   what the fingerprint guarantees), so a recomputed i followed by a loaded
   i+1 equals a cold prefill. A loaded unit the request ends up not needing
   (the request was cancelled) is simply dropped.

4. ``usage.segcache.segments[].tier``: ``SegmentUsage`` (engine/types.py)
   gains ``tier: "ram" | "disk" | "redis" | None``: "ram" for a tree hit
   (``CachePath.start`` and the in-flight re-match in ``CachePath.prefill_units``),
   ``Fetched.tier`` for a promoted node, None for a miss or a blended unit
   (computed, not loaded); ``as_dict`` writes it for every segment.

5. Purge and stats. ``CacheAdmin.purge`` (``DELETE /v1/cache``) also calls
   ``self.store.purge(ns)`` and ``self.store.purge(ns_s)`` (the standalone
   namespace): every tier drops the tenant's entries and every write of the
   tenant queued before the purge is discarded. ``cache_stats`` (``GET
   /v1/cache``) and ``metrics`` (``/metrics``) report ``store.stats()``:
   per tier bytes, entries, hits, misses, puts, errors, dropped, load seconds
   (mean load latency = load_s / hits), rejected payloads by reason, and the
   disabled flag + reason; the store's demotions, publishes, promotions.
   The disk budget (``--disk-bytes``) is enforced by the tier itself after
   every write; ``DiskTier.check_integrity`` belongs in the hypothesis state
   machine next to ``tree.check_integrity`` (demote / promote / restart).

Threads: the engine thread calls ``demote``/``publish``/``fetch_async``
(non-blocking: they queue); blocking I/O runs only on the store's encoder and
loader threads and each tier's writer thread. ``purge`` blocks (an ``rmtree``,
a Redis SCAN bounded by the tier's timeout): call it from the DELETE request's
thread after the tree purge, not under the engine lock. See ``base`` for the
tier contract and ``store`` for the store's.
"""

from segcache.kv.tiers.base import Hit, Tier, TierStats
from segcache.kv.tiers.disk import DiskTier
from segcache.kv.tiers.keys import CacheKey, fingerprint_with
from segcache.kv.tiers.payload import (
    Expected,
    KVData,
    PayloadRejected,
    decode,
    encode,
    token_digest,
)
from segcache.kv.tiers.store import Fetched, TieredStore

__all__ = [
    "CacheKey", "DiskTier", "Expected", "Fetched", "Hit", "KVData", "PayloadRejected", "Tier",
    "TierStats", "TieredStore", "decode", "encode", "fingerprint_with", "token_digest",
]
