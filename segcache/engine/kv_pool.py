"""Request KV buffers: kept when a request ends and handed to the next one that
fits, remembering which cached nodes' KV they already hold (``KVPool``); and the
byte helpers for KV handles."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from segcache.kv.segment_tree import SegmentNode

# What a request buffer holds from slot 0 on: (node, its handle) per cached node, in slot
# order, as weak references: a buffer in the pool keeps no evicted KV alive.
Held = list[tuple[weakref.ref, weakref.ref]]


class KVPool:
    """Request KV buffers kept when a request ends and handed to a later one. A fresh
    buffer of tens of MB is page-faulted in on first write (~30 ms of a warm turn at
    3.6k tokens on the 2-core host, against ~8 ms to copy the cached KV into a mapped
    one). A kept buffer remembers which cached nodes' KV it holds from slot 0 on, so
    a later request whose matched prefix starts with the same nodes (the same node
    objects with the same handles: not evicted, not replaced) skips copying those.
    Capacities are rounded up to ``ROUND`` tokens so buffers fit later requests; a
    buffer more than twice the need is not used; at most ``max_bytes`` are kept, the
    oldest dropped first. Engine thread only."""

    ROUND = 256

    def __init__(self, new_kv: Callable[[int], torch.Tensor], max_bytes: int) -> None:
        self._new = new_kv
        self._max = max_bytes
        self._free: list[tuple[torch.Tensor, Held]] = []

    @staticmethod
    def _common(held: Held, nodes: list[SegmentNode]) -> int:
        n = 0
        for (node_ref, handle_ref), node in zip(held, nodes, strict=False):
            if node_ref() is not node or handle_ref() is not node.handle:
                break
            n += 1
        return n

    def take(self, capacity: int, nodes: list[SegmentNode] = ()) -> tuple[torch.Tensor, int]:
        """A buffer for ``capacity`` tokens and how many of ``nodes`` (from the first)
        it already holds at their slots: the fitting buffer that holds the most, the
        smallest of those."""
        cap = -(-capacity // self.ROUND) * self.ROUND
        fits = [i for i, (kv, _) in enumerate(self._free) if cap <= kv.shape[3] <= 2 * cap]
        if not fits:
            return self._new(cap), 0
        nodes = list(nodes)
        common = {i: self._common(self._free[i][1], nodes) for i in fits}
        best = min(fits, key=lambda i: (-common[i], self._free[i][0].shape[3]))
        return self._free.pop(best)[0], common[best]

    def prepare(self, capacity: int) -> None:
        """Keep one buffer for ``capacity`` tokens ready with its pages faulted in now
        (written once), at start-up, instead of during the first request that needs
        it: the first request after a restart, a hit from the disk tier, paid ~8-10 ms
        per 26 MB of KV faulting a fresh buffer in, which a later request's kept buffer
        never costs."""
        kv = self._new(-(-capacity // self.ROUND) * self.ROUND)
        kv.zero_()
        self.give(kv)

    def give(self, kv: torch.Tensor, held: Held = ()) -> None:
        """``kv`` must not be referenced anywhere else (node handles are clones);
        ``held``: the nodes whose KV it holds from slot 0 on (``_Run.held``)."""
        self._free.append((kv, list(held)))
        while self._free and sum(kv_bytes(b) for b, _ in self._free) > self._max:
            self._free.pop(0)


KV_POOL_BYTES = 256 << 20  # ~3 buffers of 4k tokens for SmolLM2-135M


def split_kv(handle: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Clones, not views: a view would keep the whole original storage alive.
    return handle[:, :, :, :k].clone(), handle[:, :, :, k:].clone()


def kv_bytes(handle: torch.Tensor) -> int:
    return handle.numel() * handle.element_size()
