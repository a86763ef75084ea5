"""Routing policies: which engine replica serves a request. Pure Python, no torch:
the Ray Serve request router and the simulator run this same code.

A policy ranks replicas for one request (``rank``: best first, every replica once);
the caller tries them in that order and calls ``on_sent`` with the one it used.
Replicas are seen through ``ReplicaView``: the chain digests a replica reports warm
(plus, in the Ray router, those just sent to it: a burst does not wait a stats
period) and its load in tokens (still to prefill + still to decode).

``prefix`` (the default), the segment-aware policy, with bounded loads. ``cost`` of
a request on a replica: its tokens to prefill there (its prompt minus what that
replica holds of it) plus its decode budget; ``cold``: its cost on a replica holding
none of it; ``n``: the number of replicas.

1. owner = the replica holding the longest warm chain of the request, measured in
   tokens (ties: lower load, then the request's consistent-hash order);
2. a replica *fits* when it is idle (load 0) or
   ``load + cost <= balance * (total load + cost) / n + slack + matched``:
   ``balance`` = 1.25, ``slack`` = 512 tokens (so a lightly loaded fleet never spills
   on rounding), ``matched`` = the tokens of the request it holds. A holder may run
   over the balanced bound by what sending the request elsewhere would recompute: a
   spill must not add more work to the fleet than it takes off the holder. This is
   consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018) with
   a cache-aware first choice;
3. cold start: while a replica holding none of the request is idle, a holder also
   fits while ``load + cost <= idle_factor * cold + slack`` (``idle_factor`` = 2: it
   finishes the request within twice the time the idle replica would). At the start
   of a burst the mean load is a fraction of one request and rule 2 alone would send
   a shared prefix's second request to an idle replica; that replica is kept for a
   request with a first segment nobody holds yet;
4. if the owner does not fit, the next replica that also holds part of the chain
   and fits, longest match first;
5. else (and for a request nobody holds: a cold fleet) the replica that fits with
   the least load, ties in the rendezvous-hash order of the request's first segment
   (its first chain digest): a new first segment goes to an idle replica when there
   is one (not to one that already serves another first segment), and requests
   sharing a first segment agree on a home;
6. replicas that do not fit come last, least loaded first.

``balance``, ``slack_tokens`` and ``idle_factor`` are ``PrefixPolicy`` parameters.
Simulated with 8 teams (``segcache route simulate multi-agent,agent-loop,fan-out
--replicas 4,8 --copies 8``, seeds 0-2), rules 2 (``+ matched``), 3 and 5 (least load
before hash order) took ``prefix`` from 84-98% of one replica's hit rate at max/mean
load up to 1.29 to 100-102% at max/mean <= 1.01. Seed 0 without rule 3 (``idle_factor``
0): multi-agent on 8 replicas 97.8% at max/mean 1.58, fan-out on 8 94.7% at 1.40
(a team spread early takes the idle replica a later team needed); ``idle_factor`` 1.5
still leaves fan-out on 8 at 94.7% / 1.40; 2, 2.5 and 3 all give 100% at <= 1.01.
The price: one team alone (one shared prefix) is spread less: fan-out's 8 agents
(``--copies 1``) on 8 replicas use 2 of them, 4 requests each.

``round-robin``, ``least-load`` and ``ray-prefix`` (a re-implementation of Ray's
``PrefixCacheAffinityRouter``, see ``RayPrefixPolicy``) are the baselines.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from segcache.deploy.chain import RouteKey

POLICIES = ("prefix", "round-robin", "least-load", "ray-prefix")


@dataclass
class ReplicaView:
    """A replica as a router sees it. ``warm``: chain digests it holds; ``load``:
    tokens still to prefill plus tokens still to decode (reported, plus sent since)."""

    id: str
    warm: Collection[str] = field(default_factory=frozenset)
    load: int = 0


def matched_tokens(key: RouteKey, warm: Collection[str]) -> int:
    """Tokens of the longest prefix of ``key``'s chain that ``warm`` holds."""
    total = 0
    for digest, n in zip(key.chain, key.tokens, strict=True):
        if digest not in warm:
            break
        total += n
    return total


def rendezvous_order(key: str, replica_ids: Sequence[str]) -> list[str]:
    """Replica ids by highest random weight for ``key`` (rendezvous hashing): adding or
    removing a replica moves only the keys that ranked it first."""
    def weight(rid: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{rid}".encode(), digest_size=8).digest()
    return sorted(replica_ids, key=weight, reverse=True)


class Policy:
    """Ranks replicas for a request. ``rank`` may update the policy's own state (a
    round-robin counter); ``on_sent`` tells it where the request went."""

    name = ""

    def rank(self, key: RouteKey, replicas: Sequence[ReplicaView]) -> list[str]:
        raise NotImplementedError

    def on_sent(self, key: RouteKey, replica_id: str) -> None:
        return None


class PrefixPolicy(Policy):
    """Longest warm chain first, under bounded loads (module docstring)."""

    name = "prefix"

    def __init__(self, balance: float = 1.25, slack_tokens: int = 512, idle_factor: float = 2.0) -> None:
        if balance < 1:
            raise ValueError(f"balance must be >= 1, got {balance}")
        if slack_tokens < 0:
            raise ValueError(f"slack_tokens must be >= 0, got {slack_tokens}")
        if idle_factor < 0:
            raise ValueError(f"idle_factor must be >= 0, got {idle_factor}")
        self.balance = balance
        self.slack_tokens = slack_tokens
        self.idle_factor = idle_factor

    def rank(self, key: RouteKey, replicas: Sequence[ReplicaView]) -> list[str]:
        if not replicas:
            return []
        matched = {r.id: matched_tokens(key, r.warm) for r in replicas}
        load = {r.id: r.load for r in replicas}
        ring = rendezvous_order(key.first or "", [r.id for r in replicas])
        ring_pos = {rid: i for i, rid in enumerate(ring)}
        total = sum(load.values())
        cold = key.prompt_tokens + key.decode_tokens
        idle_cold = any(load[rid] == 0 and matched[rid] == 0 for rid in ring)

        def fits(rid: str) -> bool:
            cost = cold - matched[rid]
            after = load[rid] + cost
            bound = self.balance * (total + cost) / len(replicas) + self.slack_tokens
            if load[rid] == 0 or after <= bound + matched[rid]:  # rule 2
                return True
            return matched[rid] > 0 and idle_cold and after <= self.idle_factor * cold + self.slack_tokens

        def by_load(rid: str) -> tuple[int, int]:
            return load[rid], ring_pos[rid]

        holders = sorted((rid for rid in ring if matched[rid] > 0),
                         key=lambda rid: (-matched[rid], load[rid], ring_pos[rid]))
        order = [rid for rid in holders if fits(rid)]
        order += sorted((rid for rid in ring if rid not in order and fits(rid)), key=by_load)
        order += sorted((rid for rid in ring if rid not in order), key=by_load)
        return order


class RoundRobinPolicy(Policy):
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def rank(self, key: RouteKey, replicas: Sequence[ReplicaView]) -> list[str]:
        ids = sorted(r.id for r in replicas)
        if not ids:
            return []
        start = self._next % len(ids)
        self._next += 1
        return ids[start:] + ids[:start]


class LeastLoadPolicy(Policy):
    name = "least-load"

    def rank(self, key: RouteKey, replicas: Sequence[ReplicaView]) -> list[str]:
        return [r.id for r in sorted(replicas, key=lambda r: (r.load, r.id))]


class RayPrefixPolicy(Policy):
    """Ray Serve's ``PrefixCacheAffinityRouter`` (ray 2.60, ``ray.llm._internal.serve.
    routing_policies.prefix_aware``), re-implemented for the simulator:

    - it learns only from its own routing history: after routing, the request's text
      is inserted in a per-replica prefix tree (never evicted: ``do_eviction=False``);
    - ``imbalanced_threshold`` = inf by default: load never overrides affinity;
    - the replicas with the longest text match are candidates if the match covers at
      least ``match_rate_threshold`` (0.1) of the text, else the replicas with the
      fewest characters in the tree; among candidates, the shortest queue wins (Ray
      picks by probed queue length; here: fewest requests sent, then lowest id).

    Ray matches characters; this matches in ``block_chars``-character blocks (16),
    so a match is at most 15 characters shorter than Ray's. The text is the whole
    prompt in unit order (segments included: Ray's own only sees ``messages``).
    """

    name = "ray-prefix"

    def __init__(self, match_rate_threshold: float = 0.1, imbalanced_threshold: float = float("inf"),
                 block_chars: int = 16, seed: int = 0) -> None:
        self.match_rate_threshold = match_rate_threshold
        self.imbalanced_threshold = imbalanced_threshold
        self.block_chars = block_chars
        self._blocks: dict[str, set[bytes]] = {}  # replica -> hashes of text prefixes
        self._chars: dict[str, int] = {}  # replica -> characters in its tree
        self._queue: dict[str, int] = {}  # replica -> requests sent
        self._random = random.Random(seed)

    def _prefixes(self, text: str) -> list[bytes]:
        out, h = [], hashlib.blake2b(digest_size=16)
        for start in range(0, len(text) - len(text) % self.block_chars, self.block_chars):
            h.update(text[start:start + self.block_chars].encode())
            out.append(h.copy().digest())
        return out

    def _match_chars(self, rid: str, prefixes: list[bytes]) -> int:
        held = self._blocks.get(rid, set())
        n = 0
        while n < len(prefixes) and prefixes[n] in held:
            n += 1
        return n * self.block_chars

    def rank(self, key: RouteKey, replicas: Sequence[ReplicaView]) -> list[str]:
        ids = sorted(r.id for r in replicas)
        if not ids:
            return []
        queue = {rid: self._queue.get(rid, 0) for rid in ids}
        if max(queue.values()) - min(queue.values()) > self.imbalanced_threshold:
            pair = self._random.sample(ids, min(2, len(ids)))  # power of two choices
            best = sorted(pair, key=lambda rid: (queue[rid], rid))
        else:
            prefixes = self._prefixes(key.text)
            match = {rid: self._match_chars(rid, prefixes) for rid in ids}
            top = max(match.values())
            if not key.text or top / len(key.text) < self.match_rate_threshold:
                fewest = min(self._chars.get(rid, 0) for rid in ids)
                best = [rid for rid in ids if self._chars.get(rid, 0) == fewest]
            else:
                best = [rid for rid in ids if match[rid] == top]
            best.sort(key=lambda rid: (queue[rid], rid))
        return best + sorted((rid for rid in ids if rid not in best), key=lambda rid: (queue[rid], rid))

    def on_sent(self, key: RouteKey, replica_id: str) -> None:
        prefixes = self._prefixes(key.text)
        held = self._blocks.setdefault(replica_id, set())
        new = len(key.text) - self._match_chars(replica_id, prefixes)
        held.update(prefixes)
        self._chars[replica_id] = self._chars.get(replica_id, 0) + new
        self._queue[replica_id] = self._queue.get(replica_id, 0) + 1

    def on_done(self, replica_id: str) -> None:
        """A request sent to ``replica_id`` finished (its queue shrinks)."""
        self._queue[replica_id] = max(0, self._queue.get(replica_id, 0) - 1)


def make_policy(name: str, **params: float) -> Policy:
    """The policy called ``name`` (one of ``POLICIES``); ``params`` go to ``PrefixPolicy``
    (``balance``, ``slack_tokens``, ``idle_factor``)."""
    if name == "prefix":
        return PrefixPolicy(**params)
    if params:
        raise ValueError(f"policy {name!r} takes no parameters")
    if name == "round-robin":
        return RoundRobinPolicy()
    if name == "least-load":
        return LeastLoadPolicy()
    if name == "ray-prefix":
        return RayPrefixPolicy()
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
