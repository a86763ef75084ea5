"""What the segment tree and the radix tail share: namespaced roots, byte budget, LRU leaves.

Both trees keep one root per namespace digest and, below it, nodes that hold
an opaque KV handle and its size in bytes. ``LruTree`` owns what does not
depend on how a child is keyed: the byte counters (total and per namespace),
the removal counters and the ``on_remove`` report, least-recently-used
eviction of unpinned leaves, ``purge``, and the walk of ``check_integrity``.
A subclass says how a leaf leaves its parent and its index (``_detach``), how
a root is built (``_new_root``) and which invariants of its own to check
(``_check_*`` hooks). The contracts (mutation, pinning, removal, budget) are
the subclass's; see its module docstring.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

from segcache.kv.integrity import require

Clock = Callable[[], float]


class TreeNode:
    """Base of the node dataclasses: the fields ``LruTree`` reads, declared here.

    The subclass declares them as dataclass fields (in its own order, which
    is its constructor's); ``pins == 0`` means evictable.
    """

    namespace: str
    parent: Any  # the same node type, None for a root
    children: dict[Any, Any]
    token_ids: tuple[int, ...]
    handle: object | None
    nbytes: int
    hits: int
    last_use: float
    pins: int
    seq: int  # creation order; breaks LRU ties deterministically

    @property
    def is_root(self) -> bool:
        """True for the per-namespace root, which holds no KV."""
        return self.parent is None

    @property
    def n_tokens(self) -> int:
        """Number of tokens whose KV this node holds."""
        return len(self.token_ids)


N = TypeVar("N", bound=TreeNode)


class TreeListener(Protocol):
    """Hears of KV entering and leaving a tree (KV events, ``segcache.deploy.kv_events``).

    ``stored(node)``: a node now holds KV of new content (not a payload
    replaced under the same content, not a radix split, which moves no KV).
    ``removed(node, reason)``: like ``on_remove``, after the node was unlinked
    (its ``parent`` still points at its old parent). Both run on the engine's
    thread inside tree calls: they must be quick, must not raise and must not
    call back into the tree.
    """

    def stored(self, node: Any) -> None: ...

    def removed(self, node: Any, reason: str) -> None: ...


class LruTree(Generic[N]):
    """Namespaced roots, byte accounting and LRU leaf eviction over opaque KV handles.

    ``budget_bytes`` bounds ``resident_bytes`` after ``evict_until``.
    ``on_remove(node, reason)`` hears of every node that leaves the tree,
    after it has been unlinked. ``clock`` returns seconds (monotonic).
    """

    def __init__(
        self,
        budget_bytes: int,
        *,
        clock: Clock,
        on_remove: Callable[[N, str], None] | None,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._clock = clock
        self._on_remove = on_remove
        self._roots: dict[str, N] = {}
        self._ns_bytes: dict[str, int] = {}
        self._resident = 0
        self._seq = 0
        self._counters: dict[str, Counter[str]] = {}  # namespace -> event -> count
        self.listeners: list[TreeListener] = []

    # ---------------------------------------------------------------- removal

    def evict_until(self, budget_bytes: int | None = None) -> list[N]:
        """Evict least-recently-used unpinned leaves until ``resident_bytes <= budget``.

        ``budget_bytes`` defaults to ``self.budget_bytes``. A parent becomes a
        candidate once its children are gone. Stops early, leaving the tree
        over budget, when only pinned paths remain. Returns removed nodes in
        eviction order (reason "evict"). Raises ValueError if the budget < 0.
        """
        target = self.budget_bytes if budget_bytes is None else budget_bytes
        if target < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {target}")
        return self._evict_lru(list(self._roots.values()), lambda: self._resident, target)

    def purge(self, namespace: str) -> list[N]:
        """Remove every unpinned node of ``namespace`` that has no pinned descendant.

        Pinned nodes and their ancestors stay (call again after unpinning to
        drop them); the root stays. Returns removed nodes, children before
        parents (reason "purge"). Unknown namespace: returns [].
        """
        root = self._roots.get(namespace)
        if root is None:
            return []
        removed: list[N] = []
        for node in reversed(list(preorder(root))):
            if evictable_leaf(node):
                self._unlink(node, "purge")
                removed.append(node)
        return removed

    # ---------------------------------------------------------------- queries

    @property
    def resident_bytes(self) -> int:
        """Sum of ``nbytes`` over all nodes."""
        return self._resident

    def namespace_bytes(self, namespace: str) -> int:
        """Sum of ``nbytes`` over the nodes of ``namespace`` (0 if unknown)."""
        return self._ns_bytes.get(namespace, 0)

    @property
    def namespaces(self) -> list[str]:
        """Namespaces that have a root."""
        return list(self._roots)

    def nodes(self, namespace: str | None = None) -> list[N]:
        """Every node (roots excluded) of all namespaces or of ``namespace``, parents
        before children. Read-only: changes no counter, clock or link; the caller
        must not mutate the nodes (use the tree's methods)."""
        return [n for r in self._roots_of(namespace) for n in preorder(r) if not n.is_root]

    def check_integrity(self) -> None:
        """Raise ``IntegrityError`` naming the first broken invariant, else return None.

        Checks parent/child back links, that roots hold nothing, each node's
        namespace, ``pins >= 0`` and ``nbytes >= 0``, that no node is reached
        twice, and byte accounting (total and per namespace); then the
        subclass's own invariants (listed in its class docstring).
        """
        reached: list[N] = []  # non-root nodes, parents before children
        ns_bytes: Counter[str] = Counter()
        for ns, root in self._roots.items():
            self._check_bare_root(ns, root)
            for node in preorder(root):
                if not node.is_root:
                    reached.append(node)
                    ns_bytes[ns] += node.nbytes
                    self._check_node(ns, node)
                for key, child in node.children.items():
                    what = self._describe(child)
                    require(child.parent is node, f"{what} does not point back to its parent")
                    self._check_link(node, key, child)
        require(len({id(n) for n in reached}) == len(reached), "a node is reachable twice")
        self._check_index(reached)
        require(self._resident == sum(ns_bytes.values()), "resident_bytes is wrong")
        require(set(self._ns_bytes) == set(self._roots), "namespace byte keys differ from roots")
        for ns, total in self._ns_bytes.items():
            require(total == ns_bytes[ns], f"namespace_bytes wrong for {ns[:24]}")

    # ------------------------------------------------------ for the subclasses

    def _new_root(self, namespace: str, now: float) -> N:
        """Build (and index, if the subclass keeps an index) the root of ``namespace``."""
        raise NotImplementedError

    def _detach(self, node: N) -> None:
        """Take the leaf ``node`` out of its parent's children and the subclass's index."""
        raise NotImplementedError

    def _describe(self, node: N) -> str:
        """``node`` named for error messages."""
        raise NotImplementedError

    def _check_root(self, namespace: str, root: N) -> None:
        """Subclass invariants of a root (its identity fields)."""

    def _check_node(self, namespace: str, node: N) -> None:
        """Invariants of one non-root node (namespace, pins, nbytes); extend with super()."""
        what = self._describe(node)
        require(node.namespace == namespace, f"{what} in wrong namespace")
        require(node.pins >= 0, f"{what} has {node.pins} pins")
        require(node.nbytes >= 0, f"{what} has negative nbytes")

    def _check_link(self, parent: N, key: Any, child: N) -> None:
        """Subclass invariants of the edge ``parent.children[key] is child``."""

    def _check_index(self, reached: list[N]) -> None:
        """Subclass invariants of its node index, given every non-root node reached."""

    def _root(self, namespace: str) -> N:
        """The root of ``namespace``, created on first use. Raises ValueError on ""."""
        node = self._roots.get(namespace)
        if node is not None:
            return node
        if not namespace:
            raise ValueError("namespace must be a non-empty digest")
        node = self._new_root(namespace, self._clock())
        self._roots[namespace] = node
        self._ns_bytes[namespace] = 0
        self._counters[namespace] = Counter()
        return node

    def _add_bytes(self, namespace: str, delta: int) -> None:
        self._ns_bytes[namespace] += delta
        self._resident += delta

    def _unlink(self, node: N, reason: str) -> None:
        """Remove one unpinned leaf and report it."""
        require(node.parent is not None and not node.children and node.pins == 0,
                f"{self._describe(node)} is not an unpinned leaf")
        self._detach(node)
        self._add_bytes(node.namespace, -node.nbytes)
        self._report(node, reason)

    def _report(self, node: N, reason: str) -> None:
        self._counters[node.namespace][reason] += 1
        if self._on_remove is not None:
            self._on_remove(node, reason)
        for listener in self.listeners:
            listener.removed(node, reason)

    def _notify_stored(self, node: N) -> None:
        for listener in self.listeners:
            listener.stored(node)

    def _evict_lru(self, roots: Sequence[N], used: Callable[[], int], target: int) -> list[N]:
        """Unlink LRU unpinned leaves below ``roots`` while ``used() > target``."""
        if used() <= target:
            return []
        heap = [(n.last_use, n.seq, n) for r in roots for n in preorder(r) if evictable_leaf(n)]
        heapq.heapify(heap)
        removed: list[N] = []
        while heap and used() > target:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            self._unlink(node, "evict")
            removed.append(node)
            if parent is not None and evictable_leaf(parent):
                heapq.heappush(heap, (parent.last_use, parent.seq, parent))
        return removed

    def _roots_of(self, namespace: str | None) -> list[N]:
        """All roots, or the root of ``namespace`` ([] if unknown)."""
        if namespace is None:
            return list(self._roots.values())
        return [self._roots[namespace]] if namespace in self._roots else []

    def _census(self, roots: Sequence[N]) -> dict[str, Any]:
        """The counts ``stats`` reports for the trees under ``roots`` (roots excluded)."""
        nodes = [n for r in roots for n in preorder(r) if not n.is_root]
        return {
            "namespaces": len(roots),
            "nodes": len(nodes),
            "bytes": sum(n.nbytes for n in nodes),
            "tokens": sum(n.n_tokens for n in nodes),
            "hits": sum(n.hits for n in nodes),
            "pinned": sum(1 for n in nodes if n.pins > 0),
        }

    def _events(self, roots: Sequence[N]) -> Counter[str]:
        """Removal (and other) events counted since start in the namespaces of ``roots``."""
        events: Counter[str] = Counter()
        for root in roots:
            events.update(self._counters[root.namespace])
        return events

    def _check_bare_root(self, namespace: str, root: N) -> None:
        name = namespace[:24]
        require(root.parent is None, f"root {name} has a parent")
        require(root.namespace == namespace, f"root {name} names another namespace")
        require(root.nbytes == 0 and root.handle is None, f"root {name} holds KV")
        require(root.pins == 0, f"root {name} is pinned")
        self._check_root(namespace, root)


def evictable_leaf(node: TreeNode) -> bool:
    """A non-root node with no children and no pins: the only kind ever unlinked."""
    return not node.is_root and not node.children and node.pins == 0


def preorder(node: N) -> Iterator[N]:
    """``node`` then its descendants, parents before children (iterative: trees can be deep)."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.children.values())
