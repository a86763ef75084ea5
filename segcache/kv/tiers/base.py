"""The contract every lower cache tier (disk, Redis) keeps, and what it reports.

A tier stores *payloads* (``segcache.kv.tiers.payload``: one safetensors blob
per tree node) under a ``CacheKey``. It never trusts what it reads back: every
``get`` decodes and checks the payload against what the caller expects (key,
fingerprint, token digest, layout, checksum); a payload that fails is deleted,
counted in ``stats().rejected`` and reported as a miss.

Contract of ``Tier`` (the methods a caller uses):

- ``put(key, payload)``: store; blocks on I/O. Never raises for an I/O
  failure: the error is counted (a tier whose writes fail for good, a full
  disk, disables its writes, logs one warning and says why in ``stats()``).
  Returns True if the entry is now stored.
- ``put_async(key, payload)``: hand the write to the tier's own writer thread
  (a queue bounded by count and bytes) and return at once; False, counted as ``dropped``, when the
  queue is full or the tier is disabled. The request path uses only this.
- ``get(expect)``: the verified KV, or None (a miss). Blocks on I/O for at
  most the tier's timeout; never raises for I/O or a bad payload.
- ``contains(key)``: cheap membership (an index lookup, or one round trip);
  may be stale by the time of a ``get``.
- ``delete(key)`` / ``delete_namespace(namespace)``: remove one entry / every
  entry of a tenant namespace. A write queued (or in flight) before
  ``delete_namespace`` never lands after it: the namespace's generation is
  bumped and a write of an older generation is discarded at commit.
- ``stats()``: a ``TierStats`` snapshot; never blocks on I/O.
- ``close()``: drain the writer queue and stop its thread.

Threads: every public method is safe to call from any thread (the engine
thread, request threads, the writer thread); a tier serialises its own index
under ``self._lock``, which is never held across network I/O.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field

from segcache.kv.tiers.buffers import BufferReserve
from segcache.kv.tiers.keys import CacheKey
from segcache.kv.tiers.payload import Expected, KVData, PayloadRejected, decode

log = logging.getLogger("segcache.kv.tiers")


class WriteQueue:
    """A FIFO of writes bounded by count and by bytes: a slow tier makes writes
    drop (``offer`` returns False), never memory grow or the caller wait."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._items = self._bytes = 0
        self.max_items, self.max_bytes = max_items, max_bytes

    def offer(self, item: object, nbytes: int) -> bool:
        with self._lock:
            if self._items + 1 > self.max_items or self._bytes + nbytes > self.max_bytes:
                return False
            self._items, self._bytes = self._items + 1, self._bytes + nbytes
        self._q.put((item, nbytes))
        return True

    def stop(self) -> None:
        """Queue the sentinel (None) that ends the consumer, past the bounds."""
        self._q.put((None, 0))

    def take(self) -> tuple[object, int]:
        return self._q.get()

    def done(self, nbytes: int) -> None:
        with self._lock:
            self._items, self._bytes = self._items - 1, self._bytes - nbytes
        self._q.task_done()

    def join(self) -> None:
        self._q.join()


@dataclass
class TierStats:
    """One tier's counters since start; ``bytes``/``entries`` are None where the
    tier cannot know them cheaply (a shared Redis). ``load_s`` sums the seconds of
    every ``get`` that hit (``hits`` of them): mean load latency = load_s / hits."""

    name: str
    bytes: int | None = 0
    entries: int | None = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    errors: int = 0
    dropped: int = 0  # async writes not queued (queue full, tier disabled)
    load_s: float = 0.0
    load_bytes: int = 0  # payload bytes of those hits: load rate = load_bytes / load_s
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> payloads deleted
    disabled: bool = False
    disabled_reason: str = ""

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["rejected"] = dict(self.rejected)
        return d


@dataclass(frozen=True)
class Hit:
    """A verified entry: the KV and the payload bytes it came from (to promote them as
    is). ``kv.data`` is a view of ``payload``, writable where the tier read into a
    buffer of its own (disk, Redis): nothing else holds it, and it is never written
    (a promotion only reads it)."""

    kv: KVData
    payload: bytes | memoryview


class Tier(ABC):
    """Base of the lower tiers: verification, counters, generations, the writer thread.

    A subclass implements the raw storage: ``_read`` (bytes or None),
    ``_write`` (may raise OSError / its client's errors), ``_remove``,
    ``_remove_namespace``, ``_has`` and ``_sizes``. See the module docstring
    for the contract.
    """

    name = "tier"
    buffers: BufferReserve | None = None  # ready read buffers (the store's), if any

    def __init__(self, queue_size: int = 64, queue_bytes: int = 256 << 20) -> None:
        self._lock = threading.RLock()
        self._gen: Counter[str] = Counter()  # namespace -> purges so far
        self._stats = TierStats(self.name)
        self._rejected: Counter[str] = Counter()
        self._queue = WriteQueue(queue_size, queue_bytes)
        self._writer: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ public
    def get(self, expect: Expected) -> Hit | None:
        key = expect.key
        t0 = time.perf_counter()
        data = self._read(key)
        if data is None:
            self._count("misses")
            return None
        try:
            kv = decode(data, expect)
        except PayloadRejected as e:
            log.warning("%s tier: rejected %s/%s: %s", self.name, key.ns_hex[:12], key.chain_hex[:12], e.reason)
            self._remove(key)
            with self._lock:
                self._rejected[e.reason] += 1
                self._stats.misses += 1
            return None
        with self._lock:
            self._stats.hits += 1
            self._stats.load_s += time.perf_counter() - t0
            self._stats.load_bytes += memoryview(data).nbytes
        return Hit(kv, data)

    def put(self, key: CacheKey, payload: bytes | memoryview, gen: int | None = None) -> bool:
        """Store ``payload`` now. ``gen`` is the namespace generation the write
        was queued under (None: the current one)."""
        if self._stats.disabled:
            self._count("dropped")
            return False
        gen = self.generation(key.namespace) if gen is None else gen
        if self._write(key, payload, gen):
            self._count("puts")
            return True
        return False

    def put_async(self, key: CacheKey, payload: bytes | memoryview) -> bool:
        if self._stats.disabled or self._closed:
            self._count("dropped")
            return False
        self._start_writer()
        if not self._queue.offer((key, payload, self.generation(key.namespace)), memoryview(payload).nbytes):
            self._count("dropped")
            return False
        return True

    def contains(self, key: CacheKey) -> bool:
        return self._has(key)

    def delete(self, key: CacheKey) -> None:
        self._remove(key)

    def delete_namespace(self, namespace: str) -> None:
        with self._lock:
            self._gen[namespace] += 1
        self._remove_namespace(namespace)

    def generation(self, namespace: str) -> int:
        with self._lock:
            return self._gen[namespace]

    def stats(self) -> TierStats:
        with self._lock:
            s = TierStats(**{**self._stats.__dict__, "rejected": dict(self._rejected)})
        s.bytes, s.entries = self._sizes()
        return s

    def flush(self) -> None:
        """Wait until every queued write has been done (tests, shutdown)."""
        if self._writer is not None:
            self._queue.join()

    def close(self) -> None:
        """Drain the queue and stop the writer thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.stop()
            self._writer.join()

    # ------------------------------------------------------- for the subclasses
    @abstractmethod
    def _read(self, key: CacheKey) -> bytes | memoryview | None: ...

    @abstractmethod
    def _write(self, key: CacheKey, payload: bytes | memoryview, gen: int) -> bool:
        """Store; discard (return False) if ``gen`` is no longer the namespace's."""

    @abstractmethod
    def _remove(self, key: CacheKey) -> None: ...

    @abstractmethod
    def _remove_namespace(self, namespace: str) -> None: ...

    @abstractmethod
    def _has(self, key: CacheKey) -> bool: ...

    @abstractmethod
    def _sizes(self) -> tuple[int | None, int | None]:
        """(bytes, entries) held, without I/O."""

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._stats, what, getattr(self._stats, what) + n)

    def _disable(self, reason: str) -> None:
        """Stop writing for good (until restart); one warning."""
        with self._lock:
            if self._stats.disabled:
                return
            self._stats.disabled, self._stats.disabled_reason = True, reason
        log.warning("%s tier disabled for writes: %s (serving continues without it)", self.name, reason)

    # ------------------------------------------------------------------ writer
    def _start_writer(self) -> None:
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._drain, name=f"segcache-{self.name}-writer",
                                                daemon=True)
                self._writer.start()

    def _drain(self) -> None:
        while True:
            item, nbytes = self._queue.take()
            try:
                if item is None:
                    return
                key, payload, gen = item
                self.put(key, payload, gen)
            except Exception:  # a bug must not kill the writer: count it, keep draining
                log.exception("%s tier: write failed", self.name)
                self._count("errors")
            finally:
                self._queue.done(nbytes)
