"""``segcache route simulate``: replay requests through a routing policy over N
replicas, each with an LRU cache model, and count what the cache saves.

The cache model is the segment tree's, reduced to what routing changes: a replica
holds chain digests (with their token counts) up to ``cache_tokens``; a request
hits the longest prefix of its chain the replica holds, computes the rest, and
then holds its whole chain; least recently used chains go first (a path is
touched leaf first, so a parent outlives its children). Replies are not modelled
(a workload that reuses them carries them as messages).

Load: every request is in flight until ``concurrency`` later requests have
arrived (0: never completes, so load is the work sent so far: the burst case).
A request's work is its prompt tokens that missed plus its decode budget. The
figures per run: token hit rate, that rate against one replica with the same
total cache, and max/mean of the work each replica did.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from segcache.deploy.chain import RouteKey
from segcache.deploy.routing import Policy, ReplicaView, make_policy, matched_tokens


class LruChainCache:
    """Chain digests -> tokens, bounded by ``capacity`` tokens (None: unbounded)."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.tokens = 0
        self._lru: OrderedDict[str, int] = OrderedDict()

    def __contains__(self, chain: object) -> bool:
        return chain in self._lru

    def serve(self, key: RouteKey) -> int:
        """Tokens of ``key`` already held; then hold all of ``key``'s chain."""
        hit = matched_tokens(key, self._lru)
        for chain, n in reversed(list(zip(key.chain, key.tokens, strict=True))):
            if chain in self._lru:
                self._lru.move_to_end(chain)
            else:
                self._lru[chain] = n
                self.tokens += n
        while self.capacity is not None and self.tokens > self.capacity and self._lru:
            _, n = self._lru.popitem(last=False)
            self.tokens -= n
        return hit


@dataclass
class SimResult:
    trace: str
    policy: str
    replicas: int
    requests: int
    prompt_tokens: int
    hit_tokens: int
    hit_rate: float
    single_hit_rate: float  # one replica with the whole fleet's cache
    hit_rate_vs_single: float | None
    max_mean_load: float | None
    work: list[int]  # tokens computed (prefill misses + decode) per replica

    def row(self) -> dict:
        return asdict(self)


def _replay(keys: Sequence[RouteKey], n: int, policy: Policy, cache_tokens: int | None,
            concurrency: int) -> tuple[int, list[int]]:
    """(hit tokens, work per replica) of ``keys`` routed by ``policy`` over ``n`` replicas."""
    ids = [f"r{i}" for i in range(n)]
    caches = {rid: LruChainCache(cache_tokens) for rid in ids}
    load = dict.fromkeys(ids, 0)
    work = dict.fromkeys(ids, 0)
    in_flight: deque[tuple[str, int]] = deque()
    hits = 0
    for key in keys:
        if concurrency and len(in_flight) >= concurrency:
            done, cost = in_flight.popleft()
            load[done] -= cost
            if hasattr(policy, "on_done"):
                policy.on_done(done)
        views = [ReplicaView(rid, caches[rid], load[rid]) for rid in ids]
        rid = policy.rank(key, views)[0]
        policy.on_sent(key, rid)
        hit = caches[rid].serve(key)
        cost = key.prompt_tokens - hit + key.decode_tokens
        hits += hit
        load[rid] += cost
        work[rid] += cost
        in_flight.append((rid, cost))
    return hits, [work[rid] for rid in ids]


def simulate(keys: Sequence[RouteKey], replicas: int, policy: str, cache_tokens: int | None = None,
             concurrency: int = 0, trace: str = "", **params: float) -> SimResult:
    """One replay of ``keys`` (in arrival order) plus the single-replica reference."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if cache_tokens is not None and cache_tokens < 1:
        raise ValueError(f"cache_tokens must be >= 1, got {cache_tokens}")
    hits, work = _replay(keys, replicas, make_policy(policy, **params), cache_tokens, concurrency)
    total_cache = None if cache_tokens is None else cache_tokens * replicas
    single_hits, _ = _replay(keys, 1, make_policy("least-load"), total_cache, concurrency)
    prompt = sum(k.prompt_tokens for k in keys)
    mean = sum(work) / replicas
    return SimResult(
        trace=trace, policy=policy, replicas=replicas, requests=len(keys), prompt_tokens=prompt,
        hit_tokens=hits, hit_rate=hits / prompt if prompt else 0.0,
        single_hit_rate=single_hits / prompt if prompt else 0.0,
        hit_rate_vs_single=hits / single_hits if single_hits else None,
        max_mean_load=max(work) / mean if mean else None, work=work,
    )
