"""Replay a trace through two cache models and count the prompt tokens that hit.

- **plain prefix caching** (vLLM/SGLang-style automatic prefix caching): the
  longest common token prefix of the flat prompt, as sent, with any earlier
  prompt of the same tenant on the same replica;
- **segcache**: the segment tree with automatic segmentation, as the engine runs
  it, with the same code (``kv.autoseg``, ``kv.hashing``, ``kv.partial``,
  ``kv.chunking``):

  1. the unit walk: a unit hits when the chain digest after it was stored
     before (the whole chain of units before it matched);
  2. a partial hit on the first unit that misses: the head it shares with a
     stored sibling (same parent), as ``kv.partial.reusable_tokens`` allows for
     the server's prefill chunk and model plan, over the server's unit ids (the
     template text before the block, then the block);
  3. blending (``blend``, as ``segcache serve --blend``): from the first later
     unit with a position-free copy, every such unit is reused where it now
     stands; eligible are segments marked ``reuse: "anywhere"`` and, under
     ``auto``, every segment and the content-defined chunks (``kv.chunking``)
     that plain messages are cut into. Nothing after a blend point is kept.

Both models also hold what the model generated: a request whose prompt ends
where an earlier prompt ended, followed by an assistant message, is taken to
be replaying that earlier request's reply (``Request.reply``, when the trace
has it, replaces the guess), which both kinds of cache keep. A prompt becomes
visible ``warm_delay_s`` after its timestamp (immediately for requests without
one), which is what makes a parallel fan-out miss. Every request recomputes at
least one token.

Per-request results: ``(plain_total, plain_hit, seg_total, seg_hit)``, and in
``SimResult.reuse`` the part of ``seg_hit`` that came from partial hits and from
blending (the non-prefix hits).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from segcache.config import BLEND_MODES
from segcache.kv.autoseg import chunk_digest, message_pieces, reply_digest
from segcache.kv.hashing import chain_digest, namespace_digest
from segcache.kv.partial import reusable_tokens
from segcache.lint.trace import GENERATION_PROMPT, Unit, frame
from segcache.lint.view import MODEL_FINGERPRINT, RequestView

END = "<|im_end|>\n"


class _Node:
    __slots__ = ("edge", "children", "terminal")

    def __init__(self, edge: tuple[int, ...] = ()) -> None:
        self.edge = edge
        self.children: dict[int, _Node] = {}
        self.terminal = False


def _common(edge: tuple[int, ...], ids: tuple[int, ...], i: int) -> int:
    """Length of the common prefix of ``edge`` and ``ids[i:]`` (slice compare first: C speed)."""
    n = min(len(edge), len(ids) - i)
    if ids[i:i + n] == edge[:n]:
        return n
    k = 0
    while edge[k] == ids[i + k]:
        k += 1
    return k


class TokenRadix:
    """A compressed trie over token ids: ``match`` is the longest common prefix
    with anything inserted; ``terminal`` marks where an inserted prompt ended."""

    def __init__(self) -> None:
        self.root = _Node()

    def _walk(self, ids: tuple[int, ...]) -> tuple[int, _Node | None]:
        """(tokens matched, node where the match ends exactly, else None)."""
        node, i = self.root, 0
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                return i, None
            edge = child.edge
            k = _common(edge, ids, i)
            i += k
            if k < len(edge):
                return i, None
            node = child
        return i, node

    def match(self, ids: tuple[int, ...]) -> int:
        return self._walk(ids)[0]

    def is_terminal(self, ids: tuple[int, ...]) -> bool:
        matched, node = self._walk(ids)
        return matched == len(ids) and node is not None and node.terminal

    def insert(self, ids: tuple[int, ...], terminal: bool = True) -> None:
        node, i = self.root, 0
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                child = _Node(ids[i:])
                node.children[ids[i]] = child
                node, i = child, len(ids)
                break
            edge = child.edge
            k = _common(edge, ids, i)
            if k < len(edge):  # split the edge at k
                mid = _Node(edge[:k])
                child.edge = edge[k:]
                mid.children[child.edge[0]] = child
                node.children[ids[i]] = mid
                child = mid
            node, i = child, i + k
        if terminal:
            node.terminal = True


@dataclass
class SimResult:
    per_request: list[tuple[int, int, int, int]] = field(default_factory=list)
    # Per request, the part of the segcache hit that came from a partial hit on
    # the first missed unit, and from blending units at another position.
    reuse: list[tuple[int, int]] = field(default_factory=list)

    def _sum(self, col: int) -> int:
        return sum(r[col] for r in self.per_request)

    @property
    def plain_rate(self) -> float:
        total = self._sum(0)
        return self._sum(1) / total if total else 0.0

    @property
    def seg_rate(self) -> float:
        total = self._sum(2)
        return self._sum(3) / total if total else 0.0

    @property
    def partial_tokens(self) -> int:
        return sum(r[0] for r in self.reuse)

    @property
    def blended_tokens(self) -> int:
        return sum(r[1] for r in self.reuse)

    @property
    def nonprefix_rate(self) -> float:
        """Share of the prompt tokens segcache reuses by blending (non-prefix hits)."""
        total = self._sum(2)
        return self.blended_tokens / total if total else 0.0

    def summary(self) -> dict[str, float | int]:
        return {"requests": len(self.per_request),
                "plain_prompt_tokens": self._sum(0), "plain_cached_tokens": self._sum(1),
                "plain_hit_rate": round(self.plain_rate, 4),
                "segcache_prompt_tokens": self._sum(2), "segcache_cached_tokens": self._sum(3),
                "segcache_hit_rate": round(self.seg_rate, 4),
                "segcache_partial_tokens": self.partial_tokens,
                "segcache_blended_tokens": self.blended_tokens,
                "segcache_nonprefix_hit_rate": round(self.nonprefix_rate, 4)}


@dataclass(frozen=True)
class SimUnit:
    """One node of the segcache model. ``n`` tokens count when it hits (the ChatML
    frame's tokens, as ``RequestView.tokens``); ``ids`` are the server's unit ids
    (the template text before the block, ``lead`` of them, then the block), what a
    partial hit compares; ``blend_key`` names its content where it may be blended."""

    digest: str
    n: int
    ids: tuple[int, ...]
    lead: int
    blend_key: str | None
    reply: bool  # an assistant message: may be a kept reply


def _anywhere(view: RequestView, unit: Unit) -> bool:
    segments = view.request.body.get("segments") or []
    return unit.kind == "segment" and segments[unit.index].get("reuse") == "anywhere"


def sim_units(view: RequestView, blend: str) -> list[SimUnit]:
    """The units the server caches for ``view`` (``engine.prompt.build_prompt``): its
    units as they are, except under ``blend="auto"``, where the content of every
    message but an assistant's (a kept reply stays whole) is cut into
    ``kv.chunking`` chunks, one unit each (``kv.autoseg.chunk_digest``) when there
    are two or more. Blendable (``engine.blend``): segments marked ``reuse:
    "anywhere"`` unless ``blend="off"``, and under ``"auto"`` every segment and
    chunk unit; a message unit never."""
    out: list[SimUnit] = []
    enc = view.counter.encode
    for i, u in enumerate(view.units):
        lead = (END if i else "") + f"<|im_start|>{u.role}\n"
        pieces = message_pieces(u.role, u.content, blend == "auto" and u.kind == "message")
        if len(pieces) <= 1:
            eligible = u.kind == "segment" and (blend == "auto" or blend == "marked" and _anywhere(view, u))
            out.append(SimUnit(u.digest, view.tokens[i], enc(lead) + enc(u.content), len(enc(lead)),
                               u.digest if eligible and u.content else None,
                               u.kind == "message" and u.role == "assistant"))
            continue
        for k, piece in enumerate(pieces):
            head = enc(lead) if k == 0 else ()
            n = (len(enc(f"<|im_start|>{u.role}\n")) if k == 0 else 0) + len(enc(piece))
            n += len(enc(END)) if k == len(pieces) - 1 else 0
            digest = chunk_digest(u.role, k, piece)  # the linter's template drops ``name``
            out.append(SimUnit(digest, n, head + enc(piece), len(head), digest, False))
    return out


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """``kv.partial.common_prefix`` at C speed: bisect on slice equality."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class _Cache:
    """One (tenant, replica)'s segcache model: stored chains, the chains where a
    prompt ended (its reply is kept there), each node's children's ids (for partial
    hits) and the contents that can be blended anywhere."""

    chains: set[str] = field(default_factory=set)
    ends: set[str] = field(default_factory=set)
    # (parent chain, bucket: ``CacheSim._bucket``) -> {child digest: its unit ids}
    children: dict[tuple[str, tuple[int, ...]], dict[str, tuple[int, ...]]] = field(default_factory=dict)
    anywhere: set[str] = field(default_factory=set)


class CacheSim:
    """Both cache models, keyed by (tenant, replica). Unbounded: no eviction,
    so the rates are what the prompt shape and routing allow.

    The segcache model follows the server: the unit walk over chain digests; at
    the first unit that misses, a partial hit on the head it shares with a
    stored sibling (``kv.partial.reusable_tokens`` with ``prefill_chunk`` and
    ``independent_rows``, as the engine calls it); after it, units whose content
    was cached anywhere are blended (``blend``: "off", "marked", "auto", as
    ``segcache serve --blend``). Blended tokens count as hits and are reported
    apart (``SimResult.reuse``); the few a blend recomputes are not modelled."""

    def __init__(self, warm_delay_s: float = 0.0, blend: str = "marked", prefill_chunk: int = 256,
                 independent_rows: int = 0) -> None:
        if blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {', '.join(BLEND_MODES)}, got {blend!r}")
        self.warm_delay_s = warm_delay_s
        self.blend = blend
        self.prefill_chunk = prefill_chunk
        self.independent_rows = independent_rows
        self.result = SimResult()
        self._radix: dict[tuple[str, str], TokenRadix] = {}
        self._caches: dict[tuple[str, str], _Cache] = {}
        self._pending: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def observe(self, view: RequestView) -> tuple[int, int, int, int]:
        t = view.request.timestamp
        self._flush(t)
        key = (view.request.tenant, view.request.replica or "")
        radix = self._radix.setdefault(key, TokenRadix())
        cache = self._caches.setdefault(key, _Cache())
        flat = tuple(itertools.chain.from_iterable(view.plain_ids)) + view.generation_ids
        plain_hit = self._plain_hit(view, radix, flat)
        units = sim_units(view, self.blend)
        root = namespace_digest(view.request.tenant, MODEL_FINGERPRINT)
        chains = list(itertools.accumulate((u.digest for u in units), chain_digest, initial=root))
        seg_total = sum(u.n for u in units) + len(view.generation_ids)
        prefix, partial, blended, at = self._seg_hit(units, chains, cache)
        row = (len(flat), min(plain_hit, len(flat) - 1), seg_total,
               min(prefix + partial + blended, seg_total - 1))
        self.result.per_request.append(row)
        self.result.reuse.append((partial, blended))
        store = self._store_action(view, radix, cache, flat, units, chains, at)
        if t is None or self.warm_delay_s == 0:
            store()
        else:
            heapq.heappush(self._pending, (t + self.warm_delay_s, next(self._seq), store))
        return row

    def _flush(self, t: float | None) -> None:
        while self._pending and (t is None or self._pending[0][0] <= t):
            heapq.heappop(self._pending)[2]()

    def _plain_hit(self, view: RequestView, radix: TokenRadix, flat: tuple[int, ...]) -> int:
        gen = view.generation_ids
        for i, u in enumerate(view.units):
            if u.kind == "message" and u.role == "assistant":
                start = view.token_starts[i]
                if radix.is_terminal(flat[:start] + gen):  # an earlier prompt's reply
                    radix.insert(flat[:start + len(view.plain_ids[i])], terminal=False)
        return radix.match(flat)

    def _seg_hit(self, units: list[SimUnit], chains: list[str], cache: _Cache) -> tuple[int, int, int, int]:
        """(prefix tokens, partial-hit tokens, blended tokens, blend point) as the
        engine runs it: the exact walk over chain digests (``chains[i]`` is the chain
        before unit ``i``); then, from the first unit after it with a position-free
        copy (the blend point; ``len(units)`` if none), every such unit is blended;
        units between the walk and the blend point are computed exactly, the first
        of them after the head a stored sibling shares (a partial hit)."""
        hit = 0
        for i, u in enumerate(units):
            if chains[i + 1] not in cache.chains:
                if not (u.reply and chains[i] in cache.ends):
                    break
                cache.chains.add(chains[i + 1])  # an earlier prompt's reply, stored under its reply digest
            hit += u.n
        else:
            return hit, 0, 0, len(units)
        found = [j for j in range(i, len(units)) if units[j].blend_key in cache.anywhere]
        at = found[0] if found else len(units)
        siblings = cache.children.get(self._bucket(chains[i], units[i].ids), {})
        partial = self._partial(units[i], siblings) if at > i and self.prefill_chunk > 0 else 0
        blended = sum(len(units[j].ids) - units[j].lead for j in found)
        return hit, partial, blended, at

    def _bucket(self, parent: str, ids: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        """Where a child's ids are filed for partial hits. Where a partial hit is
        rounded down to whole prefill chunks, only a sibling with the same first
        chunk can give one: file by it, so a wide node is not scanned whole."""
        if 2 <= self.prefill_chunk <= self.independent_rows:
            return parent, ()
        return parent, ids[:self.prefill_chunk]

    def _partial(self, unit: SimUnit, siblings: dict[str, tuple[int, ...]]) -> int:
        """Tokens of ``unit``'s head a stored sibling shares that the server reuses."""
        best, common = None, 0
        for ids in siblings.values():
            n = common_prefix(ids, unit.ids)
            if n > common:
                best, common = ids, n
        if best is None:
            return 0
        return reusable_tokens(common, len(unit.ids), len(best), self.prefill_chunk, self.independent_rows)

    def _store_action(self, view: RequestView, radix: TokenRadix, cache: _Cache, flat: tuple[int, ...],
                      units: list[SimUnit], chains: list[str], at: int) -> Callable[[], None]:
        """What the request leaves in the caches: the tree keeps its units before the
        blend point ``at`` (a blended request's later KV is approximate: neither they
        nor its reply are kept), every eligible unit gets its position-free copy."""
        reply = view.request.reply if at == len(units) else None
        reply_ids = view.counter.encode(frame("assistant", reply)) if reply is not None else ()

        def store() -> None:
            radix.insert(flat)
            cache.chains.update(chains[1:at + 1])
            if at == len(units) and view.request.reply is None:
                cache.ends.add(chains[-1])  # unknown reply: an assistant message right after is taken as it
            for parent, u in zip(chains[:at], units, strict=False):
                cache.children.setdefault(self._bucket(parent, u.ids), {})[u.digest] = u.ids
            cache.anywhere.update(u.blend_key for u in units if u.blend_key is not None)
            if reply is not None:
                radix.insert(flat[:len(flat) - len(view.generation_ids)] + reply_ids, terminal=False)
                digest = reply_digest(reply)
                cache.chains.add(chain_digest(chains[-1], digest))
                # A kept reply holds the generation prompt and the generated ids.
                ids = view.counter.encode(END + GENERATION_PROMPT) + view.counter.encode(reply)
                cache.children.setdefault(self._bucket(chains[-1], ids), {})[digest] = ids

        return store
