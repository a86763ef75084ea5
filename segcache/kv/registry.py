"""Named segment registry: clients refer to a segment by name instead of
resending its content. Per tenant, with optional TTL. Pure Python."""

from __future__ import annotations

import re
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


class SegmentRegistry:
    """``tenant -> name -> entry``. Expired entries behave as absent and are
    dropped on access. Not thread-safe: the engine serialises calls."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, dict[str, RegistryEntry]] = {}

    def now(self) -> float:
        return self._clock()

    @staticmethod
    def valid_name(name: str) -> bool:
        return bool(NAME_RE.match(name))

    def put(self, tenant: str, name: str, content: str, digest: str,
            ttl_s: float | None = None) -> RegistryEntry:
        """Create or replace ``name``. Raises ValueError for a bad name or ttl."""
        if not self.valid_name(name):
            raise ValueError(f"invalid segment name {name!r}: use 1-128 of A-Z a-z 0-9 . _ : -, "
                             "starting with a letter or digit")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError("ttl must be > 0 seconds")
        now = self._clock()
        entry = RegistryEntry(name, content, digest, now, None if ttl_s is None else now + ttl_s)
        self._entries.setdefault(tenant, {})[name] = entry
        return entry

    def get(self, tenant: str, name: str) -> RegistryEntry | None:
        entry = self._entries.get(tenant, {}).get(name)
        if entry is not None and entry.expires_at is not None and entry.expires_at <= self._clock():
            del self._entries[tenant][name]
            return None
        return entry

    def delete(self, tenant: str, name: str) -> bool:
        """True if something was deleted (an expired entry counts as absent)."""
        if self.get(tenant, name) is None:
            return False
        del self._entries[tenant][name]
        return True

    def names(self, tenant: str) -> list[str]:
        return sorted(n for n in list(self._entries.get(tenant, {})) if self.get(tenant, n))

    def purge(self, tenant: str) -> int:
        return len(self._entries.pop(tenant, {}))
