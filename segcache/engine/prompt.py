"""From a request to a cache-aligned prompt: resolve segments (content, hash or
registry name), tokenize with memoisation, and group the prompt into units.

A *unit* is what one segment-tree node stores: the template text right before
a segment, the tools block or a message, plus that block's tokens. Units come in
prompt order: explicit segments, then the leading system message and the tools
block after it (or the tools block first when there is no leading system
message), then one per message (see ``segcache.kv.autoseg``). Everything after the last unit is the *tail* (the
generation prompt), always computed.

No torch here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from segcache.engine.types import (
    EngineError,
    NotFoundError,
    SegmentInput,
    SegmentMismatchError,
    SegmentUnknownError,
)
from segcache.kv.autoseg import (
    chunk_digest,
    message_digest,
    message_pieces,
    message_text,
    tools_after_system,
    tools_block,
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
    anywhere: bool = False


@dataclass(frozen=True)
class UnitKey:
    id: str  # the client's segment id, "tools", "messages[i]" or "messages[i].chunks[k]"
    kind: Literal["segment", "tools", "message", "chunk"]  # chunk: of a message (--blend auto)
    digest: str  # the tree key under the previous unit
    ttl_s: float | None = None
    anywhere: bool = False  # the client marked the segment reuse: "anywhere"


@dataclass(frozen=True)
class Unit:
    key: UnitKey
    ids: tuple[int, ...]  # template text before the block + the block's tokens
    lead: int = 0  # how many of ``ids`` are template text (the block is ids[lead:])

    @property
    def block(self) -> tuple[int, ...]:
        return self.ids[self.lead:]


@dataclass(frozen=True)
class Prompt:
    units: list[Unit]
    tail: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return sum(len(u.ids) for u in self.units) + len(self.tail)


def ids_bytes(n_tokens: int) -> int:
    """Memory of a tuple of ``n_tokens`` token ids (8-byte slots + 28-byte ints)."""
    return 64 + 36 * n_tokens


class TokenMemo:
    """(namespace, digest) -> token ids of content that tenant sent. Per tenant: a
    hash-only reference resolves only within the tenant that sent the content, and
    one tenant's tokenizations never speed up (so never reveal anything to) another.
    Bounded in bytes (``ids_bytes``): at most ``tenant_max_bytes`` per namespace and
    ``max_bytes`` in all, least recently used out first; contents longer than
    ``max_tokens`` (the context window: they will be refused) are not kept; ``forget``
    frees a namespace's entries. Thread-safe, and tokenization runs outside its lock
    (one request's long content never holds up another's)."""

    def __init__(self, tokenizer: ChatTokenizer, max_bytes: int = 64 << 20,
                 tenant_max_bytes: int = 32 << 20, max_tokens: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens  # longer contents cannot fit a prompt: never kept
        self.max_bytes = max_bytes
        self.tenant_max_bytes = tenant_max_bytes
        self._lru: OrderedDict[tuple[str, str], tuple[int, ...]] = OrderedDict()
        self._tenant: dict[str, OrderedDict[str, None]] = {}  # namespace -> its digests, LRU
        self._tenant_bytes: dict[str, int] = {}
        self.bytes = 0
        self._lock = threading.Lock()

    def ids_for(self, namespace: str, content: str, digest: str,
                pending: dict[str, tuple[int, ...]] | None = None) -> tuple[int, ...]:
        """The ids of ``content`` (tokenized as plain text), remembered for ``namespace``;
        with ``pending``, new ids are kept there until ``commit`` (a request that is
        then refused leaves nothing behind)."""
        ids = self.known_ids(namespace, digest)
        if ids is None and pending is not None:
            ids = pending.get(digest)
        if ids is None:
            ids = tuple(self.tokenizer.encode(content))
            if pending is not None:
                pending[digest] = ids
            else:
                self.commit(namespace, {digest: ids})
        return ids

    def commit(self, namespace: str, pending: dict[str, tuple[int, ...]]) -> None:
        with self._lock:
            for digest, ids in pending.items():
                if (namespace, digest) not in self._lru:
                    self._add(namespace, digest, ids)

    def known_ids(self, namespace: str, digest: str) -> tuple[int, ...] | None:
        with self._lock:
            ids = self._lru.get((namespace, digest))
            if ids is not None:
                self._lru.move_to_end((namespace, digest))
                self._tenant[namespace].move_to_end(digest)
            return ids

    def tenant_bytes(self, namespace: str) -> int:
        return self._tenant_bytes.get(namespace, 0)

    def forget(self, namespace: str) -> None:
        with self._lock:
            for digest in list(self._tenant.get(namespace, ())):
                self._drop(namespace, digest)

    def _add(self, namespace: str, digest: str, ids: tuple[int, ...]) -> None:
        size = ids_bytes(len(ids))
        too_long = self.max_tokens is not None and len(ids) > self.max_tokens
        if too_long or size > min(self.tenant_max_bytes, self.max_bytes):
            return  # used once (to be refused, or as the one big prompt), never kept
        self._lru[(namespace, digest)] = ids
        self._tenant.setdefault(namespace, OrderedDict())[digest] = None
        self._tenant_bytes[namespace] = self.tenant_bytes(namespace) + size
        self.bytes += size
        known = self._tenant[namespace]
        while self._tenant_bytes[namespace] > self.tenant_max_bytes:
            self._drop(namespace, next(iter(known)))
        while self.bytes > self.max_bytes:
            self._drop(*next(iter(self._lru)))

    def _drop(self, namespace: str, digest: str) -> None:
        ids = self._lru.pop((namespace, digest))
        size = ids_bytes(len(ids))
        self.bytes -= size
        self._tenant_bytes[namespace] -= size
        known = self._tenant[namespace]
        del known[digest]
        if not known:
            del self._tenant[namespace], self._tenant_bytes[namespace]


def resolve_segments(segments: list[SegmentInput], tenant: str, namespace: str, memo: TokenMemo,
                     registry: SegmentRegistry,
                     pending: dict[str, tuple[int, ...]] | None = None) -> list[ResolvedSegment]:
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
            out.append(ResolvedSegment(seg.id, digest,
                                       memo.ids_for(namespace, content, digest, pending),
                                       seg.ttl_s, seg.reuse == "anywhere"))
            continue
        if seg.hash is None:
            raise EngineError(f"segment {seg.id!r} needs 'content', or a 'hash' or 'name' the server "
                              "already holds", where)
        ids = memo.known_ids(namespace, seg.hash)
        if ids is None:
            raise SegmentUnknownError(f"segment {seg.id!r} was sent without content and the server "
                                      f"does not hold {seg.hash}; send its content", f"{where}.content")
        out.append(ResolvedSegment(seg.id, seg.hash, ids, seg.ttl_s, seg.reuse == "anywhere"))
    return out


def group_units(parts: list[PromptPart], lead: list[UnitKey], messages: list[UnitKey]) -> Prompt:
    """Split segment-aligned ``parts`` into one unit per lead block (segments,
    tools) and per message, and the tail."""
    units: list[Unit] = []
    pending: list[int] = []
    for part in parts:
        if part.kind == "template":
            pending.extend(part.ids)
            continue
        key = lead[part.index] if part.kind == "segment" else messages[part.index]
        units.append(Unit(key, tuple(pending) + part.ids, len(pending)))
        pending = []
    return Prompt(units, tuple(pending))


def build_prompt(tokenizer: ChatTokenizer, memo: TokenMemo, namespace: str,
                 segments: list[ResolvedSegment], messages: list[dict[str, Any]],
                 tools: list[dict[str, Any]], generation_prompt: bool,
                 pending: dict[str, tuple[int, ...]] | None = None,
                 chunks: bool = False) -> Prompt:
    """The unit layout of a chat request. Raises TemplateError if the template
    cannot render it segment-aligned. ``chunks`` (``--blend auto``): the content of
    every message but an assistant's (its reply is kept as one unit) is cut into
    content-defined chunks (``kv.chunking``), one unit each, so a block of it is
    found again at any position."""
    lead = [UnitKey(s.id, "segment", s.digest, s.ttl_s, s.anywhere) for s in segments]
    lead_ids = [list(s.ids) for s in segments]
    trailing: list[list[int]] = []
    if tools:
        block = tools_block(tools)
        digest = segment_digest(block)
        lead.append(UnitKey("tools", "tools", digest))
        ids = list(memo.ids_for(namespace, block, digest, pending))
        (trailing if tools_after_system(messages) else lead_ids).append(ids)
    render = []
    keys = []
    pieces = []
    with_name = tokenizer.renders_name
    for i, m in enumerate(messages):
        text = message_text(m)
        msg = {"role": m.get("role"), "content": text}
        if with_name and m.get("name") is not None:
            msg["name"] = m["name"]
        render.append(msg)
        texts = message_pieces(str(m.get("role")), text, chunks)
        pieces.append(texts)
        if len(texts) == 1:
            keys.append(UnitKey(f"messages[{i}]", "message", message_digest(m, with_name)))
            continue
        name = m.get("name") if with_name else None
        keys.extend(UnitKey(f"messages[{i}].chunks[{k}]", "chunk",
                            chunk_digest(str(m.get("role")), k, piece, name))
                    for k, piece in enumerate(texts))
    parts = tokenizer.prompt_parts(render, lead_ids, generation_prompt, trailing,
                                   pieces if chunks else None)
    return group_units(parts, lead, keys)


def sink_ids(tokenizer: ChatTokenizer) -> tuple[int, ...]:
    """The template's opening tokens, the ones before the first segment of any
    chat prompt: the fixed context a position-independent segment is computed
    behind (its own KV is dropped)."""
    parts = tokenizer.prompt_parts([], [[]], False)
    lead: list[int] = []
    for part in parts:
        if part.kind != "template":
            break
        lead.extend(part.ids)
    return tuple(lead)
