"""RadixTree: longest-prefix matching, edge splits, pins across splits, LRU eviction.

Two stateful tests drive the tree with random operations and call
``check_integrity()`` after every step: one against a brute-force
longest-common-prefix model (no eviction), one with a small budget, pins and
eviction.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from segcache.kv.radix import RadixMatch, RadixNode, RadixTree
from tests.tree_helpers import FakeClock, Recorder

NS, NS2 = "sha256:ns-a", "sha256:ns-b"


def make_tree(budget: int = 1 << 20, bpt: int = 3) -> tuple[RadixTree, FakeClock, Recorder]:
    clock, rec = FakeClock(), Recorder()
    tree = RadixTree.create_simulated(budget, bytes_per_token=bpt, clock=clock, on_remove=rec)
    return tree, clock, rec


def put(tree: RadixTree, tokens: Sequence[int], ns: str = NS) -> list[RadixNode]:
    path = tree.insert(ns, tokens, lambda a, b: tuple(tokens[a:b]))
    tree.check_integrity()
    return path


def joined(handles) -> tuple[int, ...]:
    return tuple(t for h in handles for t in h)


def lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------- matching


def test_three_prompts_match_exactly_the_longest_cached_prefix():
    tree, _, _ = make_tree()
    query = list(range(100, 130))
    short = query[:5] + [1, 2, 3, 4, 5, 6, 7, 8]
    longest = query[:17] + [9, 9, 9]
    middle = query[:11] + [7] * 12
    for prompt in (short, longest, middle):
        put(tree, prompt)

    match = tree.match_prefix(NS, query)
    tree.check_integrity()
    assert match.length == 17
    assert joined(match.handles) == tuple(query[:17])
    assert [n.end for n in match.nodes] == [5, 11, 17]
    # A cached prompt matches whole, or len - 1 when the caller caps it.
    assert tree.match_prefix(NS, middle).length == len(middle)
    capped = tree.match_prefix(NS, middle, max_len=len(middle) - 1)
    assert capped.length == len(middle) - 1
    assert joined(capped.handles) == tuple(middle[:-1])


def test_match_without_cache_is_empty_and_creates_nothing():
    tree, _, _ = make_tree()
    assert tree.match_prefix(NS, [1, 2, 3]) == RadixMatch(NS, (), 0, ())
    put(tree, [1, 2, 3])
    assert tree.match_prefix(NS, [2, 3]).length == 0
    assert tree.match_prefix(NS, [1, 2, 3], max_len=0).length == 0
    assert tree.namespaces == [NS]
    with pytest.raises(ValueError, match="max_len"):
        tree.match_prefix(NS, [1], max_len=-1)


def test_match_updates_hits_and_last_use_on_the_path_only():
    tree, clock, _ = make_tree()
    put(tree, [1, 2, 3])
    put(tree, [1, 2, 9])
    clock.now = 5.0
    match = tree.match_prefix(NS, [1, 2, 3, 4])
    assert [(n.hits, n.last_use) for n in match.nodes] == [(1, 5.0), (1, 5.0)]
    (other,) = (n for n in match.nodes[0].children.values() if n is not match.nodes[1])
    assert (other.hits, other.last_use) == (0, 0.0)


def test_split_in_the_middle_of_an_edge_gives_handles_covering_exactly_the_tokens():
    tree, _, _ = make_tree(bpt=3)
    tokens = tuple(range(10, 20))
    (whole,) = put(tree, tokens)
    assert tree.resident_bytes == 30
    tree.match_prefix(NS, tokens)

    match = tree.match_prefix(NS, (10, 11, 12, 13, 99))
    tree.check_integrity()
    (upper,) = match.nodes
    assert match.length == 4
    assert match.handles == (tokens[:4],) and upper.handle == tokens[:4]
    assert upper.token_ids == tokens[:4] and upper.nbytes == 12
    # The original node keeps its identity and the rest of the edge.
    assert whole.parent is upper and whole.handle == tokens[4:] and whole.start == 4
    assert whole.nbytes == 18 and tree.resident_bytes == 30 and len(tree) == 2
    assert (upper.hits, whole.hits) == (2, 1)  # the upper half inherits the old hits
    assert tree.stats()["splits"] == 1


def test_insert_reuses_the_cached_prefix_and_asks_only_for_the_missing_tail():
    tree, _, _ = make_tree()
    put(tree, list(range(10)))
    calls = []
    new = [0, 1, 2, 3, 4, 5, 77, 78]

    def handles_for(a: int, b: int) -> tuple[int, ...]:
        calls.append((a, b))
        return tuple(new[a:b])

    path = tree.insert(NS, new, handles_for)
    tree.check_integrity()
    assert calls == [(6, 8)]
    assert joined(n.handle for n in path) == tuple(new)
    assert [n.token_ids for n in path] == [(0, 1, 2, 3, 4, 5), (77, 78)]
    # Fully cached (even ending mid-edge): nothing is asked for.
    assert tree.insert(NS, new[:3], handles_for)[-1].token_ids == (0, 1, 2)
    assert calls == [(6, 8)]


def test_failed_or_wrong_handle_adds_no_node():
    tree, _, _ = make_tree()
    put(tree, [1, 2, 3])

    def boom(a: int, b: int) -> object:
        raise RuntimeError("engine failed")

    with pytest.raises(RuntimeError):
        tree.insert(NS, [1, 2, 3, 4, 5], boom)
    with pytest.raises(ValueError, match="covers 1 tokens, expected 2"):
        tree.insert(NS, [1, 2, 3, 4, 5], lambda a, b: (4,))
    tree.check_integrity()
    assert tree.match_prefix(NS, [1, 2, 3, 4, 5]).length == 3 and len(tree) == 1


def test_namespaces_are_isolated():
    tree, _, _ = make_tree(bpt=2)
    put(tree, [1, 2, 3, 4], ns=NS)
    put(tree, [1, 2, 9], ns=NS2)
    assert tree.match_prefix(NS, [1, 2, 9]).length == 2
    assert tree.match_prefix(NS2, [1, 2, 3, 4]).length == 2
    assert tree.match_prefix("sha256:other", [1, 2, 3]).length == 0
    assert (tree.namespace_bytes(NS), tree.namespace_bytes(NS2)) == (8, 6)
    assert tree.stats(NS)["tokens"] == 4 and tree.stats(NS2)["tokens"] == 3

    tree.purge(NS)
    tree.check_integrity()
    assert tree.match_prefix(NS, [1, 2, 3, 4]).length == 0
    assert tree.match_prefix(NS2, [1, 2, 9]).length == 3
    assert tree.resident_bytes == 6


# ---------------------------------------------------------------- eviction


def test_lru_eviction_order_with_a_fake_clock():
    tree, clock, rec = make_tree(budget=1 << 20, bpt=1)
    for t, prompt in enumerate(([1, 1], [2, 2], [3, 3], [4, 4]), start=1):
        clock.now = float(t)
        put(tree, prompt)
    clock.now = 10.0
    tree.match_prefix(NS, [1, 1])  # [1, 1] is now the most recent

    removed = tree.evict_until(4)
    tree.check_integrity()
    assert [n.token_ids for n in removed] == [(2, 2), (3, 3)]
    assert rec.removals("token_ids") == [((2, 2), "evict"), ((3, 3), "evict")]
    assert tree.resident_bytes == 4
    assert tree.match_prefix(NS, [1, 1]).length == 2
    assert tree.stats()["evictions"] == 2


def test_insert_of_a_cached_prompt_refreshes_its_lru_position():
    tree, clock, _ = make_tree(bpt=1)
    clock.now = 1.0
    put(tree, [1, 2])
    clock.now = 2.0
    put(tree, [3, 4])
    clock.now = 3.0
    put(tree, [1, 2])  # nothing new, but it was used last
    assert [n.token_ids for n in tree.evict_until(2)] == [(3, 4)]


def test_parents_become_leaves_and_are_evicted_after_their_children():
    tree, clock, rec = make_tree(bpt=1)
    clock.now = 1.0
    put(tree, [1, 2, 3, 4])
    clock.now = 2.0
    put(tree, [1, 2, 5, 6])  # splits [1, 2, 3, 4] into [1, 2] + [3, 4]
    clock.now = 3.0
    put(tree, [7, 8])

    tree.evict_until(0)
    tree.check_integrity()
    assert [t for t, _ in rec.removals("token_ids")] == [(3, 4), (5, 6), (1, 2), (7, 8)]
    assert len(tree) == 0 and tree.resident_bytes == 0


def test_pinned_paths_are_never_evicted_and_budget_is_met_otherwise():
    tree, clock, _ = make_tree(budget=10, bpt=1)
    keep = put(tree, [1, 2, 3, 4])
    clock.now = 1.0
    put(tree, [1, 2, 7, 8, 9])
    tree.pin(keep)
    for i in range(5):
        clock.now = 2.0 + i
        put(tree, [50 + i] * 3)

    assert tree.resident_bytes == 22
    removed = tree.evict_until()
    tree.check_integrity()
    assert tree.resident_bytes <= 10
    assert all(n not in removed for n in keep)
    assert tree.match_prefix(NS, [1, 2, 3, 4]).length == 4

    tree.evict_until(0)
    tree.check_integrity()
    assert tree.resident_bytes == 4 and all(n.pins > 0 for n in keep)
    tree.unpin(keep)
    tree.evict_until(0)
    assert tree.resident_bytes == 0 and len(tree) == 0


def test_purge_keeps_pinned_paths_until_unpinned():
    tree, _, rec = make_tree()
    keep = put(tree, [1, 2, 3])
    put(tree, [1, 2, 4])
    put(tree, [5])
    tree.pin(keep[-1:])
    removed = tree.purge(NS)
    tree.check_integrity()
    assert sorted(n.token_ids for n in removed) == [(4,), (5,)]
    assert {r for _, r, _ in rec.calls} == {"purge"}
    tree.unpin(keep[-1:])
    tree.purge(NS)
    assert len(tree) == 0 and tree.stats()["purged"] == 4


# ---------------------------------------------------------------- pins


def test_splitting_a_pinned_node_pins_both_halves_with_the_same_count():
    tree, _, _ = make_tree()
    path = put(tree, list(range(10)))
    tree.pin(path)
    tree.pin(path)
    (node,) = path
    assert node.pins == 2

    match = tree.match_prefix(NS, [0, 1, 2, 3, 99])  # another request splits it
    tree.check_integrity()
    (upper,) = match.nodes
    assert node.parent is upper and upper.pins == node.pins == 2
    assert tree.evict_until(0) == []  # both halves are protected

    tree.unpin(path)  # the caller releases exactly what it pinned: both halves drop
    assert upper.pins == node.pins == 1
    tree.unpin(path)
    tree.check_integrity()
    assert upper.pins == node.pins == 0
    assert len(tree.evict_until(0)) == 2


def test_pins_lock_the_path_and_unpin_below_zero_raises_without_change():
    tree, _, _ = make_tree()
    a, b = put(tree, [1, 2, 3]) + put(tree, [1, 2, 3, 4, 5])[1:]
    tree.pin([b])
    assert (a.pins, b.pins) == (1, 1)
    with pytest.raises(ValueError, match="below zero"):
        tree.unpin([b, b])
    assert (a.pins, b.pins) == (1, 1)
    with pytest.raises(ValueError, match="below zero"):
        tree.unpin([a, b])  # a holds one pin (b's), releasing two would go below zero
    tree.unpin([b])
    assert (a.pins, b.pins) == (0, 0)
    with pytest.raises(ValueError, match="below zero"):
        tree.unpin([a])
    tree.check_integrity()


def test_pin_rejects_roots_and_evicted_nodes():
    tree, _, _ = make_tree()
    (node,) = put(tree, [1, 2])
    tree.evict_until(0)
    with pytest.raises(ValueError, match="not in this tree"):
        tree.pin([node])
    root = node.parent
    assert root is not None and root.is_root
    with pytest.raises(ValueError, match="not in this tree"):
        tree.pin([root])


# ---------------------------------------------------------------- integrity


def _corruptions():
    def bytes_drift(tree, n):
        n.nbytes += 1

    def wrong_key(tree, n):
        parent = n.parent
        del parent.children[n.token_ids[0]]
        parent.children[12345] = n

    def broken_parent(tree, n):
        n.parent = None

    def empty_edge(tree, n):
        n.token_ids, n.handle, n.nbytes = (), (), 0

    def negative_pins(tree, n):
        n.pins = -1

    def ancestor_unpinned(tree, n):
        for leaf in n.children.values():
            leaf.pins = 1

    def dropped_ancestor(tree, n):
        tree._nodes.discard(n)

    def handle_mismatch(tree, n):
        n.handle = n.handle[:-1]
        n.nbytes = tree._bytes_of(n.handle)

    def resident_drift(tree, n):
        tree._resident += 1

    return [
        ("nbytes != bytes_of", bytes_drift),
        ("stored under key", wrong_key),
        ("point back", broken_parent),
        ("empty edge", empty_edge),
        ("-1 pins", negative_pins),
        ("pins < children", ancestor_unpinned),
        ("node set", dropped_ancestor),
        ("handle covers", handle_mismatch),
        ("resident_bytes", resident_drift),
    ]


@pytest.mark.parametrize("message,corrupt", _corruptions(), ids=[m for m, _ in _corruptions()])
def test_check_integrity_catches_corruption(message, corrupt):
    tree, _, _ = make_tree()
    put(tree, [1, 2, 3, 4])
    put(tree, [1, 2, 5])
    (upper,) = tree.match_prefix(NS, [1, 2]).nodes
    tree.check_integrity()
    corrupt(tree, upper)
    with pytest.raises(AssertionError, match=message):
        tree.check_integrity()


def test_stats_counts_nodes_bytes_tokens_hits_and_pins():
    tree, _, _ = make_tree(bpt=2)
    path = put(tree, [1, 2, 3])
    put(tree, [1, 2, 4, 5])
    tree.match_prefix(NS, [1, 2, 4, 5])
    tree.pin(path)
    stats = tree.stats()
    assert {k: stats[k] for k in ("namespaces", "nodes", "bytes", "tokens", "hits", "pinned")} == {
        "namespaces": 1,
        "nodes": 3,
        "bytes": 10,
        "tokens": 5,
        "hits": 2,
        "pinned": 2,
    }
    assert tree.stats("sha256:unknown")["nodes"] == 0


# ---------------------------------------------------------------- property tests

ALPHABET = st.integers(0, 3)  # few tokens: many shared prefixes and splits
SEQS = st.lists(ALPHABET, min_size=0, max_size=12)
NSS = [NS, NS2]


class PrefixMachine(RuleBasedStateMachine):
    """Huge budget: match length must equal the brute-force longest common prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.tree = RadixTree.create_simulated(bytes_per_token=2)
        self.stored: dict[str, set[tuple[int, ...]]] = {ns: set() for ns in NSS}

    @rule(ns=st.sampled_from(NSS), seq=SEQS)
    def insert(self, ns, seq):
        asked = []

        def handles_for(a: int, b: int) -> tuple[int, ...]:
            asked.append((a, b))
            return tuple(seq[a:b])

        path = self.tree.insert(ns, seq, handles_for)
        cached = max((lcp(seq, s) for s in self.stored[ns]), default=0)
        assert asked == ([] if cached == len(seq) else [(cached, len(seq))])
        assert joined(n.handle for n in path) == tuple(seq)
        self.stored[ns].add(tuple(seq))

    @rule(ns=st.sampled_from(NSS), query=SEQS, cap=st.none() | st.integers(0, 12))
    def match(self, ns, query, cap):
        match = self.tree.match_prefix(ns, query, max_len=cap)
        capped = query if cap is None else query[:cap]
        assert match.length == max((lcp(capped, s) for s in self.stored[ns]), default=0)
        assert joined(match.handles) == tuple(query[: match.length])
        assert [n.handle for n in match.nodes] == list(match.handles)

    @invariant()
    def integrity(self):
        self.tree.check_integrity()
        tokens = sum(_distinct_prefixes(seqs) for seqs in self.stored.values())
        assert self.tree.stats()["tokens"] == tokens
        assert self.tree.resident_bytes == 2 * tokens


def _distinct_prefixes(seqs: set[tuple[int, ...]]) -> int:
    """Distinct non-empty prefixes: a trie of ``seqs`` holds exactly that many tokens."""
    return len({s[:i] for s in seqs for i in range(1, len(s) + 1)})


PrefixMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestPrefixMachine = PrefixMachine.TestCase


class EvictionMachine(RuleBasedStateMachine):
    """Small budget, pins and eviction: never invent tokens, keep pinned paths, meet budget."""

    BUDGET = 20

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.removed: list[RadixNode] = []
        self.tree = RadixTree.create_simulated(
            self.BUDGET, clock=lambda: self.now, on_remove=lambda n, r: self.removed.append(n)
        )
        self.stored: dict[str, set[tuple[int, ...]]] = {ns: set() for ns in NSS}
        self.held: list[tuple[str, tuple[int, ...], list[RadixNode]]] = []

    @rule(ns=st.sampled_from(NSS), seq=SEQS)
    def insert(self, ns, seq):
        self.now += 1
        self.tree.insert(ns, seq, lambda a, b: tuple(seq[a:b]))
        self.stored[ns].add(tuple(seq))

    @rule(ns=st.sampled_from(NSS), query=SEQS, pin=st.booleans())
    def match(self, ns, query, pin):
        self.now += 1
        match = self.tree.match_prefix(ns, query)
        assert match.length <= max((lcp(query, s) for s in self.stored[ns]), default=0)
        assert joined(match.handles) == tuple(query[: match.length])
        if pin and match.nodes:
            self.tree.pin(match.nodes)
            self.held.append((ns, tuple(query[: match.length]), list(match.nodes)))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def unpin(self, data):
        i = data.draw(st.integers(0, len(self.held) - 1))
        _, _, nodes = self.held.pop(i)
        self.tree.unpin(nodes)

    @rule(budget=st.none() | st.integers(0, 30))
    def evict(self, budget):
        target = self.BUDGET if budget is None else budget
        evicted = self.tree.evict_until(budget)
        assert evicted == self.removed
        self.removed.clear()
        held = {id(n) for _, _, nodes in self.held for n in nodes}
        assert not any(id(n) in held for n in evicted), "a pinned node was evicted"
        stats = self.tree.stats()
        assert self.tree.resident_bytes <= target or stats["pinned"] == stats["nodes"]

    @invariant()
    def integrity(self):
        self.tree.check_integrity()
        for _, tokens, nodes in self.held:  # a pinned path still holds its exact KV
            node, handles = nodes[-1], []
            assert node.pins > 0
            while node.parent is not None:
                handles.append(node.handle)
                node = node.parent
            assert joined(reversed(handles)) == tokens


EvictionMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestEvictionMachine = EvictionMachine.TestCase
