"""Replay a trace through two cache models and count the prompt tokens that hit.

- **plain prefix caching** (vLLM/SGLang-style automatic prefix caching): the
  longest common token prefix of the flat prompt, as sent, with any earlier
  prompt of the same tenant on the same replica;
- **segcache**: the segment tree with automatic segmentation: a unit hits when
  the chain digest after it was stored before (the whole chain of units before
  it matched), exactly as ``segcache.kv.autoseg`` + ``kv.hashing`` name nodes.

Both models also hold what the model generated: a request whose prompt ends
where an earlier prompt ended, followed by an assistant message, is taken to
be replaying that earlier request's reply (``Request.reply`` overrides), which
both kinds of cache keep. A prompt becomes visible ``warm_delay_s`` after its
timestamp (immediately for requests without one), which is what makes a
parallel fan-out miss. Every request recomputes at least one token.

Per-request results: ``(plain_total, plain_hit, seg_total, seg_hit)``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from segcache.kv.autoseg import reply_digest
from segcache.kv.hashing import chain_digest, namespace_digest
from segcache.lint.trace import frame
from segcache.lint.view import MODEL_FINGERPRINT, RequestView


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

    def summary(self) -> dict[str, float | int]:
        return {"requests": len(self.per_request),
                "plain_prompt_tokens": self._sum(0), "plain_cached_tokens": self._sum(1),
                "plain_hit_rate": round(self.plain_rate, 4),
                "segcache_prompt_tokens": self._sum(2), "segcache_cached_tokens": self._sum(3),
                "segcache_hit_rate": round(self.seg_rate, 4)}


class CacheSim:
    """Both cache models, keyed by (tenant, replica). Unbounded: no eviction,
    so the rates are what the prompt shape and routing allow."""

    def __init__(self, warm_delay_s: float = 0.0) -> None:
        self.warm_delay_s = warm_delay_s
        self.result = SimResult()
        self._radix: dict[tuple[str, str], TokenRadix] = {}
        self._chains: dict[tuple[str, str], set[str]] = {}
        self._ends: dict[tuple[str, str], set[str]] = {}  # chains where a prompt ended
        self._pending: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def observe(self, view: RequestView) -> tuple[int, int, int, int]:
        t = view.request.timestamp
        self._flush(t)
        key = (view.request.tenant, view.request.replica or "")
        radix = self._radix.setdefault(key, TokenRadix())
        chains = self._chains.setdefault(key, set())
        ends = self._ends.setdefault(key, set())
        flat = tuple(itertools.chain.from_iterable(view.plain_ids)) + view.generation_ids
        plain_hit = self._plain_hit(view, radix, flat)
        seg_hit = self._seg_hit(view, chains, ends)
        row = (len(flat), min(plain_hit, len(flat) - 1), view.seg_total, min(seg_hit, view.seg_total - 1))
        self.result.per_request.append(row)
        store = self._store_action(view, radix, chains, ends, flat)
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

    def _seg_hit(self, view: RequestView, chains: set[str], ends: set[str]) -> int:
        hit = 0
        parent = namespace_digest(view.request.tenant, MODEL_FINGERPRINT)
        for i, (u, chain) in enumerate(zip(view.units, view.chains, strict=True)):
            if chain not in chains:
                if not (u.kind == "message" and u.role == "assistant" and parent in ends):
                    break
                chains.add(chain)  # an earlier prompt's reply, stored under its reply digest
            hit += view.tokens[i]
            parent = chain
        return hit

    def _store_action(self, view: RequestView, radix: TokenRadix, chains: set[str],
                      ends: set[str], flat: tuple[int, ...]) -> Callable[[], None]:
        reply = view.request.reply
        last = view.chains[-1] if view.chains else namespace_digest(view.request.tenant, MODEL_FINGERPRINT)
        reply_ids = view.counter.encode(frame("assistant", reply)) if reply is not None else ()

        def store() -> None:
            radix.insert(flat)
            chains.update(view.chains)
            ends.add(last)
            if reply is not None:
                radix.insert(flat[:len(flat) - len(view.generation_ids)] + reply_ids, terminal=False)
                chains.add(chain_digest(last, reply_digest(reply)))

        return store
