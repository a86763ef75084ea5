"""From a request to a cache-aligned prompt: resolve segments (content, hash or
registry name), tokenize with memoisation, and group the prompt into units.

A *unit* is what one segment-tree node stores: the template text right before
a segment plus the segment's tokens. Everything after the last segment is the
*tail* (messages and the generation prompt), always computed.

No torch here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from segcache.engine.types import (
    EngineError,
    NotFoundError,
    SegmentInput,
    SegmentMismatchError,
    SegmentUnknownError,
)
from segcache.kv.hashing import is_digest, segment_digest
from segcache.kv.registry import SegmentRegistry
from segcache.model.tokenizer import ChatTokenizer, PromptPart


@dataclass(frozen=True)
class ResolvedSegment:
    id: str
    digest: str
    ids: tuple[int, ...]
    ttl_s: float | None


@dataclass(frozen=True)
class Unit:
    segment: ResolvedSegment
    ids: tuple[int, ...]  # template text before the segment + the segment's tokens


@dataclass(frozen=True)
class Prompt:
    units: list[Unit]
    tail: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return sum(len(u.ids) for u in self.units) + len(self.tail)


class TokenMemo:
    """digest -> token ids (content-derived, so safe to share across tenants),
    plus, per namespace, which digests that tenant has supplied content for: a
    hash-only reference resolves only within the tenant that sent the content."""

    def __init__(self, tokenizer: ChatTokenizer, max_entries: int = 20000) -> None:
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._ids: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._known: dict[str, OrderedDict[str, None]] = {}

    def ids_for(self, content: str, digest: str) -> tuple[int, ...]:
        ids = self._ids.get(digest)
        if ids is None:
            ids = tuple(self.tokenizer.encode(content))
            self._ids[digest] = ids
            while len(self._ids) > self.max_entries:
                self._ids.popitem(last=False)
        self._ids.move_to_end(digest)
        return ids

    def remember(self, namespace: str, digest: str) -> None:
        known = self._known.setdefault(namespace, OrderedDict())
        known[digest] = None
        known.move_to_end(digest)
        while len(known) > self.max_entries:
            known.popitem(last=False)

    def known_ids(self, namespace: str, digest: str) -> tuple[int, ...] | None:
        if digest not in self._known.get(namespace, {}):
            return None
        return self._ids.get(digest)

    def forget(self, namespace: str) -> None:
        self._known.pop(namespace, None)


def resolve_segments(segments: list[SegmentInput], tenant: str, namespace: str, memo: TokenMemo,
                     registry: SegmentRegistry) -> list[ResolvedSegment]:
    """Check and tokenize every segment before any compute. Raises 400 for a hash
    that does not match, 404 for an unknown registry name, 409 for a hash-only
    segment this tenant never sent."""
    out = []
    for i, seg in enumerate(segments):
        where = f"segments[{i}]"
        if seg.hash is not None and not is_digest(seg.hash):
            raise EngineError(f"segment {seg.id!r}: hash must be 'sha256:' followed by 64 lowercase "
                              f"hex digits, got {seg.hash!r}", f"{where}.hash")
        content = seg.content
        if content is None and seg.name is not None:
            entry = registry.get(tenant, seg.name)
            if entry is None:
                raise NotFoundError(f"segment {seg.id!r} refers to the registered name {seg.name!r}, "
                                    f"which does not exist (PUT /v1/segments/{seg.name} first, or send "
                                    "its content)", f"{where}.name")
            content = entry.content
        if content is not None:
            digest = segment_digest(content)
            if seg.hash is not None and seg.hash != digest:
                raise SegmentMismatchError(f"segment {seg.id!r}: hash {seg.hash} does not match the "
                                           f"sha256 of its content ({digest})", f"{where}.hash")
            out.append(ResolvedSegment(seg.id, digest, memo.ids_for(content, digest), seg.ttl_s))
            memo.remember(namespace, digest)
            continue
        if seg.hash is None:
            raise EngineError(f"segment {seg.id!r} needs 'content', or a 'hash' or 'name' the server "
                              "already holds", where)
        ids = memo.known_ids(namespace, seg.hash)
        if ids is None:
            raise SegmentUnknownError(f"segment {seg.id!r} was sent without content and the server "
                                      f"does not hold {seg.hash}; send its content", f"{where}.content")
        out.append(ResolvedSegment(seg.id, seg.hash, ids, seg.ttl_s))
    return out


def group_units(parts: list[PromptPart], segments: list[ResolvedSegment]) -> Prompt:
    """Split segment-aligned ``parts`` into one unit per segment and the tail."""
    units: list[Unit] = []
    pending: list[int] = []
    for part in parts:
        if part.kind == "segment":
            units.append(Unit(segments[part.index], tuple(pending) + part.ids))
            pending = []
        else:
            pending.extend(part.ids)
    return Prompt(units, tuple(pending))
