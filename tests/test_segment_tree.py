"""SegmentTree: matching, LRU eviction, TTL, quotas, purge, removal callbacks, integrity.

The stateful test drives the tree with random operations against a small
reference model and calls ``check_integrity()`` after every step.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from segcache.kv import SegmentNode, SegmentTree
from segcache.kv.hashing import chain_digest, namespace_digest, segment_digest
from tests.tree_helpers import FakeClock, Recorder

NS = namespace_digest("tenant-a", "smollm2-135m")
NS2 = namespace_digest("tenant-b", "smollm2-135m")
SEG = {name: segment_digest(f"block {name} " * 8) for name in "ABCDEFGXYZ"}


def make_tree(budget: int = 1 << 20, **kwargs) -> tuple[SegmentTree, FakeClock, Recorder]:
    clock, rec = FakeClock(), Recorder()
    tree = SegmentTree.create_simulated(budget_bytes=budget, clock=clock, on_remove=rec, **kwargs)
    return tree, clock, rec


def add(tree: SegmentTree, parent: SegmentNode, name: str, nbytes: int = 10, **kw) -> SegmentNode:
    return tree.insert(parent, SEG[name], [ord(name)] * 3, f"kv:{name}", nbytes, **kw)


def add_path(tree: SegmentTree, ns: str, names: str, nbytes: int = 10) -> list[SegmentNode]:
    node, out = tree.root(ns), []
    for name in names:
        node = add(tree, node, name, nbytes)
        out.append(node)
    return out


def serve(tree: SegmentTree, ns: str, names: str) -> int:
    """What the engine does per request: match, pin, insert the rest, unpin."""
    digests = [SEG[n] for n in names]
    matched = tree.match(ns, digests)
    tree.pin(matched)
    node, new = (matched[-1] if matched else tree.root(ns)), []
    for name in names[len(matched) :]:
        node = add(tree, node, name)
        new.append(node)
    tree.pin(new)
    tree.unpin(matched + new)
    tree.check_integrity()
    return len(matched)


# ------------------------------------------------------------------ matching


def test_seed_000_agents_share_prefixes():
    tree, _, _ = make_tree()
    assert [serve(tree, NS, p) for p in ("ABD", "ACE", "ABE")] == [0, 1, 2]
    assert len(tree) == 6  # A, B, D, C, E under C, E under B
    assert serve(tree, NS, "ABD") == 3
    abd = tree.match(NS, [SEG["A"], SEG["B"], SEG["D"]])
    expected = chain_digest(chain_digest(chain_digest(NS, SEG["A"]), SEG["B"]), SEG["D"])
    assert abd[-1].chain == expected
    assert tree.get_by_chain(expected) is abd[-1]
    assert tree.path_to(abd[-1]) == abd
    assert [n.depth for n in abd] == [1, 2, 3]
    assert tree.resident_bytes == 60 and tree.namespace_bytes(NS) == 60


def test_namespaces_are_isolated():
    tree, _, _ = make_tree()
    add_path(tree, NS, "AB")
    assert tree.match(NS2, [SEG["A"], SEG["B"]]) == []
    assert NS2 not in tree.namespaces  # a miss creates no root
    other = add_path(tree, NS2, "AB")
    mine = tree.match(NS, [SEG["A"], SEG["B"]])
    assert [n.digest for n in other] == [n.digest for n in mine]
    assert {n.chain for n in other}.isdisjoint(n.chain for n in mine)
    assert tree.namespace_bytes(NS) == tree.namespace_bytes(NS2) == 20


def test_match_counts_hits_and_does_not_pin():
    tree, clock, _ = make_tree()
    a, b = add_path(tree, NS, "AB")
    clock.now = 7.0
    got = tree.match(NS, [SEG["A"], SEG["C"], SEG["B"]])
    assert got == [a]
    assert (a.hits, a.last_use, a.pins) == (1, 7.0, 0)
    assert (b.hits, b.last_use) == (0, 0.0)


def test_insert_existing_child_returns_it_unchanged():
    tree, _, rec = make_tree()
    (a,) = add_path(tree, NS, "A")
    again = tree.insert(tree.root(NS), SEG["A"], [1], "new-handle", 999)
    assert again is a and a.handle == "kv:A" and a.nbytes == 10
    assert tree.resident_bytes == 10 and rec.calls == []


def test_insert_rejects_foreign_or_removed_parent():
    tree, _, _ = make_tree()
    other, _, _ = make_tree()
    with pytest.raises(ValueError, match="does not belong"):
        add(tree, other.root(NS), "A")
    (a,) = add_path(tree, NS, "A")
    tree.purge(NS)
    with pytest.raises(ValueError, match="does not belong"):
        add(tree, a, "B")
    with pytest.raises(ValueError, match="nbytes"):
        add(tree, tree.root(NS), "B", nbytes=-1)


# ------------------------------------------------------------------ eviction


def test_lru_evicts_least_recently_used_leaf_first():
    tree, clock, rec = make_tree(budget=25)
    leaves = []
    for t, name in enumerate("XYZ"):
        clock.now = float(t)
        leaves.append(add(tree, tree.root(NS), name))
    x, y, z = leaves
    clock.now = 100.0
    tree.match(NS, [SEG["X"]])  # X becomes the most recent
    assert tree.evict_until() == [y]
    assert tree.resident_bytes == 20
    assert tree.evict_until(0) == [z, x]
    assert rec.removals("digest") == [(SEG["Y"], "evict"), (SEG["Z"], "evict"), (SEG["X"], "evict")]
    assert len(tree) == 0 and tree.resident_bytes == 0


def test_inner_node_evicted_only_after_its_children():
    tree, clock, _ = make_tree()
    p, q = add_path(tree, NS, "AB")
    clock.now = 5.0
    r = add(tree, tree.root(NS), "C")
    # A is the oldest but is not a leaf until B goes.
    assert tree.evict_until(25) == [q]
    assert tree.evict_until(0) == [p, r]


def test_pinned_path_is_never_evicted():
    tree, clock, _ = make_tree(budget=0)
    a, b = add_path(tree, NS, "AB")
    clock.now = 1.0
    c = add(tree, tree.root(NS), "C")
    tree.pin([b])
    assert tree.evict_until() == [c]  # A is protected by its pinned child
    assert tree.resident_bytes == 20  # budget cannot be met
    assert tree.match(NS, [SEG["A"], SEG["B"]]) == [a, b]
    tree.unpin([b])
    assert tree.evict_until() == [b, a]
    assert tree.resident_bytes == 0


def test_quota_applies_per_namespace():
    tree, clock, _ = make_tree(tenant_quota_bytes=25)
    for i, name in enumerate("ABC"):
        clock.now = float(i)
        add(tree, tree.root(NS), name)
    (x,) = add_path(tree, NS2, "X")
    assert [n.digest for n in tree.enforce_quota(NS)] == [SEG["A"]]
    assert tree.namespace_bytes(NS) == 20 and tree.namespace_bytes(NS2) == 10
    assert tree.enforce_quota(NS2) == [] and tree.get_by_chain(x.chain) is x
    no_quota, _, _ = make_tree()
    add_path(no_quota, NS, "ABC")
    assert no_quota.enforce_quota(NS) == []


# ------------------------------------------------------------------ expiry


def test_ttl_expiry_turns_hit_into_miss():
    tree, clock, rec = make_tree()
    a = add(tree, tree.root(NS), "A", ttl_s=10.0)
    b = add(tree, a, "B")  # no TTL of its own, but its KV needs A's
    clock.now = 5.0
    assert tree.match(NS, [SEG["A"], SEG["B"]]) == [a, b]
    assert a.expires_at == 15.0  # a hit refreshes the TTL
    clock.now = 14.0
    assert tree.match(NS, [SEG["A"]]) == [a]
    clock.now = 24.0
    assert tree.match(NS, [SEG["A"], SEG["B"]]) == []
    assert rec.removals("digest") == [(SEG["B"], "expire"), (SEG["A"], "expire")]
    assert len(tree) == 0 and tree.stats()["expirations"] == 2


def test_pinned_node_not_expired_until_unpinned():
    tree, clock, _ = make_tree()
    a = add(tree, tree.root(NS), "A", ttl_s=1.0)
    tree.pin([a])
    clock.now = 50.0
    assert tree.expire() == []
    assert tree.get_by_chain(a.chain) is a
    tree.unpin([a])
    assert tree.expire() == [a]
    assert tree.get_by_chain(a.chain) is None


def test_expire_keeps_paths_to_pins_and_removes_other_branches():
    tree, clock, _ = make_tree()
    a = add(tree, tree.root(NS), "A", ttl_s=1.0)
    b = add(tree, a, "B")
    c = add(tree, a, "C", ttl_s=1.0)
    tree.pin([b])
    assert tree.expire(now=10.0) == [c]
    clock.now = 10.0
    assert tree.match(NS, [SEG["A"]]) == []  # expired, kept only for the pinned request
    assert tree.get_by_chain(a.chain) is a
    tree.unpin([b])
    assert tree.expire(now=10.0) == [b, a]


def test_insert_over_expired_node_replaces_payload_and_keeps_subtree():
    tree, clock, rec = make_tree()
    a = add(tree, tree.root(NS), "A", ttl_s=1.0)
    b = add(tree, a, "B")
    clock.now = 5.0
    again = tree.insert(tree.root(NS), SEG["A"], [9], "kv:A2", 30, ttl_s=4.0)
    assert again is a and a.handle == "kv:A2" and a.expires_at == 9.0
    assert rec.calls == [(a, "replace", "kv:A")]
    assert tree.resident_bytes == 40
    assert tree.match(NS, [SEG["A"], SEG["B"]]) == [a, b]


def test_set_ttl_sets_and_clears_expiry():
    tree, clock, _ = make_tree()
    (a,) = add_path(tree, NS, "A")
    clock.now = 3.0
    tree.set_ttl(a, 2.0)
    assert (a.ttl_s, a.expires_at) == (2.0, 5.0)
    tree.set_ttl(a, None)
    assert tree.expire(now=100.0) == []
    with pytest.raises(ValueError):
        tree.set_ttl(a, 0.0)
    with pytest.raises(ValueError, match="roots"):
        tree.set_ttl(tree.root(NS), 1.0)


# ------------------------------------------------------------------ purge, pins, callbacks


def test_purge_drops_unpinned_and_keeps_pinned_paths():
    tree, _, _ = make_tree()
    a, b, d = add_path(tree, NS, "ABD")
    c = add(tree, a, "C")
    (x,) = add_path(tree, NS2, "X")
    tree.pin([b])
    assert set(tree.purge(NS)) == {d, c}
    assert tree.path_to(b) == [a, b] and tree.get_by_chain(x.chain) is x
    tree.unpin([b])
    assert tree.purge(NS) == [b, a]
    assert tree.namespace_bytes(NS) == 0 and NS in tree.namespaces
    assert tree.purge("unknown") == []


def test_pin_and_unpin_are_counted_and_all_or_nothing():
    tree, _, _ = make_tree()
    a, b = add_path(tree, NS, "AB")
    tree.pin([a, a, b])
    assert (a.pins, b.pins) == (2, 1)
    with pytest.raises(ValueError, match="below zero"):
        tree.unpin([a, b, b])
    assert (a.pins, b.pins) == (2, 1)
    tree.unpin([a, a, b])
    with pytest.raises(ValueError, match="below zero"):
        tree.unpin([a])
    with pytest.raises(ValueError, match="roots"):
        tree.pin([b, tree.root(NS)])
    assert b.pins == 0


def test_on_remove_called_once_per_removed_node_with_reason():
    tree, clock, rec = make_tree(budget=1 << 20)
    a, b, c = add_path(tree, NS, "ABC")
    e = add(tree, a, "E", ttl_s=1.0)
    f = add(tree, tree.root(NS), "F")
    clock.now = 2.0
    tree.insert(a, SEG["E"], [5], "kv:E2", 10)  # expired E: payload replaced
    tree.match(NS, [SEG["F"]])
    tree.evict_until(40)  # C (oldest leaf) goes
    tree.set_ttl(f, 1.0)
    tree.expire(now=10.0)
    tree.purge(NS)
    counts = Counter((id(node), reason) for node, reason, _ in rec.calls)
    assert set(counts.values()) == {1}
    assert [(n, r) for n, r, _ in rec.calls[:3]] == [(e, "replace"), (c, "evict"), (f, "expire")]
    assert rec.calls[0][2] == "kv:E"  # the callback sees the handle being dropped
    purged = [n for n, r, _ in rec.calls[3:] if r == "purge"]
    assert len(purged) == len(rec.calls) - 3 == 3 and set(purged) == {b, e, a}
    assert purged.index(a) > max(purged.index(b), purged.index(e))  # children first
    assert len(tree) == 0


# ------------------------------------------------------------------ stats, integrity


def test_stats_counts_and_tree_summary_is_capped_json():
    tree, clock, _ = make_tree(budget=43)
    a, b, d = add_path(tree, NS, "ABD")
    for name in "CEFG":
        add(tree, tree.root(NS), name, nbytes=1)
    add_path(tree, NS2, "X")
    clock.now = 1.0
    tree.match(NS, [SEG["A"], SEG["B"]])
    clock.now = 2.0
    tree.pin(tree.match(NS, [SEG["A"]]))
    assert tree.evict_until() == [d]  # 44 bytes -> 34
    st_all, st_ns = tree.stats(), tree.stats(NS, max_depth=1, max_children=2)
    json.dumps(st_all)
    assert (st_all["namespaces"], st_all["nodes"], st_all["bytes"]) == (2, 7, 34)
    assert st_all["tokens"] == 21
    assert (st_all["hits"], st_all["pinned"], st_all["evictions"]) == (3, 1, 1)
    assert (st_ns["nodes"], st_ns["bytes"], st_ns["evictions"]) == (6, 24, 1)
    (root,) = st_ns["tree"]
    assert root["digest"] == NS.removeprefix("sha256:")[:16] and root["bytes"] == 0
    shown = [c["digest"] for c in root["children"]]
    assert shown == [SEG[n].removeprefix("sha256:")[:16] for n in "AC"]  # most hit first
    assert root["omitted"] == 3  # E, F, G
    top = root["children"][0]
    assert (top["hits"], top["pins"], top["bytes"], top["tokens"]) == (2, 1, 10, 3)
    assert top["children"] == [] and top["omitted"] == 1  # B, cut by max_depth
    assert tree.stats(NS2)["nodes"] == 1 and tree.stats(NS2)["evictions"] == 0


def test_peek_sees_what_match_would_without_its_effects():
    tree, clock, rec = make_tree()
    a, b = add_path(tree, NS, "AB")
    add(tree, a, "C", ttl_s=1.0)
    before = [(n.hits, n.last_use, n.expires_at) for n in (a, b)]
    clock.now = 5.0
    assert tree.peek(NS, [SEG[n] for n in "ABD"]) == [a, b]
    assert tree.peek(NS, [SEG["B"]]) == []  # a prefix from the root, like match
    assert tree.peek(NS, [SEG["A"], SEG["C"]]) == [a]  # C expired: a miss ...
    assert len(tree) == 3 and rec.removals("digest") == []  # ... but not removed by a peek
    assert [(n.hits, n.last_use, n.expires_at) for n in (a, b)] == before
    assert tree.peek(NS2, [SEG["A"]]) == [] and NS2 not in tree.namespaces  # no root created
    assert tree.match(NS, [SEG["A"], SEG["C"]]) == [a] and a.hits == 1  # match: effects
    assert rec.removals("digest") == [(SEG["C"], "expire")]
    tree.check_integrity()


def test_nodes_lists_every_node_read_only():
    tree, _, _ = make_tree()
    a, b = add_path(tree, NS, "AB")
    (c,) = add_path(tree, NS2, "C")
    assert tree.nodes(NS) == [a, b] and tree.nodes(NS2) == [c]
    assert sorted(n.digest for n in tree.nodes()) == sorted(SEG[n] for n in "ABC")
    assert tree.nodes("sha256:unknown") == [] and a.hits == 0


def test_check_integrity_catches_broken_invariants():
    tree, _, _ = make_tree()
    a, b = add_path(tree, NS, "AB")
    tree.check_integrity()
    b.nbytes += 1
    with pytest.raises(AssertionError, match="resident_bytes"):
        tree.check_integrity()
    b.nbytes -= 1
    b.chain = chain_digest(NS, SEG["B"])
    with pytest.raises(AssertionError, match="chain"):
        tree.check_integrity()
    b.chain = chain_digest(a.chain, SEG["B"])
    b.parent = tree.root(NS)
    with pytest.raises(AssertionError, match="parent"):
        tree.check_integrity()
    b.parent = a
    a.pins = -1
    with pytest.raises(AssertionError, match="pins"):
        tree.check_integrity()
    a.pins = 0
    tree.check_integrity()


# ------------------------------------------------------------------ stateful model

SEGS = [segment_digest(c) for c in "abcd"]
NSS = [NS, NS2]
BUDGET, QUOTA = 120, 80


@dataclass
class ModelNode:
    ns: str
    parent: str
    digest: str
    handle: object
    nbytes: int
    last_use: float
    ttl: float | None
    expires_at: float | None
    pins: int = 0
    hits: int = 0


class TreeMachine(RuleBasedStateMachine):
    """Random operations against a reference model keyed by chain digest."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.log: list[tuple[str, str, object]] = []
        self.tree = SegmentTree.create_simulated(
            budget_bytes=BUDGET,
            clock=lambda: self.now,
            on_remove=lambda n, r: self.log.append((n.chain, r, n.handle)),
            tenant_quota_bytes=QUOTA,
        )
        self.model: dict[str, ModelNode] = {}
        self.roots: set[str] = set()

    # model helpers
    def expired(self, chain: str) -> bool:
        m = self.model[chain]
        return m.pins == 0 and m.expires_at is not None and m.expires_at <= self.now

    def subtree(self, chain: str) -> set[str]:
        out, todo = {chain}, [chain]
        while todo:
            parent = todo.pop()
            kids = [c for c, m in self.model.items() if m.parent == parent]
            out.update(kids)
            todo.extend(kids)
        return out

    def has_pins(self, chain: str) -> bool:
        return any(self.model[c].pins for c in self.subtree(chain))

    def used(self, ns: str | None) -> int:
        return sum(m.nbytes for m in self.model.values() if ns in (None, m.ns))

    def leaves(self, ns: str | None) -> list[str]:
        parents = {m.parent for m in self.model.values()}
        return [
            c
            for c, m in self.model.items()
            if c not in parents and m.pins == 0 and ns in (None, m.ns)
        ]

    def take_log(self, reason: str) -> list[str]:
        assert all(r == reason for _, r, _ in self.log), self.log
        chains = [c for c, _, _ in self.log]
        assert len(chains) == len(set(chains)), "a node was reported twice"
        self.log.clear()
        return chains

    # rules
    @rule(
        ns=st.sampled_from(NSS),
        path=st.lists(st.sampled_from(SEGS), min_size=1, max_size=4),
        sizes=st.lists(st.integers(0, 40), min_size=4, max_size=4),
        ttl=st.sampled_from([None, None, 3.0, 10.0]),
    )
    def insert_path(self, ns, path, sizes, ttl):
        parent, pchain = self.tree.root(ns), ns
        self.roots.add(ns)
        for digest, size in zip(path, sizes, strict=False):
            chain, handle = chain_digest(pchain, digest), object()
            old = self.model.get(chain)
            was_expired = old is not None and self.expired(chain)
            node = self.tree.insert(parent, digest, [len(pchain)], handle, size, ttl_s=ttl)
            assert node.chain == chain
            if old is not None and not was_expired:
                assert node.handle is old.handle and node.nbytes == old.nbytes
                assert self.log == []
            else:
                if was_expired:
                    assert self.log == [(chain, "replace", old.handle)]
                    self.log.clear()
                exp = None if ttl is None else self.now + ttl
                pins = old.pins if old else 0
                self.model[chain] = ModelNode(
                    ns, pchain, digest, handle, size, self.now, ttl, exp, pins
                )
            parent, pchain = node, chain

    @precondition(lambda self: self.model)
    @rule(data=st.data(), extra=st.lists(st.sampled_from(SEGS), max_size=2))
    def match_stored_path(self, data, extra):
        """Match the full path of a stored node (plus a random tail): mostly hits."""
        chain = data.draw(st.sampled_from(sorted(self.model)))
        path, m = [], self.model[chain]
        while True:
            path.insert(0, m.digest)
            if m.parent not in self.model:
                break
            m = self.model[m.parent]
        self.match(self.model[chain].ns, path + extra)

    @rule(ns=st.sampled_from(NSS), path=st.lists(st.sampled_from(SEGS), max_size=5))
    def match(self, ns, path):
        expected, removed, pchain = [], set(), ns
        for digest in path if ns in self.roots else []:
            chain = chain_digest(pchain, digest)
            if chain not in self.model:
                break
            if self.expired(chain):
                removed = set() if self.has_pins(chain) else self.subtree(chain)
                break
            expected.append(chain)
            pchain = chain
        got = self.tree.match(ns, path)
        assert [n.chain for n in got] == expected
        assert set(self.take_log("expire")) == removed
        for chain in removed:
            del self.model[chain]
        for chain in expected:
            m = self.model[chain]
            m.hits, m.last_use = m.hits + 1, self.now
            m.expires_at = None if m.ttl is None else self.now + m.ttl

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def pin(self, data):
        chain = data.draw(st.sampled_from(sorted(self.model)))
        self.tree.pin([self.tree.get_by_chain(chain)])
        self.model[chain].pins += 1

    @precondition(lambda self: any(m.pins for m in self.model.values()))
    @rule(data=st.data())
    def unpin(self, data):
        chain = data.draw(st.sampled_from(sorted(c for c, m in self.model.items() if m.pins)))
        self.tree.unpin([self.tree.get_by_chain(chain)])
        self.model[chain].pins -= 1

    @precondition(lambda self: any(not m.pins for m in self.model.values()))
    @rule(data=st.data())
    def unpin_unpinned_raises(self, data):
        chain = data.draw(st.sampled_from(sorted(c for c, m in self.model.items() if not m.pins)))
        with pytest.raises(ValueError):
            self.tree.unpin([self.tree.get_by_chain(chain)])

    @precondition(lambda self: self.model)
    @rule(data=st.data(), ttl=st.sampled_from([None, 1.0, 5.0]))
    def set_ttl(self, data, ttl):
        chain = data.draw(st.sampled_from(sorted(self.model)))
        self.tree.set_ttl(self.tree.get_by_chain(chain), ttl)
        m = self.model[chain]
        m.ttl, m.expires_at = ttl, None if ttl is None else self.now + ttl

    def replay_lru(self, removed: list[SegmentNode], ns: str | None, target: int) -> None:
        """Each removed node must have been a least-recently-used evictable leaf."""
        assert [n.chain for n in removed] == self.take_log("evict")
        for node in removed:
            assert self.used(ns) > target, "evicted below the target"
            candidates = self.leaves(ns)
            assert node.chain in candidates
            oldest = min(self.model[c].last_use for c in candidates)
            assert self.model[node.chain].last_use == oldest
            del self.model[node.chain]
        assert self.used(ns) <= target or not self.leaves(ns)

    @rule(budget=st.one_of(st.none(), st.integers(0, 150)))
    def evict(self, budget):
        target = BUDGET if budget is None else budget
        self.replay_lru(self.tree.evict_until(budget), None, target)
        if not any(m.pins for m in self.model.values()):
            assert self.tree.resident_bytes <= target

    @rule(ns=st.sampled_from(NSS))
    def enforce_quota(self, ns):
        self.replay_lru(self.tree.enforce_quota(ns), ns, QUOTA)

    @rule()
    def expire(self):
        expected: set[str] = set()
        for chain in list(self.model):
            if self.expired(chain) and not self.has_pins(chain):
                expected |= self.subtree(chain)
        removed = self.tree.expire()
        assert [n.chain for n in removed] == self.take_log("expire")
        assert {n.chain for n in removed} == expected
        for chain in expected:
            del self.model[chain]

    @rule(ns=st.sampled_from(NSS))
    def purge(self, ns):
        expected = {c for c, m in self.model.items() if m.ns == ns and not self.has_pins(c)}
        removed = self.tree.purge(ns)
        assert [n.chain for n in removed] == self.take_log("purge")
        assert {n.chain for n in removed} == expected
        for chain in expected:
            del self.model[chain]

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0, 4.0, 12.0]))
    def advance_clock(self, dt):
        self.now += dt

    @invariant()
    def tree_matches_model(self):
        self.tree.check_integrity()
        assert self.log == [], "removal reported outside a removing call"
        assert set(self.tree.namespaces) == self.roots
        assert len(self.tree) == len(self.model)
        for chain, m in self.model.items():
            node = self.tree.get_by_chain(chain)
            assert node is not None and node.handle is m.handle
            assert (node.nbytes, node.pins, node.hits) == (m.nbytes, m.pins, m.hits)
            assert (node.last_use, node.expires_at) == (m.last_use, m.expires_at)
        assert self.tree.resident_bytes == self.used(None)
        for ns in NSS:
            assert self.tree.namespace_bytes(ns) == self.used(ns)


TestTreeMachine = TreeMachine.TestCase
TestTreeMachine.settings = settings(max_examples=50, stateful_step_count=40, deadline=None)
