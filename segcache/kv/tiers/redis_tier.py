"""The Redis tier: payloads shared by every server pointed at one Redis.

Keys (``prefix`` defaults to ``segcache:kv1``)::

    {prefix}:{namespace hex}:{fingerprint hex}:{chain hex}                 manifest
    {prefix}:{namespace hex}:{fingerprint hex}:{chain hex}:{nonce}:{i}     chunk i

The manifest is JSON ``{"nonce", "chunks", "size"}``; the chunks are the
payload (``segcache.kv.tiers.payload``) cut into ``chunk_bytes`` pieces. One
``MULTI``/``EXEC`` sets every chunk and then the manifest, all with the TTL:
a reader sees the old manifest or the new one, never a half-written entry, and
a rewrite never mixes its chunks with an older write's (each write has its
own nonce; superseded chunks expire with their TTL). Entries are not refreshed
on a hit: they live ``ttl_s`` from their last write. A read is two round trips:
the manifest, then every chunk, read off the socket straight into one buffer
(``redis_bulk``: redis-py's parser would copy each chunk four times).

Redis going away never reaches the caller: a failed call is counted
(``errors``), the first failure of an outage logs one warning, and for a
back-off window (doubling from ``backoff_s[0]`` to ``backoff_s[1]``) every
call returns a miss or drops its write without touching the network; the
first call after the window tries again and a success ends the outage (one
info line). No call blocks longer than ``timeout_s`` per network round trip.
``stats()`` shows an outage as ``disabled`` with the reason; ``bytes`` and
``entries`` are None (a shared Redis holds other servers' entries too).
"""

from __future__ import annotations

import json
import secrets
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from segcache.kv.tiers.base import Tier, TierStats, log
from segcache.kv.tiers.keys import CacheKey, hex_of
from segcache.kv.tiers.redis_bulk import read_values

DEFAULT_PREFIX = "segcache:kv1"
MAX_CHUNKS = 1 << 16  # a manifest naming more chunks than this is not ours


class _Down(Exception):
    """Raised inside the tier while Redis is in its back-off window."""


class RedisTier(Tier):
    """Payloads in Redis at ``url`` with a TTL, chunked by ``chunk_bytes``."""

    name = "redis"

    def __init__(self, url: str, ttl_s: float, chunk_bytes: int = 4 << 20, *,
                 timeout_s: float = 0.5, backoff_s: tuple[float, float] = (0.5, 30.0),
                 queue_size: int = 64, queue_bytes: int = 256 << 20,
                 prefix: str = DEFAULT_PREFIX) -> None:
        if ttl_s <= 0 or chunk_bytes <= 0 or timeout_s <= 0:
            raise ValueError("ttl_s, chunk_bytes and timeout_s must be > 0")
        super().__init__(queue_size, queue_bytes)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.chunk_bytes = chunk_bytes
        self.prefix = prefix
        self._backoff_min, self._backoff_max = backoff_s
        self._backoff = self._backoff_min
        self._down_until = 0.0
        self._outage = ""  # the error that started the current outage; "" when up
        self._state = threading.Lock()
        # No retries inside the client: a down Redis must cost one timeout, not several.
        # RESP2: the chunk reader (``redis_bulk``) reads its replies off the socket itself.
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                            socket_connect_timeout=timeout_s,
                                            retry=Retry(NoBackoff(), 0), protocol=2)

    # ------------------------------------------------------------------ keys
    def _base(self, key: CacheKey) -> str:
        return f"{self.prefix}:{key.ns_hex}:{hex_of(key.fingerprint)}:{key.chain_hex}"

    # ------------------------------------------------------------------ storage
    def _read(self, key: CacheKey) -> bytes | memoryview | None:
        base = self._base(key)
        try:
            raw = self._call(lambda: self._client.get(base))
            if raw is None:
                return None
            try:
                manifest = json.loads(raw)
                nonce, n = str(manifest["nonce"]), int(manifest["chunks"])
            except (ValueError, KeyError, TypeError):
                return b""  # decode rejects it ("truncated"), the tier deletes it
            if not 1 <= n <= MAX_CHUNKS:
                return b""
            keys = [f"{base}:{nonce}:{i}" for i in range(n)]
            # None: a chunk expired before the manifest, the entry is gone
            return self._call(lambda: read_values(self._client, keys, self.buffers))
        except _Down:
            return None

    def _write(self, key: CacheKey, payload: bytes | memoryview, gen: int) -> bool:
        base, nonce = self._base(key), secrets.token_hex(6)
        view = memoryview(payload).cast("B")
        chunks = [view[i:i + self.chunk_bytes] for i in range(0, len(view), self.chunk_bytes)] or [view]
        manifest = json.dumps({"nonce": nonce, "chunks": len(chunks), "size": len(view)})
        pipe = self._client.pipeline(transaction=True)
        for i, chunk in enumerate(chunks):
            pipe.set(f"{base}:{nonce}:{i}", chunk, px=self.ttl_ms)
        pipe.set(base, manifest, px=self.ttl_ms)  # last: readers find it only with its chunks
        if gen != self.generation(key.namespace):
            return False  # purged since it was queued
        try:
            self._call(pipe.execute)
        except _Down:
            self._count("dropped")
            return False
        return True

    def _remove(self, key: CacheKey) -> None:
        base = self._base(key)
        try:
            self._call(lambda: self._delete_matching(f"{base}:*", also=[base]))
        except _Down:
            pass

    def _remove_namespace(self, namespace: str) -> None:
        pattern = f"{self.prefix}:{hex_of(namespace)}:*"
        try:
            self._call(lambda: self._delete_matching(pattern))
        except _Down:
            pass

    def _delete_matching(self, pattern: str, also: list[str] = ()) -> None:
        batch = list(also)
        for k in self._client.scan_iter(match=pattern, count=1000):
            batch.append(k)
            if len(batch) >= 500:
                self._client.unlink(*batch)
                batch = []
        if batch:
            self._client.unlink(*batch)

    def _has(self, key: CacheKey) -> bool:
        try:
            return bool(self._call(lambda: self._client.exists(self._base(key))))
        except _Down:
            return False

    def _sizes(self) -> tuple[None, None]:
        return None, None

    def stats(self) -> TierStats:
        s = super().stats()
        with self._state:
            if self._outage:
                s.disabled, s.disabled_reason = True, f"unreachable: {self._outage}"
        return s

    def close(self) -> None:
        super().close()
        self._client.close()

    # ------------------------------------------------------------------ outages
    def _call(self, fn):
        """Run one Redis call, or raise _Down during back-off or when it fails."""
        with self._state:
            if self._outage and time.monotonic() < self._down_until:
                raise _Down
        try:
            result = fn()
        except redis.RedisError as e:
            self._failed(e)
            raise _Down from None
        self._succeeded()
        return result

    def _failed(self, error: Exception) -> None:
        self._count("errors")
        with self._state:
            first = not self._outage
            self._outage = f"{type(error).__name__}: {error}"
            self._down_until = time.monotonic() + self._backoff
            wait, self._backoff = self._backoff, min(self._backoff * 2, self._backoff_max)
        if first:
            log.warning("redis tier: %s; serving without it, retrying with back-off (first in %.1fs)",
                        self._outage, wait)

    def _succeeded(self) -> None:
        with self._state:
            if not self._outage:
                return
            self._outage, self._backoff = "", self._backoff_min
        log.info("redis tier: reachable again")

