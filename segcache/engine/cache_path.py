"""A request's way through the cache, in KV slots of its buffer (``CachePath``), and
what stays resident (``Residency``).

    start          walk the tenant's tree: matched = units[0:h], pinned, their KV copied
                   into slots [0, p_h) (skipping what a pooled buffer already holds)
    prefill_units  units h.. one by one: waited for when another request computes it
                   right now, loaded when a lower tier holds it, else computed after the
                   head a cached sibling shares (a partial hit, ``kv.partial``); a node
                   inserted (pinned) after each
    keep_replies   tail + generated ids of each finished choice -> a node keyed by the
                   reply message's digest
    release        unpin; the byte budget holds again; retired namespaces swept

Every method runs on the engine thread (inside a request's generator) or under the
engine's lock; the generators yield the scheduler's work items (``prefill``, ``WaitFor``
and the tiers' loads).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from segcache.config import CacheConfig
from segcache.engine.decode import Sequence
from segcache.engine.kv_pool import KVPool
from segcache.engine.prompt import Prompt, TokenMemo, Unit
from segcache.engine.run import RunState
from segcache.engine.scheduler import Job, WaitFor, prefill
from segcache.engine.tiering import Tiers
from segcache.engine.types import GenerationResult, SegmentUsage
from segcache.kv.autoseg import message_digest
from segcache.kv.partial import reusable_tokens
from segcache.kv.radix import RadixTree
from segcache.kv.segment_tree import SegmentNode, SegmentTree


class Residency:
    """What stays in RAM: the byte budget over the segment tree and the radix tail
    together (and per-tenant quotas), and the sweep of retired namespaces (a purged
    tenant's old ones, where jobs that outlived the purge may still insert)."""

    def __init__(self, tree: SegmentTree, radix: RadixTree, memo: TokenMemo,
                 cache_cfg: CacheConfig) -> None:
        self.tree, self.radix, self.memo = tree, radix, memo
        self.cache_cfg = cache_cfg
        self.retired: set[str] = set()

    def enforce(self, ns: str) -> None:
        """Resident KV of the segment tree and the radix tail together <= budget;
        the radix tail (unstructured prompts) gives way first."""
        if self.cache_cfg.tenant_quota_bytes is not None:
            self.tree.enforce_quota(ns)
        budget = self.cache_cfg.cache_bytes
        if self.tree.resident_bytes + self.radix.resident_bytes > budget:
            self.radix.evict_until(max(0, budget - self.tree.resident_bytes))
            self.tree.evict_until(max(0, budget - self.radix.resident_bytes))

    def sweep_retired(self) -> None:
        """Drop what jobs that outlived a purge left in retired namespaces; a
        namespace stays retired while a pin holds a node."""
        for ns in list(self.retired):
            self.tree.purge(ns)
            self.radix.purge(ns)
            self.memo.forget(ns)
            if not self.tree.namespace_bytes(ns) and not self.radix.namespace_bytes(ns):
                self.retired.discard(ns)


class CachePath:
    """The segment-tree side of a request (see the module docstring). ``inflight`` is
    the engine's map (parent chain, digest) -> id of the job computing that unit;
    ``prefill_chunk`` and ``independent_rows`` (the runtime's: rows of a chunk
    computed independently up to this many) decide which computed KV may be reused
    bit-identically."""

    def __init__(self, *, tree: SegmentTree, tiers: Tiers, residency: Residency, kv_pool: KVPool,
                 inflight: dict[tuple[str, str], int], cache_cfg: CacheConfig, prefill_chunk: int,
                 independent_rows: int, check_context: Callable[[int, int], None]) -> None:
        self.tree, self.tiers, self.residency, self.kv_pool = tree, tiers, residency, kv_pool
        self.inflight = inflight
        self.cache_cfg = cache_cfg
        self.prefill_chunk = prefill_chunk
        self.independent_rows = independent_rows
        self._check_context = check_context  # (prompt tokens, max_tokens) -> raises if too long

    def start(self, ns: str, prompt: Prompt, max_tokens: int) -> RunState:
        """Match and pin the cached prefix, check the context, copy the KV in.
        The caller must ``release`` the run."""
        self.tree.expire()
        matched = self.tree.match(ns, [u.key.digest for u in prompt.units])
        # A hit's tokens are the node's (a kept reply holds the ids the model generated).
        n_tokens = (sum(n.n_tokens for n in matched)
                    + sum(len(u.ids) for u in prompt.units[len(matched):]) + len(prompt.tail))
        self._check_context(n_tokens, max_tokens)
        self.tree.pin(matched)
        kv, held = self.kv_pool.take(max(n_tokens + max_tokens, 1), matched)
        run = RunState(kv, self.tree.root(ns), pinned=list(matched))
        run.prefix_chain = run.parent.chain
        for i, (node, unit) in enumerate(zip(matched, prompt.units, strict=False)):
            if i >= held:  # the first ``held`` are in this buffer already
                run.kv[:, :, :, run.pos:run.pos + node.n_tokens] = node.handle
            self.advance(run, node, unit.key, node.n_tokens, "hit", "ram")
        return run

    def prefill_units(self, job: Job, run: RunState, prompt: Prompt, stop: int | None = None,
                      with_tail: bool = False, loaded_only: bool = False):
        """Compute every unit after the matched ones (up to unit ``stop``), inserting
        a node after each; a unit a lower cache tier holds is loaded instead. A unit
        another job is computing right now is waited for, then reused. ``with_tail``:
        the last unit and ``prompt.tail`` are prefilled together where that gives the
        unit the same KV as alone (``tail_with_unit``); the tail's logits are then in
        ``run.tail_logits``. ``loaded_only``: stop at the first unit that would have to
        be computed."""
        digests = [u.key.digest for u in prompt.units]
        last = len(prompt.units) - 1
        for i, unit in enumerate(prompt.units[:stop]):
            if i < len(run.usage):
                continue
            key = (run.parent.chain, unit.key.digest)
            while self.inflight.get(key, job.id) != job.id:
                yield WaitFor(key)
            matched = self.tree.match(run.parent.namespace, digests[:i + 1])
            if len(matched) > i:  # computed meanwhile by another request: a hit
                node = matched[i]
                self.tree.pin([node])
                run.pinned.append(node)
                run.kv[:, :, :, run.pos:run.pos + node.n_tokens] = node.handle
                self.advance(run, node, unit.key, node.n_tokens, "hit", "ram")
                continue
            self.inflight[key] = job.id
            try:
                node, tier = (yield from self.tiers.promote(run, prompt, i, stop)) or (None, None)
                if node is None and loaded_only:
                    return
                reused = 0
                if node is None:  # in no tier: compute it, after the head a sibling shares
                    reused = self.reuse_head(run, unit)
                    rest = unit.ids[reused:]
                    if with_tail and i == last and self.tail_with_unit(len(rest), len(prompt.tail)):
                        run.tail_logits = yield from prefill(rest + prompt.tail, run.kv,
                                                             run.pos + reused)
                    else:
                        yield from prefill(rest, run.kv, run.pos + reused, logits=False)
                    node = self.insert(run, unit.key.digest, unit.ids, unit.key.ttl_s)
            finally:
                del self.inflight[key]
            status = "hit" if tier is not None else "partial" if reused else "miss"
            self.advance(run, node, unit.key, node.n_tokens, status, tier, reused)

    def reuse_head(self, run: RunState, unit: Unit) -> int:
        """Copy into the run's buffer the KV of the longest head of ``unit`` that a
        cached sibling (a child of ``run.parent``) computed, as far as
        ``kv.partial.reusable_tokens`` allows (the rest then computes the same bits
        as a cold prefill of the unit); returns how many tokens that is."""
        if run.blended:
            return 0
        sibling, common = self.tree.closest_child(run.parent, unit.ids)
        if sibling is None:
            return 0
        n = reusable_tokens(common, len(unit.ids), sibling.n_tokens, self.prefill_chunk,
                            self.independent_rows)
        if n > 0:
            run.kv[:, :, :, run.pos:run.pos + n] = sibling.handle[:, :, :, :n]
            self.tree.touch(sibling)
        return n

    def tail_with_unit(self, unit_len: int, tail_len: int) -> bool:
        """Whether a unit and the tail after it can be one prefill: one call fewer (~50
        ms of a warm turn at 3.6k cached slots on the 2-core host), and the unit's KV,
        which is cached, the same bits as a prefill of the unit alone. That holds where
        the runtime computes the rows of a chunk independently (``independent_rows``)
        and the unit's chunks (from its start) would not end in a 1-token chunk, which
        takes the decode step."""
        chunk = self.prefill_chunk
        return tail_len > 0 and 2 <= chunk <= self.independent_rows and unit_len % chunk != 1

    def insert(self, run: RunState, digest: str, ids: tuple[int, ...], ttl_s: float | None,
               kv: torch.Tensor | None = None) -> SegmentNode:
        """Insert the KV of ``ids`` (in slots ``run.pos..`` of ``kv``, default the
        run's) after ``run.parent``, pinned, and write it through to the lower tiers."""
        kv = run.kv if kv is None else kv
        # handle: [n_layers, 2, n_kv_heads, n_tokens, head_dim], this unit's tokens only
        handle = kv[:, :, :, run.pos:run.pos + len(ids)].clone()
        node = self.tree.insert(run.parent, digest, ids, handle,
                                handle.numel() * handle.element_size(),
                                ttl_s=ttl_s or self.cache_cfg.default_ttl_s)
        self.tree.pin([node])
        run.pinned.append(node)
        self.tiers.publish(node, handle)
        self.residency.enforce(run.parent.namespace)
        return node

    @staticmethod
    def advance(run: RunState, node: SegmentNode, key, n: int, status: str,
                tier: str | None = None, reused: int = 0) -> None:
        """Account unit ``key`` (``n`` tokens, now in slots ``pos..``) as ``status``:
        a hit counts all its tokens as cached, a partial hit the ``reused`` ones."""
        run.hold(node, n)
        run.usage.append(SegmentUsage(key.id, key.digest, status, n, key.kind,  # type: ignore[arg-type]
                                      tier=tier,  # type: ignore[arg-type]
                                      reused=reused if status == "partial" else None))
        run.cached += n if status == "hit" else reused
        run.pos += n
        run.parent = node
        if key.kind not in ("message", "chunk") or run.prefix_chain == "":
            run.prefix_chain = node.chain

    def keep_replies(self, run: RunState, tail: tuple[int, ...], result: GenerationResult,
                     seqs: list[Sequence]) -> None:
        """Store tail + generated ids of each choice under
        the digest of the assistant message the client will send back next turn. Only a
        finished reply is kept: a cancelled or failed one inserts nothing, nor one cut
        by a stop string (not what was generated)."""
        kept = set()
        for choice, seq in zip(result.choices(), seqs, strict=True):
            if (choice.finish_reason not in ("stop", "length", "tool_calls") or not choice.token_ids
                    or seq.stream.stopped):
                continue
            msg = {"role": "assistant", "content": choice.text, "tool_calls": choice.tool_calls}
            digest = message_digest(msg)
            if digest in kept:  # two choices with the same reply
                continue
            kept.add(digest)
            ids = tail + tuple(choice.token_ids)
            node = self.insert(run, digest, ids, None, seq.kv)
            if seq.kv is run.kv:
                run.hold(node, len(ids))

    def release(self, run: RunState) -> None:
        """Unpin what the run pinned and give its buffer back to the pool."""
        nodes = run.pinned
        ns = nodes[0].namespace if nodes else None
        self.tree.unpin(nodes)
        nodes.clear()
        if ns is not None:
            self.residency.enforce(ns)
        self.residency.sweep_retired()
        self.kv_pool.give(run.kv, run.held)
