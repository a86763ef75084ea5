"""The segment tree: which KV is cached, under which namespace, after which segments.

One root per namespace digest (tenant + model fingerprint); below it, children
keyed by segment digest. A node holds an opaque handle to the KV of *its own*
tokens only; the KV of a prefix is the concatenation of the handles along the
path from the root. The tree never looks inside a handle: it is pure Python
bookkeeping (digests, token ids, byte counts, pins, clocks) so it can be
tested and simulated without a model.

Contracts, in one place:

- **Mutation.** ``match`` mutates (hit counters, ``last_use``, TTL refresh and
  removal of expired nodes it walks into); ``insert``, ``evict_until``,
  ``enforce_quota``, ``expire``, ``purge``, ``set_ttl``, ``pin`` and
  ``unpin`` mutate; ``peek``, ``nodes``, ``get_by_chain``, ``path_to``,
  ``stats``, byte counters and ``check_integrity`` do not.
- **Pinning.** A node used by a running request must be pinned between its
  ``match``/``insert`` and the end of the request. A pinned node is never
  evicted, expired or purged, and since only leaves are evicted and expiry and
  purge skip subtrees that hold a pin, pinning a node protects its whole path.
  Pins are reference counts; the caller must unpin exactly what it pinned.
- **Removal.** Every node that leaves the tree is reported exactly once to
  ``on_remove(node, reason)`` with ``reason`` in ``REMOVE_REASONS``, after it
  has been unlinked, children before parents. ``"replace"`` is the exception:
  the node stays and only its old handle is reported (see ``insert``). The
  callback frees or demotes ``node.handle``; it must not raise or call back
  into the tree. Removal methods also return the removed nodes.
- **Budget.** ``insert`` never evicts: after inserting, the caller runs
  ``evict_until`` (and ``enforce_quota``). Roots hold no KV and are never
  removed.
- **Not thread-safe.** The engine owns the tree and serialises calls.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from segcache.kv.hashing import PREFIX, chain_digest
from segcache.kv.integrity import require
from segcache.kv.lru_tree import Clock, LruTree, TreeNode, preorder
from segcache.kv.partial import common_prefix

REMOVE_REASONS = ("evict", "expire", "purge", "replace")
_COUNTER_NAMES = {
    "evict": "evictions",
    "expire": "expirations",
    "purge": "purged",
    "replace": "replacements",
}

OnRemove = Callable[["SegmentNode", str], None]


@dataclass(eq=False)
class SegmentNode(TreeNode):
    """One segment's KV, addressed by ``chain`` = H(parent.chain, digest).

    ``handle`` is the engine's opaque KV for ``token_ids`` only, shape
    ``[n_layers, 2, n_kv_heads, n_tokens, head_dim]`` when it is a tensor.
    For a root, ``digest == chain == namespace``, ``nbytes == 0`` and
    ``handle is None``. Identity equality: two nodes are equal only if they
    are the same object. Fields are owned by the tree; read, don't write.
    """

    namespace: str
    digest: str
    chain: str
    parent: SegmentNode | None = field(repr=False)
    depth: int = 0
    token_ids: tuple[int, ...] = ()
    handle: object | None = field(default=None, repr=False)
    nbytes: int = 0
    hits: int = 0
    last_use: float = 0.0
    created: float = 0.0
    ttl_s: float | None = None
    expires_at: float | None = None
    pins: int = 0
    seq: int = 0  # creation order; breaks LRU ties deterministically
    children: dict[str, SegmentNode] = field(default_factory=dict, repr=False)


class SegmentTree(LruTree[SegmentNode]):
    """Index of cached segment KV: one tree per namespace, LRU leaf eviction.

    ``budget_bytes`` bounds ``resident_bytes`` after ``evict_until``;
    ``tenant_quota_bytes`` (optional) bounds each namespace after
    ``enforce_quota``. ``clock`` returns seconds (monotonic); inject a fake
    one in tests. See the module docstring for the mutation, pinning and
    removal contracts. ``check_integrity`` adds to the checks of
    ``LruTree``: child keys, depths, chain digests, the chain index and the
    node count.
    """

    def __init__(
        self,
        budget_bytes: int,
        *,
        clock: Clock = time.monotonic,
        on_remove: OnRemove | None = None,
        tenant_quota_bytes: int | None = None,
    ) -> None:
        super().__init__(budget_bytes, clock=clock, on_remove=on_remove)
        if tenant_quota_bytes is not None and tenant_quota_bytes < 0:
            raise ValueError(f"tenant_quota_bytes must be >= 0, got {tenant_quota_bytes}")
        self.tenant_quota_bytes = tenant_quota_bytes
        self._by_chain: dict[str, SegmentNode] = {}
        self._count = 0

    @classmethod
    def create_simulated(
        cls,
        budget_bytes: int = 1 << 30,
        *,
        clock: Clock = time.monotonic,
        on_remove: OnRemove | None = None,
        tenant_quota_bytes: int | None = None,
    ) -> SegmentTree:
        """A tree for tests and simulations: no engine, handles may be any object."""
        return cls(
            budget_bytes, clock=clock, on_remove=on_remove, tenant_quota_bytes=tenant_quota_bytes
        )

    # ----------------------------------------------------------------- lookup

    def root(self, namespace: str) -> SegmentNode:
        """The root of ``namespace``, created on first use. Raises ValueError on ""."""
        return self._root(namespace)

    def match(self, namespace: str, digests: Sequence[str]) -> list[SegmentNode]:
        """Longest cached prefix of ``digests`` under ``namespace`` (root excluded).

        Walks from the root and stops at the first digest with no live child.
        A pinned child is live even past ``expires_at`` (its KV is in use).
        An expired, unpinned child is a miss; it is removed with its subtree
        (reason "expire") unless the subtree holds a pin. Every matched node
        gets ``hits += 1``, ``last_use = now`` and, if it has a TTL,
        ``expires_at = now + ttl_s``. Does NOT pin: pin the result before
        using its handles. An unknown namespace matches nothing and creates
        no root.
        """
        node = self._roots.get(namespace)
        if node is None:
            return []
        now = self._clock()
        matched: list[SegmentNode] = []
        for digest in digests:
            child = node.children.get(digest)
            if child is None:
                break
            if self._is_expired(child, now):
                if not self._subtree_has_pins(child):
                    self._remove_subtree(child, "expire")
                break
            self._touch(child, now)
            matched.append(child)
            node = child
        return matched

    def peek(self, namespace: str, digests: Sequence[str]) -> list[SegmentNode]:
        """What ``match`` would return now, without its effects: no hit counters,
        ``last_use`` or TTL refresh, no removal, no root created. An expired,
        unpinned node ends the prefix (it is a miss) but stays until a mutating
        call removes it. For estimates and presence checks; pin a ``match``
        result, not a peek, before using handles."""
        node = self._roots.get(namespace)
        if node is None:
            return []
        now = self._clock()
        found: list[SegmentNode] = []
        for digest in digests:
            node = node.children.get(digest)
            if node is None or self._is_expired(node, now):
                break
            found.append(node)
        return found

    def closest_child(self, parent: SegmentNode,
                      token_ids: Sequence[int]) -> tuple[SegmentNode | None, int]:
        """The live child of ``parent`` whose tokens share the longest common prefix
        with ``token_ids``, and that length ((None, 0) when none shares a token). For
        partial hits (``kv.partial``): the child's KV before it is ``parent``'s, so its
        first tokens' KV is what ``token_ids`` would compute there. Read-only, as
        ``peek``; a child with a handle only (not a lower tier's placeholder). Pin the
        child before using its handle. Ties go to the most recently used child."""
        now = self._clock()
        best: SegmentNode | None = None
        best_n = 0
        for child in parent.children.values():
            if child.handle is None or self._is_expired(child, now):
                continue
            n = common_prefix(child.token_ids, token_ids)
            if n > best_n or (n == best_n and n and best is not None
                              and child.last_use > best.last_use):
                best, best_n = child, n
        return best, best_n

    def touch(self, node: SegmentNode) -> None:
        """Count a use of ``node`` that ``match`` did not make (a partial hit on it):
        ``hits``, ``last_use`` and its TTL refreshed, as ``match`` does."""
        self._touch(node, self._clock())

    def get_by_chain(self, chain: str) -> SegmentNode | None:
        """The node (root included) whose chain digest is ``chain``, if cached."""
        return self._by_chain.get(chain)

    def path_to(self, node: SegmentNode) -> list[SegmentNode]:
        """Nodes from depth 1 down to ``node`` (root excluded; [] for a root).

        Raises ValueError if ``node`` is not in this tree.
        """
        self._require_member(node)
        path: list[SegmentNode] = []
        while node.parent is not None:
            path.append(node)
            node = node.parent
        path.reverse()
        return path

    # ---------------------------------------------------------------- mutation

    def insert(
        self,
        parent: SegmentNode,
        digest: str,
        token_ids: Sequence[int],
        handle: object,
        nbytes: int,
        ttl_s: float | None = None,
    ) -> SegmentNode:
        """Add the child ``digest`` under ``parent`` holding ``handle`` (``nbytes``).

        If a live child with this digest already exists it is returned
        unchanged (not touched): the caller then owns ``handle`` and must free
        it (check ``result.handle is handle``). If the existing child has
        expired and is unpinned, its payload is replaced in place:
        ``on_remove(child, "replace")`` sees the old handle, then the node
        takes the new handle, bytes and TTL and keeps its subtree (the chain,
        hence the KV, is the same); without ``on_remove`` the old handle is
        simply dropped. Never evicts; the tree may be over budget
        afterwards. Raises ValueError if ``parent`` is not in this tree,
        ``digest`` is empty, ``nbytes < 0`` or ``ttl_s <= 0``.
        """
        self._require_member(parent)
        if not digest:
            raise ValueError("digest must be non-empty")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        _check_ttl(ttl_s)
        now = self._clock()
        node = parent.children.get(digest)
        new = node is None
        if new:
            node = self._add_child(parent, digest)
        elif self._is_expired(node, now):
            self._report(node, "replace")
        else:
            return node
        self._set_payload(node, token_ids, handle, nbytes, ttl_s, now)
        if new:
            self._notify_stored(node)
        return node

    def set_ttl(self, node: SegmentNode, ttl_s: float | None) -> None:
        """Give ``node`` a TTL (``expires_at = now + ttl_s``) or clear it (None).

        Raises ValueError for a root, a node not in this tree, or ``ttl_s <= 0``.
        """
        self._require_member(node)
        if node.is_root:
            raise ValueError("roots never expire")
        _check_ttl(ttl_s)
        node.ttl_s = ttl_s
        node.expires_at = None if ttl_s is None else self._clock() + ttl_s

    def pin(self, nodes: Iterable[SegmentNode]) -> None:
        """Add one pin per occurrence in ``nodes``; all-or-nothing.

        Raises ValueError (pinning nothing) if any node is a root or not in
        this tree.
        """
        nodes = list(nodes)
        for node in nodes:
            self._require_member(node)
            if node.is_root:
                raise ValueError("roots hold no KV and cannot be pinned")
        for node in nodes:
            node.pins += 1

    def unpin(self, nodes: Iterable[SegmentNode]) -> None:
        """Drop one pin per occurrence in ``nodes``; all-or-nothing.

        Raises ValueError (unpinning nothing) if any node would go below zero
        pins. Unpinning does not evict: a node that expired while pinned is
        removed by the next ``expire`` or ``match``.
        """
        nodes = list(nodes)
        wanted = Counter(id(node) for node in nodes)
        for node in nodes:
            if node.pins < wanted[id(node)]:
                raise ValueError(f"unpin below zero on node {node.digest[:24]}")
        for node in nodes:
            node.pins -= 1

    # ---------------------------------------------------------------- removal

    def enforce_quota(self, namespace: str) -> list[SegmentNode]:
        """Evict LRU unpinned leaves of ``namespace`` until it fits ``tenant_quota_bytes``.

        No-op without a quota or for an unknown namespace. Same rules and
        return value as ``evict_until``.
        """
        root = self._roots.get(namespace)
        if self.tenant_quota_bytes is None or root is None:
            return []
        return self._evict_lru([root], lambda: self._ns_bytes[namespace], self.tenant_quota_bytes)

    def expire(self, now: float | None = None) -> list[SegmentNode]:
        """Remove unpinned nodes with ``expires_at <= now`` together with their subtrees.

        Descendants go too, expired or not: their KV is only usable after the
        parent's. An expired node whose subtree holds a pin is kept (its
        path is in use); expired, pin-free branches below it are still
        removed. ``now`` defaults to the clock. Returns removed nodes,
        children before parents (reason "expire").
        """
        now = self._clock() if now is None else now
        pinned = self._pinned_subtrees()
        removed: list[SegmentNode] = []
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            if not node.is_root and self._is_expired(node, now) and id(node) not in pinned:
                removed.extend(self._remove_subtree(node, "expire"))
            else:
                stack.extend(node.children.values())
        return removed

    # ---------------------------------------------------------------- queries

    def __len__(self) -> int:
        """Number of non-root nodes."""
        return self._count

    def stats(
        self, namespace: str | None = None, *, max_depth: int = 8, max_children: int = 16
    ) -> dict[str, Any]:
        """Counters and a JSON-able tree summary, for all namespaces or one.

        ``tree`` is a list of root summaries; each summary is
        ``{digest, chain, tokens, bytes, hits, pins, age_s, idle_s, expires_in_s,
        children, omitted}`` where ``digest``/``chain`` are their first 16 hex
        digits, ``age_s``/``idle_s`` are seconds since creation/last use on the
        tree's clock, ``expires_in_s`` is None without a TTL, ``children`` is
        capped at ``max_children`` (most hit first) and ``max_depth``, and
        ``omitted`` counts the nodes of the subtree that were left out.
        """
        roots = self._roots_of(namespace)
        out: dict[str, Any] = {
            **self._census(roots),
            "budget_bytes": self.budget_bytes,
            "tenant_quota_bytes": self.tenant_quota_bytes,
        }
        events = self._events(roots)
        for reason, name in _COUNTER_NAMES.items():
            out[name] = events[reason]
        now = self._clock()
        out["tree"] = [_summarise(r, now, max_depth, max_children) for r in roots]
        return out

    # ---------------------------------------------------------------- internals

    def _new_root(self, namespace: str, now: float) -> SegmentNode:
        if namespace in self._by_chain:
            raise ValueError(f"namespace {namespace[:24]} collides with a node chain")
        node = SegmentNode(namespace, namespace, namespace, None, last_use=now, created=now)
        self._by_chain[namespace] = node
        return node

    def _detach(self, node: SegmentNode) -> None:
        del node.parent.children[node.digest]
        del self._by_chain[node.chain]
        self._count -= 1

    def _describe(self, node: SegmentNode) -> str:
        return f"node {node.digest[:24]}"

    def _check_root(self, namespace: str, root: SegmentNode) -> None:
        require(root.digest == root.chain == namespace, "root digests != namespace")
        require(root.depth == 0, f"root {namespace[:24]} has depth {root.depth}")

    def _check_link(self, parent: SegmentNode, key: str, child: SegmentNode) -> None:
        what = self._describe(child)
        require(key == child.digest, f"{what} stored under key {key[:24]}")
        require(child.depth == parent.depth + 1, f"{what} has depth {child.depth}")
        require(child.chain == chain_digest(parent.chain, child.digest), f"{what} chain is wrong")

    def _check_index(self, reached: list[SegmentNode]) -> None:
        index_ids = {id(n) for n in self._by_chain.values()}
        node_ids = {id(n) for n in reached} | {id(r) for r in self._roots.values()}
        require(index_ids == node_ids, "chain index differs from the set of nodes")
        for chain, node in self._by_chain.items():
            require(node.chain == chain, f"index key {chain[:24]} maps to another chain")
        require(self._count == len(reached), "node count is wrong")

    def _require_member(self, node: SegmentNode) -> None:
        if self._by_chain.get(node.chain) is not node:
            raise ValueError(f"node {node.digest[:24]} does not belong to this tree")

    @staticmethod
    def _is_expired(node: SegmentNode, now: float) -> bool:
        return node.pins == 0 and node.expires_at is not None and node.expires_at <= now

    @staticmethod
    def _touch(node: SegmentNode, now: float) -> None:
        node.hits += 1
        node.last_use = now
        if node.ttl_s is not None:
            node.expires_at = now + node.ttl_s

    @staticmethod
    def _subtree_has_pins(node: SegmentNode) -> bool:
        return any(n.pins > 0 for n in preorder(node))

    def _pinned_subtrees(self) -> set[int]:
        """ids of nodes whose subtree (self included) holds a pin, in one pass."""
        pinned: set[int] = set()
        for root in self._roots.values():
            for node in reversed(list(preorder(root))):
                if node.pins > 0 or any(id(c) in pinned for c in node.children.values()):
                    pinned.add(id(node))
        return pinned

    def _add_child(self, parent: SegmentNode, digest: str) -> SegmentNode:
        chain = chain_digest(parent.chain, digest)
        if chain in self._by_chain:
            raise ValueError(f"chain {chain[:24]} already names another node")
        self._seq += 1
        node = SegmentNode(parent.namespace, digest, chain, parent, parent.depth + 1, seq=self._seq)
        parent.children[digest] = node
        self._by_chain[chain] = node
        self._count += 1
        return node

    def _set_payload(
        self,
        node: SegmentNode,
        token_ids: Sequence[int],
        handle: object,
        nbytes: int,
        ttl_s: float | None,
        now: float,
    ) -> None:
        self._add_bytes(node.namespace, nbytes - node.nbytes)
        node.token_ids, node.handle, node.nbytes = tuple(token_ids), handle, nbytes
        node.ttl_s, node.expires_at = ttl_s, None if ttl_s is None else now + ttl_s
        node.created = node.last_use = now
        node.hits = 0

    def _remove_subtree(self, node: SegmentNode, reason: str) -> list[SegmentNode]:
        """Unlink ``node`` and all its descendants (none pinned), children first."""
        removed = list(reversed(list(preorder(node))))
        for n in removed:
            self._unlink(n, reason)
        return removed


def _check_ttl(ttl_s: float | None) -> None:
    if ttl_s is not None and not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0 or None, got {ttl_s}")


def _short(digest: str) -> str:
    return digest.removeprefix(PREFIX)[:16]


def _summarise(node: SegmentNode, now: float, max_depth: int, max_children: int) -> dict[str, Any]:
    """JSON-able summary of ``node``'s subtree, capped in depth and fan-out (recursive, bounded)."""
    out: dict[str, Any] = {
        "digest": _short(node.digest),
        "chain": _short(node.chain),
        "tokens": node.n_tokens,
        "bytes": node.nbytes,
        "hits": node.hits,
        "pins": node.pins,
        "age_s": round(now - node.created, 3),
        "idle_s": round(now - node.last_use, 3),
        "expires_in_s": None if node.expires_at is None else round(node.expires_at - now, 3),
        "children": [],
        "omitted": 0,
    }
    kids = sorted(node.children.values(), key=lambda n: (-n.hits, -n.last_use, n.seq))
    shown = kids[:max_children] if max_depth > 0 else []
    out["children"] = [_summarise(c, now, max_depth - 1, max_children) for c in shown]
    out["omitted"] = sum(sum(1 for _ in preorder(c)) for c in kids[len(shown) :])
    return out
