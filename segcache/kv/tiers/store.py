"""``TieredStore``: the lower tiers in order (disk, then Redis), as the engine sees them.

- ``demote(key, kv, tokens_digest)``: RAM let go of a node; write it to the
  first lower tier, unless that tier holds it already. Returns at once: encoding
  runs on the store's encoder thread, I/O on each tier's writer thread.
- ``publish(key, kv, tokens_digest)``: write-through to every lower tier
  (at insert: a crash then loses nothing, and Redis shares it at once).
- ``fetch(expect)``: search the tiers in order; the first verified hit is
  returned with its tier's name and promoted into every tier above it (a
  Redis hit is written to disk, behind the caller). Blocks on I/O: call it
  from a loader thread (``fetch_async``) where the engine thread must not wait.
- ``purge(namespace)``: drop the tenant's entries on every tier, and every
  write of that namespace queued before the purge.
- ``stats()``: per-tier ``TierStats`` plus the store's own counters.

Thread-safe. Never raises for an I/O failure of a tier (see ``base``).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from segcache.kv.tiers.base import Tier, TierStats, WriteQueue, log
from segcache.kv.tiers.buffers import BufferReserve
from segcache.kv.tiers.keys import CacheKey
from segcache.kv.tiers.payload import Expected, KVData, encode

# Read buffers kept ready (``buffers.BufferReserve``): 128 MB, four nodes of up to ~1.4k
# tokens of SmolLM2-135M's float16 KV (23 KB a token); bigger payloads get fresh ones.
READY_BUFFERS = 4
READY_BUFFER_BYTES = 32 << 20


@dataclass(frozen=True)
class Fetched:
    """A verified lower-tier hit: the KV and the tier it came from ("disk" | "redis")."""

    kv: KVData
    tier: str


class TieredStore:
    """Lower tiers in search order; ``layout`` is the engine's KV layout string
    (written into every payload, required of every payload read)."""

    def __init__(self, tiers: Sequence[Tier], layout: str, *, queue_size: int = 256,
                 queue_bytes: int = 512 << 20, loaders: int = 2,
                 ready_buffers: int = READY_BUFFERS, ready_buffer_bytes: int = READY_BUFFER_BYTES) -> None:
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be distinct, got {names}")
        self.tiers = list(tiers)
        self.layout = layout
        self._lock = threading.Lock()
        self._gen: Counter[str] = Counter()  # namespace -> purges so far
        self._counts: Counter[str] = Counter()  # demotions, publishes, promotions, dropped
        self._queue = WriteQueue(queue_size, queue_bytes)  # KV waiting to be encoded
        self._encoder = threading.Thread(target=self._drain, name="segcache-tier-encoder", daemon=True)
        self._encoder.start()
        self._loaders = ThreadPoolExecutor(max(1, loaders), thread_name_prefix="segcache-tier-load")
        # read buffers kept faulted in for the loads (``buffers``) from ``prepare_buffers`` on:
        # every tier reads into them
        self.buffers = BufferReserve(ready_buffers, ready_buffer_bytes)
        for tier in self.tiers:
            tier.buffers = self.buffers

    def prepare_buffers(self) -> None:
        """Keep read buffers ready for the loads from now on (a served engine calls it
        at start-up: its first hits after a restart then read into them)."""
        self.buffers.start()

    # ------------------------------------------------------------------ writes
    def demote(self, key: CacheKey, kv: KVData, tokens_digest: str) -> bool:
        """Queue ``kv`` for the first lower tier (unless it has it). False if dropped (queue full)."""
        return self._enqueue("demotions", key, kv, tokens_digest, every_tier=False)

    def publish(self, key: CacheKey, kv: KVData, tokens_digest: str) -> bool:
        """Queue ``kv`` for every lower tier. False if dropped (queue full)."""
        return self._enqueue("publishes", key, kv, tokens_digest, every_tier=True)

    def _enqueue(self, what: str, key: CacheKey, kv: KVData, tokens_digest: str, every_tier: bool) -> bool:
        if not self.tiers or not self._encoder.is_alive():  # closed: nobody would write it
            return False
        with self._lock:
            job = (key, kv, tokens_digest, every_tier, self._gen[key.namespace])
            if not self._queue.offer(job, kv.nbytes):
                self._counts["dropped"] += 1
                return False
            self._counts[what] += 1
        return True

    def _drain(self) -> None:
        while True:
            job, nbytes = self._queue.take()
            try:
                if job is None:
                    return
                self._write(*job)
            except Exception:  # a bug must not stop the encoder: count it, keep going
                log.exception("tiered store: write failed")
                with self._lock:
                    self._counts["errors"] += 1
            finally:
                self._queue.done(nbytes)

    def _write(self, key: CacheKey, kv: KVData, tokens_digest: str, every_tier: bool, gen: int) -> None:
        if every_tier:
            targets = self.tiers
        elif self.tiers[0].contains(key):  # published at insert already (an index lookup on disk)
            return
        else:
            targets = self.tiers[:1]
        payload = encode(key, kv, tokens_digest, self.layout)
        with self._lock:  # a purge since the job was queued wins; the tiers' own generations
            if gen != self._gen[key.namespace]:  # are read under this lock (put_async), so
                return  # no write queued before a purge can land after it
            for tier in targets:
                tier.put_async(key, payload)

    # ------------------------------------------------------------------ reads
    def fetch(self, expect: Expected) -> Fetched | None:
        """The first verified hit in tier order (promoted into the tiers above it), or None."""
        for i, tier in enumerate(self.tiers):
            hit = tier.get(expect)
            if hit is None:
                continue
            with self._lock:
                for upper in self.tiers[:i]:
                    upper.put_async(expect.key, hit.payload)
                    self._counts["promotions"] += 1
            return Fetched(hit.kv, tier.name)
        return None

    def fetch_async(self, expect: Expected) -> Future:
        """``fetch`` on a loader thread: a Future of ``Fetched | None``."""
        return self._loaders.submit(self.fetch, expect)

    def contains(self, key: CacheKey) -> str | None:
        """Name of the first tier that holds ``key`` (may be stale by the time of a fetch)."""
        return next((t.name for t in self.tiers if t.contains(key)), None)

    # ------------------------------------------------------------------ control
    def purge(self, namespace: str) -> None:
        with self._lock:
            self._gen[namespace] += 1
        for tier in self.tiers:
            tier.delete_namespace(namespace)

    def stats(self) -> dict[str, TierStats | dict[str, int]]:
        """``{tier name: TierStats, "store": {demotions, publishes, promotions, dropped, errors,
        buffers_taken, buffers_fresh}}`` (loads read into a ready buffer / a fresh one)."""
        out: dict[str, TierStats | dict[str, int]] = {t.name: t.stats() for t in self.tiers}
        with self._lock:
            out["store"] = {k: self._counts[k] for k in
                            ("demotions", "publishes", "promotions", "dropped", "errors")}
        out["store"] |= {f"buffers_{k}": self.buffers.counts[k] for k in ("taken", "fresh")}
        return out

    def flush(self) -> None:
        """Wait until every queued write has reached its tier (tests, shutdown)."""
        self._queue.join()
        for tier in self.tiers:
            tier.flush()

    def close(self) -> None:
        """Finish queued writes, stop the threads, close the tiers. Idempotent."""
        if not self._encoder.is_alive():
            return
        self._queue.stop()
        self._encoder.join()
        self._loaders.shutdown(wait=True)
        self.buffers.close()
        for tier in self.tiers:
            tier.close()
