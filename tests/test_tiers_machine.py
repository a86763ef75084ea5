"""The segment tree over a real disk tier, driven by random operations (hypothesis):
serve (match, insert), evict (demote to disk), promote (load a missing unit back
into RAM), restart (RAM lost, disk index rebuilt from the files' headers), purge.

After every step: ``tree.check_integrity()``, ``disk.check_integrity()`` (index ==
files, within budget), and every entry ever loaded was the exact KV of its path,
under its own tenant."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from segcache.kv import SegmentTree
from segcache.kv.hashing import namespace_digest, segment_digest
from segcache.kv.tiers import CacheKey, DiskTier, Expected, KVData, encode, token_digest
from tests.tier_helpers import FP, LAYOUT

TENANTS = ["tenant-a", "tenant-b"]
NSS = {t: namespace_digest(t, FP) for t in TENANTS}
NAMES = "ABCDE"
SEG = {n: segment_digest(f"block {n} " * 4) for n in NAMES}
RAM_BUDGET = 3 * 200  # about three nodes
DISK_BUDGET = 5 * 1400  # about five payload files


def truth(tenant: str, path: str) -> tuple[list[int], np.ndarray]:
    """The token ids and KV [1, 2, 1, n, 4] the unit at the end of ``path`` has (any tenant's
    would differ: a payload of another tenant served here would show)."""
    seed = abs(hash((tenant, path))) % (1 << 31)
    n = 2 + len(path) % 3
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(0, 1000, n)], rng.standard_normal((1, 2, 1, n, 4), dtype=np.float32)


class TieredTreeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="segcache-tiers-"))
        self.disk = DiskTier(self.root, DISK_BUDGET, fsync=False)
        self.tree = self._new_tree()
        self.paths: dict[str, str] = {}  # chain -> "tenant/path" of every node ever inserted

    def _new_tree(self) -> SegmentTree:
        return SegmentTree.create_simulated(RAM_BUDGET, clock=lambda: 0.0, on_remove=self._demote)

    def _demote(self, node, reason: str) -> None:
        if reason == "evict":
            key = CacheKey(node.namespace, FP, node.parent.chain, node.digest, node.chain)
            self.disk.put(key, encode(key, node.handle, token_digest(node.token_ids), LAYOUT))

    def _walk(self, tenant: str, path: str):
        """Match ``path``; each missing unit promoted from disk if there, else computed."""
        ns = NSS[tenant]
        matched = self.tree.match(ns, [SEG[n] for n in path])
        self.tree.pin(matched)
        pinned, node = list(matched), (matched[-1] if matched else self.tree.root(ns))
        promoted = 0
        for i in range(len(matched), len(path)):
            ids, kv = truth(tenant, path[:i + 1])
            key = CacheKey.child(ns, FP, node.chain, SEG[path[i]])
            hit = self.disk.get(Expected(key, LAYOUT, token_digest(ids)))
            if hit is not None:
                assert np.array_equal(hit.kv.array(), kv), "a loaded entry is not its path's KV"
                promoted += 1
            handle = hit.kv if hit is not None else KVData.from_array(kv)
            node = self.tree.insert(node, SEG[path[i]], ids, handle, 200)
            self.paths[node.chain] = f"{tenant}/{path[:i + 1]}"
            self.tree.pin([node])
            pinned.append(node)
        self.tree.unpin(pinned)
        self.tree.evict_until()
        return promoted

    @rule(tenant=st.sampled_from(TENANTS), path=st.text(NAMES, min_size=1, max_size=4))
    def serve(self, tenant, path):
        self._walk(tenant, path)

    @rule(budget=st.integers(0, RAM_BUDGET))
    def evict(self, budget):
        self.tree.evict_until(budget)

    @rule(tenant=st.sampled_from(TENANTS), path=st.text(NAMES, min_size=1, max_size=4))
    def evict_all_then_promote(self, tenant, path):
        self._walk(tenant, path)
        self.tree.evict_until(0)
        before = self.disk.stats().hits
        self._walk(tenant, path)
        assert self.disk.stats().hits - before <= len(path)

    @rule()
    def restart(self):
        self.disk.close()
        self.disk = DiskTier(self.root, DISK_BUDGET, fsync=False)
        self.tree = self._new_tree()

    @rule(tenant=st.sampled_from(TENANTS))
    def purge(self, tenant):
        self.tree.purge(NSS[tenant])
        self.disk.delete_namespace(NSS[tenant])
        ns_hex = NSS[tenant].split(":", 1)[1]
        assert not list(self.root.glob(f"{ns_hex}/*"))

    @invariant()
    def consistent(self):
        self.tree.check_integrity()
        self.disk.check_integrity()
        assert self.tree.resident_bytes <= RAM_BUDGET
        assert self.disk.stats().bytes <= DISK_BUDGET
        assert sum(self.disk.stats().rejected.values()) == 0  # nothing damaged, nothing misplaced
        for p in self.root.glob("*/*.safetensors"):
            tenant = self.paths["sha256:" + p.stem].split("/")[0]
            assert p.parent.name == NSS[tenant].split(":", 1)[1]  # under its own tenant

    def teardown(self):
        self.disk.close()
        shutil.rmtree(self.root, ignore_errors=True)


TestTieredTreeMachine = TieredTreeMachine.TestCase
TestTieredTreeMachine.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
