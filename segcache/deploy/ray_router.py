"""The segment-aware Ray Serve ``RequestRouter``: ``segcache.deploy.routing``'s policy
over what the engine replicas report.

A router lives in every process that holds a handle to the engine deployment, so it
keeps no cache state of its own beyond a few seconds: each replica reports its warm
chain digests and its load through ``record_routing_stats`` (every 0.5 s), and the
router adds what it has itself sent since (``sent_ttl_s``), so a burst does not wait
a stats period. A sent request stops counting once a report computed after it has come
(the replica's report ``seq`` is two past the one the router had when it sent): from
then on the replica's own load and warm chains include it, or it has finished. (Counted
for the whole window, a finished request made a sequential client's next request look
like overload and sent it away from its warm replica.) The request's chain comes from the ingress as the ``route`` keyword
argument (see ``RouteKey.to_kwargs``). Every replica is returned, one per rank, in
the policy's order: Ray tries them in that order and skips full ones; when all are
full it backs off (``should_backoff``) instead of spinning.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from segcache.deploy.chain import RouteKey
from segcache.deploy.routing import ReplicaView, make_policy, matched_tokens


class SegmentRouter(RequestRouter):
    def initialize_state(self, policy: str = "prefix", balance: float = 1.25, slack_tokens: int = 512,
                         idle_factor: float = 2.0, sent_ttl_s: float = 2.0, **_: Any) -> None:
        params = ({"balance": balance, "slack_tokens": slack_tokens, "idle_factor": idle_factor}
                  if policy == "prefix" else {})
        self._policy = make_policy(policy, **params)
        self._sent_ttl_s = sent_ttl_s
        # replica -> (sent at, chain, cost, the replica's report seq when sent)
        self._sent: dict[str, deque[tuple[float, tuple[str, ...], int, int]]] = {}
        self._report_seq: dict[str, int] = {}  # replica -> seq of its latest report seen
        self._costs: dict[int, dict[str, int]] = {}  # pending request -> replica -> cost
        self._warm_memo: dict[str, tuple[int, frozenset[str]]] = {}  # replica -> (id(list), set)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        key = _route_key(pending_request)
        now = time.monotonic()
        views = [self._view(r, now) for r in candidate_replicas]
        # what the request will cost each replica: its prompt not warm there + its decode budget
        if len(self._costs) > 4096:  # requests chosen for but never routed (cancelled)
            self._costs.clear()
        self._costs[id(pending_request)] = {
            v.id: key.prompt_tokens - matched_tokens(key, v.warm) + key.decode_tokens
            for v in views}
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[rid]] for rid in self._policy.rank(key, views)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        key = _route_key(pending_request)
        rid = replica_id.unique_id
        seq = self._report_seq.get(rid, 0)
        cost = self._costs.pop(id(pending_request), {}).get(rid, key.prompt_tokens + key.decode_tokens)
        self._sent.setdefault(rid, deque()).append((time.monotonic(), key.chain, cost, seq))
        self._policy.on_sent(key, rid)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._sent.pop(replica_id.unique_id, None)
        self._warm_memo.pop(replica_id.unique_id, None)

    def _view(self, replica: RunningReplica, now: float) -> ReplicaView:
        rid = replica.replica_id.unique_id
        stats = replica.routing_stats or {}
        seq = int(stats.get("seq", 0))
        self._report_seq[rid] = seq
        sent = self._sent.get(rid, deque())
        while sent and (now - sent[0][0] > self._sent_ttl_s or seq >= sent[0][3] + 2):
            sent.popleft()
        warm = self._reported_warm(rid, stats.get("warm") or [])
        if sent:
            warm = warm | {c for _, chains, _, _ in sent for c in chains}
        return ReplicaView(rid, warm, int(stats.get("load", 0)) + sum(e[2] for e in sent))

    def _reported_warm(self, rid: str, chains: list[str]) -> frozenset[str]:
        memo = self._warm_memo.get(rid)
        if memo is None or memo[0] != id(chains):
            memo = (id(chains), frozenset(chains))
            self._warm_memo[rid] = memo
        return memo[1]


def _route_key(pending_request: PendingRequest | None) -> RouteKey:
    route = (pending_request.kwargs or {}).get("route") if pending_request is not None else None
    return RouteKey.from_kwargs(route) if route else RouteKey((), (), 0)
