"""The radix tail: token-level longest-prefix reuse across every cached prompt.

Prompts that cannot be cut into segments (``/v1/completions`` text, content
below the last segment) are cached here. One tree per namespace digest; each
edge is labelled by a run of token ids and each non-root node holds an opaque
handle to the KV of *its own edge tokens* only, so the KV of a prefix is the
concatenation of the handles along the path from the root. Unlike a single
llama.cpp slot, a new prompt reuses its longest common prefix with *any*
prompt cached in its namespace.

The tree never looks inside a handle. Cutting an edge in two needs the
engine, so the constructor takes ``split_handle(handle, k) -> (first k
tokens, rest)`` and ``bytes_of(handle) -> int``; ``create_simulated()``
uses tuples of token ids as handles so tests need no engine.

Contracts, in one place:

- **Mutation.** ``match_prefix`` mutates: it updates ``hits``/``last_use``
  on the matched path and splits the last matched node when the match ends
  inside its edge. ``insert``, ``pin``, ``unpin``, ``evict_until`` and
  ``purge`` mutate; ``stats``, the byte counters, ``len`` and
  ``check_integrity`` do not.
- **Splitting.** A split cuts node N after ``k`` tokens: a *new* node takes
  the first ``k`` tokens (and is inserted between N and its parent) while N
  keeps the rest, its children and its identity. N's ``token_ids``,
  ``handle``, ``start`` and ``nbytes`` therefore change. ``split_handle``
  consumes N's old handle: the tree keeps only the two halves, and no
  ``on_remove`` is reported (no KV left the tree). Read a match's handles
  from ``RadixMatch.handles`` (taken when it matched), not later from the
  nodes.
- **Pinning.** A node used by a running request must be pinned between its
  ``match_prefix``/``insert`` and the end of the request. A pin locks the
  node *and its whole path to the root* (SGLang's lock ref): ``pins`` counts
  the pins held on the node or any descendant, so only subtrees with
  ``pins == 0`` are evicted or purged. A split gives the new upper node the
  same ``pins`` as N, which is exactly the locks passing through it, so
  ``unpin`` of the list that was pinned releases both halves. Pins are
  reference counts; unpin exactly what you pinned.
- **Removal.** Every node that leaves the tree is reported exactly once to
  ``on_remove(node, reason)`` with ``reason`` in ``REMOVE_REASONS``, after it
  has been unlinked, children before parents. The callback frees or demotes
  ``node.handle``; it must not raise or call back into the tree. Removal
  methods also return the removed nodes.
- **Budget.** ``insert`` never evicts: after inserting, the caller runs
  ``evict_until``. Roots hold no KV and are never removed.
- **Not thread-safe.** The engine owns the tree and serialises calls.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from segcache.kv.integrity import require
from segcache.kv.lru_tree import Clock, LruTree, TreeNode

REMOVE_REASONS = ("evict", "purge")

OnRemove = Callable[["RadixNode", str], None]
SplitHandle = Callable[[object, int], tuple[object, object]]
BytesOf = Callable[[object], int]
HandlesFor = Callable[[int, int], object]


@dataclass(eq=False)
class RadixNode(TreeNode):
    """One edge of the radix tree and the KV of its tokens.

    ``token_ids`` labels the edge from ``parent``; ``start`` is the position
    of its first token in every prompt that passes through it. ``handle`` is
    the engine's opaque KV for ``token_ids`` only, shape
    ``[n_layers, 2, n_kv_heads, n_tokens, head_dim]`` when it is a tensor.
    ``pins`` counts the pins held on this node or any descendant. A root has
    no tokens, no handle, ``nbytes == 0`` and ``pins == 0``. Identity
    equality. Fields are owned by the tree; read, don't write.
    """

    namespace: str
    parent: RadixNode | None = field(repr=False)
    token_ids: tuple[int, ...] = ()
    start: int = 0
    handle: object | None = field(default=None, repr=False)
    nbytes: int = 0
    hits: int = 0
    last_use: float = 0.0
    created: float = 0.0
    pins: int = 0
    seq: int = 0  # creation order; breaks LRU ties deterministically
    children: dict[int, RadixNode] = field(default_factory=dict, repr=False)

    @property
    def end(self) -> int:
        """Position just past this node's last token (prefix length at this node)."""
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class RadixMatch:
    """Result of ``match_prefix``: the cached path for ``tokens[:length]``.

    ``nodes`` run from depth 1 down (root excluded) and end on a node
    boundary; ``handles`` are their handles at match time, whose
    concatenation is the KV of exactly ``tokens[:length]``.
    """

    namespace: str
    nodes: tuple[RadixNode, ...]
    length: int
    handles: tuple[object, ...]


class RadixTree(LruTree[RadixNode]):
    """Token radix tree over opaque KV handles: one root per namespace, LRU leaves.

    ``budget_bytes`` bounds ``resident_bytes`` after ``evict_until``.
    ``split_handle(handle, k)`` returns the handles of the first ``k`` tokens
    and of the rest; ``bytes_of(handle)`` its size. ``handle_len(handle)``,
    if given, is the number of tokens a handle covers: ``insert`` and splits
    then reject handles of the wrong length and ``check_integrity`` checks
    every node. ``clock`` returns seconds (monotonic); inject a fake one in
    tests. See the module docstring for the mutation, splitting, pinning and
    removal contracts. ``check_integrity`` adds to the checks of
    ``LruTree``: child keys (first token of the edge), non-empty edges,
    positions, handle sizes (``nbytes == bytes_of``; token count when
    ``handle_len`` is known), the node set, and that a node's pins cover its
    children's (so a pinned node's ancestors are pinned and present).
    """

    def __init__(
        self,
        budget_bytes: int,
        *,
        split_handle: SplitHandle,
        bytes_of: BytesOf,
        clock: Clock = time.monotonic,
        on_remove: OnRemove | None = None,
        handle_len: Callable[[object], int] | None = None,
    ) -> None:
        super().__init__(budget_bytes, clock=clock, on_remove=on_remove)
        self._split_handle = split_handle
        self._bytes_of = bytes_of
        self._handle_len = handle_len
        self._nodes: set[RadixNode] = set()  # every non-root node in the tree

    @classmethod
    def create_simulated(
        cls,
        budget_bytes: int = 1 << 30,
        *,
        bytes_per_token: int = 1,
        clock: Clock = time.monotonic,
        on_remove: OnRemove | None = None,
    ) -> RadixTree:
        """A tree for tests and simulations: a handle is the tuple of its token ids.

        Splitting slices the tuple and a handle weighs
        ``len(handle) * bytes_per_token``. Pass ``handles_for=lambda a, b:
        tuple(tokens[a:b])`` to ``insert``.
        """
        if bytes_per_token < 0:
            raise ValueError(f"bytes_per_token must be >= 0, got {bytes_per_token}")
        return cls(
            budget_bytes,
            split_handle=lambda h, k: (h[:k], h[k:]),
            bytes_of=lambda h: len(h) * bytes_per_token,
            clock=clock,
            on_remove=on_remove,
            handle_len=len,
        )

    # ----------------------------------------------------------------- lookup

    def match_prefix(
        self, namespace: str, tokens: Sequence[int], max_len: int | None = None
    ) -> RadixMatch:
        """Longest cached prefix of ``tokens[:max_len]`` under ``namespace``.

        If the match ends inside an edge, that node is split so the match
        ends on a node boundary. Every matched node gets ``hits += 1`` and
        ``last_use = now``. Does NOT pin: pin ``result.nodes`` before the KV
        is used. An unknown namespace matches nothing and creates no root.
        The engine passes ``max_len = len(tokens) - 1`` so that at least one
        token is recomputed. Raises ValueError if ``max_len < 0``.
        """
        if max_len is not None and max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {max_len}")
        query = tuple(tokens if max_len is None else tokens[:max_len])
        root = self._roots.get(namespace)
        if root is None or not query:
            return RadixMatch(namespace, (), 0, ())
        path = self._walk(root, query)
        now = self._clock()
        for node in path:
            node.hits += 1
            node.last_use = now
        length = path[-1].end if path else 0
        return RadixMatch(namespace, tuple(path), length, tuple(n.handle for n in path))

    # ---------------------------------------------------------------- mutation

    def insert(
        self, namespace: str, tokens: Sequence[int], handles_for: HandlesFor
    ) -> list[RadixNode]:
        """Make sure all of ``tokens`` is cached under ``namespace``; return its path.

        The cached prefix is reused (splitting an edge where ``tokens``
        diverges inside it); for the missing tail ``tokens[a:b]`` (``b ==
        len(tokens)``) ``handles_for(a, b)`` is called once and must return a
        handle covering exactly those tokens, which the tree then owns. When
        the whole sequence is already cached, ``handles_for`` is not called.
        The returned path (root excluded) covers ``tokens`` exactly; its nodes
        get ``last_use = now`` (not ``hits``). Does not pin and never evicts.
        If ``handles_for`` raises, or returns a handle of the wrong length
        (ValueError), no node is added (a split made on the way may stay; it
        changes no content). Raises ValueError on an empty namespace.
        """
        query = tuple(tokens)
        root = self._root(namespace)
        path = self._walk(root, query)
        offset = path[-1].end if path else 0
        if offset < len(query):
            handle = handles_for(offset, len(query))
            self._check_handle(handle, len(query) - offset)
            parent = path[-1] if path else root
            path.append(self._add_child(parent, query[offset:], handle))
        now = self._clock()
        for node in path:
            node.last_use = now
        return path

    def pin(self, nodes: Iterable[RadixNode]) -> None:
        """Lock each node in ``nodes`` and its path to the root; all-or-nothing.

        Each occurrence adds one to ``pins`` of the node and of every
        ancestor (roots excluded). Raises ValueError (pinning nothing) if a
        node is a root or not in this tree (e.g. already evicted).
        """
        nodes = list(nodes)
        for node in nodes:
            self._require_member(node)
        for node in nodes:
            for n in _ancestry(node):
                n.pins += 1

    def unpin(self, nodes: Iterable[RadixNode]) -> None:
        """Release pins taken with ``pin(nodes)``; all-or-nothing.

        Raises ValueError (unpinning nothing) if a node is a root, not in
        this tree, or any node on the released paths would go below zero.
        Unpinning does not evict.
        """
        nodes = list(nodes)
        wanted: Counter[int] = Counter()
        for node in nodes:
            self._require_member(node)
            wanted.update(id(n) for n in _ancestry(node))
        for node in nodes:
            for n in _ancestry(node):
                if n.pins < wanted[id(n)]:
                    raise ValueError(f"unpin below zero on node at {n.start}+{n.n_tokens}")
        for node in nodes:
            for n in _ancestry(node):
                n.pins -= 1

    # ---------------------------------------------------------------- queries

    def __len__(self) -> int:
        """Number of non-root nodes."""
        return len(self._nodes)

    def stats(self, namespace: str | None = None) -> dict[str, Any]:
        """Counters for all namespaces or one (JSON-able).

        ``hits`` sums node hit counters (a split copies them to both halves);
        ``evictions``, ``purged`` and ``splits`` count events since start.
        """
        roots = self._roots_of(namespace)
        events = self._events(roots)
        return {
            **self._census(roots),
            "evictions": events["evict"],
            "purged": events["purge"],
            "splits": events["split"],
            "budget_bytes": self.budget_bytes,
        }

    # ---------------------------------------------------------------- internals

    def _new_root(self, namespace: str, now: float) -> RadixNode:
        return RadixNode(namespace, None, last_use=now, created=now)

    def _detach(self, node: RadixNode) -> None:
        del node.parent.children[node.token_ids[0]]
        self._nodes.discard(node)

    def _describe(self, node: RadixNode) -> str:
        return f"node at {node.namespace[:16]}:{node.start}+{node.n_tokens}"

    def _walk(self, root: RadixNode, query: tuple[int, ...]) -> list[RadixNode]:
        """Cached path for the longest prefix of ``query``, splitting the last edge if needed."""
        node, offset, path = root, 0, []
        while offset < len(query):
            child = node.children.get(query[offset])
            if child is None:
                break
            k = _common_len(child.token_ids, query, offset)
            if k < child.n_tokens:
                path.append(self._split(child, k))
                break
            path.append(child)
            node, offset = child, offset + k
        return path

    def _split(self, node: RadixNode, k: int) -> RadixNode:
        """Cut ``node`` after ``k`` tokens; return the new upper node (see module docstring)."""
        require(node.parent is not None and 0 < k < node.n_tokens,
                f"cannot split {self._describe(node)} after {k} tokens")
        first, rest = self._split_handle(node.handle, k)
        self._check_handle(first, k)
        self._check_handle(rest, node.n_tokens - k)
        self._seq += 1
        upper = RadixNode(
            node.namespace,
            node.parent,
            token_ids=node.token_ids[:k],
            start=node.start,
            handle=first,
            nbytes=self._bytes_of(first),
            hits=node.hits,
            last_use=node.last_use,
            created=node.created,
            pins=node.pins,  # the same locks pass through both halves
            seq=self._seq,
        )
        old_bytes = node.nbytes
        node.parent.children[upper.token_ids[0]] = upper
        node.parent, node.token_ids, node.start = upper, node.token_ids[k:], node.start + k
        node.handle, node.nbytes = rest, self._bytes_of(rest)
        upper.children[node.token_ids[0]] = node
        self._nodes.add(upper)
        self._add_bytes(node.namespace, upper.nbytes + node.nbytes - old_bytes)
        self._counters[node.namespace]["split"] += 1
        return upper

    def _add_child(
        self, parent: RadixNode, token_ids: tuple[int, ...], handle: object
    ) -> RadixNode:
        now = self._clock()
        self._seq += 1
        node = RadixNode(
            parent.namespace,
            parent,
            token_ids=token_ids,
            start=parent.end,
            handle=handle,
            nbytes=self._bytes_of(handle),
            last_use=now,
            created=now,
            seq=self._seq,
        )
        parent.children[token_ids[0]] = node
        self._nodes.add(node)
        self._add_bytes(node.namespace, node.nbytes)
        self._notify_stored(node)
        return node

    def _check_handle(self, handle: object, n_tokens: int) -> None:
        nbytes = self._bytes_of(handle)
        if nbytes < 0:
            raise ValueError(f"bytes_of(handle) must be >= 0, got {nbytes}")
        if self._handle_len is not None and self._handle_len(handle) != n_tokens:
            got = self._handle_len(handle)
            raise ValueError(f"handle covers {got} tokens, expected {n_tokens}")

    def _check_root(self, namespace: str, root: RadixNode) -> None:
        require(root.token_ids == () and root.start == 0, f"root {namespace[:24]} has tokens")

    def _check_node(self, namespace: str, node: RadixNode) -> None:
        super()._check_node(namespace, node)
        what = self._describe(node)
        require(node.nbytes == self._bytes_of(node.handle), f"{what}: nbytes != bytes_of")
        if self._handle_len is not None:
            got = self._handle_len(node.handle)
            require(got == node.n_tokens, f"{what}: handle covers {got} tokens")
        kids_pins = sum(c.pins for c in node.children.values())
        require(node.pins >= kids_pins, f"{what} has {node.pins} pins < children's {kids_pins}")

    def _check_link(self, parent: RadixNode, key: int, child: RadixNode) -> None:
        what = self._describe(child)
        require(child.token_ids, f"{what} has an empty edge")
        require(key == child.token_ids[0], f"{what} stored under key {key}")
        require(child.start == parent.end, f"{what} should start at {parent.end}")

    def _check_index(self, reached: list[RadixNode]) -> None:
        require(set(reached) == self._nodes, "the node set differs from the nodes reachable from roots")

    def _require_member(self, node: RadixNode) -> None:
        if node not in self._nodes:
            raise ValueError(f"{self._describe(node)} is a root or not in this tree")


def _common_len(edge: tuple[int, ...], query: tuple[int, ...], offset: int) -> int:
    """Number of leading tokens of ``edge`` equal to ``query[offset:]``."""
    n = min(len(edge), len(query) - offset)
    for i in range(n):
        if edge[i] != query[offset + i]:
            return i
    return n


def _ancestry(node: RadixNode) -> Iterator[RadixNode]:
    """``node`` then its ancestors, roots excluded."""
    while node.parent is not None:
        yield node
        node = node.parent
