"""Non-prefix reuse (CacheBlend, EuroSys 2025): a segment's KV reused wherever it
stands, with a fraction of its tokens recomputed (``Blender``, one per engine).

Standalone entries. A segment eligible for blending (marked ``reuse: "anywhere"``,
or any segment with ``--blend auto``) also gets an entry keyed by (namespace,
segment digest) with no chaining: its tokens computed right behind the sink (the
template's opening tokens, ``prompt.sink_ids``), the sink's KV dropped, keys
un-rotated (stored before RoPE) so that RoPE is applied exactly at the positions
where the segment is used. They live in the same segment tree (one byte budget,
LRU, TTL, purge) as depth-1 children of a second root per tenant, derived from
the tenant's namespace: another tenant can never reach them. A chat request
computes the entries its eligible segments lack in a background job after its
reply (so it does not pay for them); ``/v1/cache/warm`` computes them inline.

Blended prefill. When the exact prefix walk stops at unit k and a later unit has
a standalone entry, units up to the first such unit are prefilled exactly (and
inserted in the tree as usual); from there on every unit and the tail go through
one selective recomputation (``LlamaModel.blend``): reused tokens' K/V placed at
their new positions, layers 0..c for all tokens, the top ``ratio`` of reused
tokens by V deviation at layer c plus every token without reused KV through the
other layers. Nothing from the blend point on is inserted in the tree, and the
reply is not kept: its KV is approximate, and ``cached_prefix_tokens`` counts
exact prefix hits only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from segcache.config import CacheConfig
from segcache.engine.prompt import Prompt, Unit
from segcache.engine.scheduler import BlendWork, Job, Scheduler, WaitFor, prefill
from segcache.engine.types import SegmentUsage
from segcache.kv.hashing import namespace_digest
from segcache.kv.segment_tree import SegmentNode, SegmentTree

_KEY_PREFIX = "standalone:"


@dataclass
class BlendPlan:
    at: int  # index of the first unit with a standalone entry (all before it: exact)
    entries: dict[int, SegmentNode]  # unit index -> its (pinned) standalone entry


class Blender:
    """CacheBlend for one engine: plans and runs blended prefills and keeps the
    standalone entries. It shares the engine's tree and in-flight map (both touched
    only on the engine thread or under the engine's lock) and calls back into the
    engine only to enforce the byte budget and to sweep retired namespaces."""

    def __init__(self, *, runtime: Any, tree: SegmentTree, cache_cfg: CacheConfig,
                 scheduler: Scheduler, inflight: dict[tuple[str, str], int],
                 purges: dict[str, int], sink: tuple[int, ...],
                 enforce_budget: Callable[[str], None], sweep_retired: Callable[[], None]) -> None:
        self.runtime = runtime
        self.tree = tree
        self.cache_cfg = cache_cfg
        self.scheduler = scheduler
        self._inflight = inflight  # (key prefix + namespace, digest) -> job id, the engine's
        self._purges = purges  # standalone namespace -> purges so far (the engine's)
        self._sink = sink  # the template's opening tokens (prompt.sink_ids)
        self._enforce_budget = enforce_budget
        self._sweep_retired = sweep_retired

    @staticmethod
    def standalone_namespace(ns: str) -> str:
        """The root of a tenant's standalone entries (derived from its namespace)."""
        return namespace_digest(ns, "standalone-kv")

    def eligible(self, unit: Unit) -> bool:
        mode = self.cache_cfg.blend
        return (unit.key.kind in ("segment", "chunk") and mode != "off" and len(unit.block) > 0
                and (unit.key.anywhere or mode == "auto"))

    def plan(self, job: Job, run, prompt: Prompt):
        """Find (and pin into ``run.pinned``) the standalone entries of the units after
        the exact prefix; waits for one that a background job is computing now."""
        if self.cache_cfg.blend == "off":
            return None
        ns_s = self.standalone_namespace(run.parent.namespace)
        entries: dict[int, SegmentNode] = {}
        for i in range(len(run.usage), len(prompt.units)):
            unit = prompt.units[i]
            if not self.eligible(unit):
                continue
            key = (_KEY_PREFIX + ns_s, unit.key.digest)
            # Wait only for a job that is running: one still queued may sit behind
            # this very request (a full engine would then never admit it).
            while key in self._inflight and self.scheduler.is_running(self._inflight[key]):
                yield WaitFor(key)
            found = self.tree.match(ns_s, [unit.key.digest])
            if found and found[0].n_tokens == len(unit.block):
                self.tree.pin(found)
                run.pinned.append(found[0])
                entries[i] = found[0]
        return BlendPlan(min(entries), entries) if entries else None

    def blend(self, run, prompt: Prompt, plan: BlendPlan):
        """Selective recomputation of units ``plan.at..`` and the tail; returns the
        last logits [vocab]. Appends each unit's usage and advances ``run.pos``."""
        units = prompt.units[plan.at:]
        ids = [t for u in units for t in u.ids] + list(prompt.tail)
        reused = torch.zeros(len(ids), dtype=torch.bool)
        off = 0
        for i, unit in enumerate(units, plan.at):
            node = plan.entries.get(i)
            if node is not None:
                self.runtime.place_keys(run.kv, node.handle, run.pos + off + unit.lead)
                reused[off + unit.lead:off + len(unit.ids)] = True
            off += len(unit.ids)
        work = BlendWork(tuple(ids), run.kv, run.pos, reused=reused, layer=self.cache_cfg.blend_layer,
                         ratio=self.cache_cfg.blend_ratio, filter_from=self.cache_cfg.blend_filter_layer)
        yield work
        off = 0
        for i, unit in enumerate(units, plan.at):
            n = len(unit.ids)
            if i in plan.entries:
                done = int(work.recomputed[off:off + n].sum())
                run.usage.append(SegmentUsage(unit.key.id, unit.key.digest, "blended", n,
                                              unit.key.kind, recomputed=done))
            else:
                run.usage.append(SegmentUsage(unit.key.id, unit.key.digest, "miss", n, unit.key.kind))
            off += n
            run.pos += n
        run.blended = True
        return work.logits

    # ------------------------------------------------------------------ entries
    def missing(self, ns: str, prompt: Prompt) -> list[Unit]:
        eligible = [u for u in prompt.units if self.eligible(u)]
        if not eligible:
            return []
        ns_s = self.standalone_namespace(ns)
        out: dict[str, Unit] = {}
        for unit in eligible:
            if (not self.tree.peek(ns_s, [unit.key.digest])
                    and (_KEY_PREFIX + ns_s, unit.key.digest) not in self._inflight):
                out.setdefault(unit.key.digest, unit)
        return list(out.values())

    def derive(self, run, prompt: Prompt) -> None:
        """Standalone entries for the eligible units this request holds exact KV of
        (computed or hit, before any blend point), taken from its buffer: the block's
        KV with its keys un-rotated. One rotation, no prefill, made as the request
        ends, so the very next request that moves the block blends at once instead
        of waiting for a background job. The block's KV then carries the context it
        was first computed in rather than the sink's; CacheBlend's recomputation
        covers either (``scripts/blend_eval.py`` measures both)."""
        ns_s = self.standalone_namespace(run.parent.namespace)
        root, off = None, 0
        for unit, usage in zip(prompt.units, run.usage, strict=False):
            start, off = off, off + usage.tokens
            if usage.status == "blended" or usage.tokens != len(unit.ids):
                break  # from a blend point on the buffer's KV is approximate
            if not self.eligible(unit) or self.tree.peek(ns_s, [unit.key.digest]):
                continue
            a, b = start + unit.lead, start + len(unit.ids)
            handle = self.runtime.unrope_keys(run.kv[:, :, :, a:b], torch.arange(a, b))
            root = root or self.tree.root(ns_s)
            self.tree.insert(root, unit.key.digest, unit.block, handle,
                             handle.numel() * handle.element_size(),
                             ttl_s=unit.key.ttl_s or self.cache_cfg.default_ttl_s)
        if root is not None:
            self._enforce_budget(ns_s)

    def schedule(self, ns: str, tenant: str, prompt: Prompt) -> None:
        """Queue a background job computing the standalone entries ``prompt``'s
        eligible segments lack (skipped when the queue is full)."""
        units = self.missing(ns, prompt)
        if not units:
            return
        ns_s = self.standalone_namespace(ns)
        purges = self._purges.get(ns_s, 0)
        job = self.scheduler.submit_background(
            lambda job: self.standalone_job(job, ns_s, units, purges), tenant)
        if job is not None:  # on the engine thread: marked before the job can start
            for unit in units:
                self._inflight[(_KEY_PREFIX + ns_s, unit.key.digest)] = job.id

    def standalone_job(self, job: Job, ns_s: str, units: list[Unit], purges: int):
        try:
            yield from self.compute_standalone(ns_s, units, purges)
        finally:
            for unit in units:
                key = (_KEY_PREFIX + ns_s, unit.key.digest)
                if self._inflight.get(key) == job.id:
                    del self._inflight[key]
            self._sweep_retired()

    def compute_standalone(self, ns_s: str, units: list[Unit], purges: int | None = None):
        """Compute and insert each unit's block behind the sink (sink KV dropped,
        keys stored before RoPE). ``purges``: the namespace's purge count when a
        background job was queued; once the tenant is purged after that, the job
        inserts nothing (a purge leaves the tenant's cache empty)."""
        sink = self._sink
        for unit in units:
            if purges is not None and self._purges.get(ns_s, 0) != purges:
                return
            if self.tree.peek(ns_s, [unit.key.digest]):
                continue
            ids = sink + unit.block
            kv = self.runtime.new_kv(len(ids))
            yield from prefill(ids, kv, 0, logits=False)
            handle = self.runtime.unrope_keys(kv[:, :, :, len(sink):],
                                              torch.arange(len(sink), len(ids)))
            self.tree.insert(self.tree.root(ns_s), unit.key.digest, unit.block, handle,
                             handle.numel() * handle.element_size(),
                             ttl_s=unit.key.ttl_s or self.cache_cfg.default_ttl_s)
            self._inflight.pop((_KEY_PREFIX + ns_s, unit.key.digest), None)
            self._enforce_budget(ns_s)
