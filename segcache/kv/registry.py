"""Named segment registry: clients refer to a segment by name instead of
resending its content. Per tenant, with optional TTL, bounded in bytes (per
tenant and in all) and in entries per tenant. Pure Python."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    content: str
    digest: str
    created: float
    expires_at: float | None


class RegistryFull(ValueError):
    """A put that would take a tenant (or the registry) past its bound."""


def entry_bytes(content: str) -> int:
    """What an entry costs: its content string as Python holds it, plus the entry."""
    return sys.getsizeof(content) + 200


class SegmentRegistry:
    """``tenant -> name -> entry``. Expired entries behave as absent and are
    dropped on access (and before a put is refused for space). A put past
    ``tenant_max_bytes`` / ``tenant_max_entries`` for its tenant, or ``max_bytes``
    in all, raises RegistryFull: entries are the client's to delete, never evicted.
    Thread-safe (one short lock per call)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_bytes: int = 256 << 20,
                 tenant_max_bytes: int = 32 << 20, tenant_max_entries: int = 1024) -> None:
        self._clock = clock
        self._entries: dict[str, dict[str, RegistryEntry]] = {}
        self.max_bytes = max_bytes
        self.tenant_max_bytes = tenant_max_bytes
        self.tenant_max_entries = tenant_max_entries
        self._tenant_bytes: dict[str, int] = {}
        self.bytes = 0
        self._lock = threading.RLock()

    def now(self) -> float:
        return self._clock()

    @staticmethod
    def valid_name(name: str) -> bool:
        return bool(NAME_RE.match(name))

    def put(self, tenant: str, name: str, content: str, digest: str,
            ttl_s: float | None = None) -> RegistryEntry:
        """Create or replace ``name``. Raises ValueError for a bad name or ttl."""
        with self._lock:
            if not self.valid_name(name):
                raise ValueError(f"invalid segment name {name!r}: use 1-128 of A-Z a-z 0-9 . _ : -, "
                                 "starting with a letter or digit")
            if ttl_s is not None and ttl_s <= 0:
                raise ValueError("ttl must be > 0 seconds")
            self._check_room(tenant, name, entry_bytes(content))
            now = self._clock()
            entry = RegistryEntry(name, content, digest, now, None if ttl_s is None else now + ttl_s)
            self._remove(tenant, name)
            self._entries.setdefault(tenant, {})[name] = entry
            self._tenant_bytes[tenant] = self.tenant_bytes(tenant) + entry_bytes(content)
            self.bytes += entry_bytes(content)
            return entry

    def tenant_bytes(self, tenant: str) -> int:
        return self._tenant_bytes.get(tenant, 0)

    def _check_room(self, tenant: str, name: str, size: int) -> None:
        self.names(tenant)  # drops the tenant's expired entries
        entries = self._entries.get(tenant, {})
        old = entries.get(name)
        freed = entry_bytes(old.content) if old is not None else 0
        count = len(entries) + (old is None)
        if count > self.tenant_max_entries:
            raise RegistryFull(f"this API key's tenant has {len(entries)} registered segments, the "
                               f"limit is {self.tenant_max_entries}; delete some first")
        if self.tenant_bytes(tenant) - freed + size > self.tenant_max_bytes:
            raise RegistryFull(f"registering {name!r} would take this tenant's registered segments to "
                               f"{self.tenant_bytes(tenant) - freed + size} bytes, over its limit of "
                               f"{self.tenant_max_bytes}; delete some first")
        if self.bytes - freed + size > self.max_bytes:
            raise RegistryFull(f"the server's segment registry is full ({self.max_bytes} bytes); "
                               "send the content in the request instead")

    def _remove(self, tenant: str, name: str) -> None:
        entry = self._entries.get(tenant, {}).pop(name, None)
        if entry is None:
            return
        size = entry_bytes(entry.content)
        self.bytes -= size
        self._tenant_bytes[tenant] -= size
        if not self._entries[tenant]:
            del self._entries[tenant], self._tenant_bytes[tenant]

    def get(self, tenant: str, name: str) -> RegistryEntry | None:
        with self._lock:
            entry = self._entries.get(tenant, {}).get(name)
            if entry is not None and entry.expires_at is not None and entry.expires_at <= self._clock():
                self._remove(tenant, name)
                return None
            return entry

    def delete(self, tenant: str, name: str) -> bool:
        """True if something was deleted (an expired entry counts as absent)."""
        with self._lock:
            if self.get(tenant, name) is None:
                return False
            self._remove(tenant, name)
            return True

    def names(self, tenant: str) -> list[str]:
        with self._lock:
            return sorted(n for n in list(self._entries.get(tenant, {})) if self.get(tenant, n))

    def purge(self, tenant: str) -> int:
        with self._lock:
            names = list(self._entries.get(tenant, {}))
            for name in names:
                self._remove(tenant, name)
            return len(names)
