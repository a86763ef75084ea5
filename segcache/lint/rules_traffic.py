"""Rules about traffic rather than prompt text: requests sent in parallel before
their shared prefix is warm (needs ``timestamp``), and one prefix spread over
replicas (needs ``route``/``replica``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from segcache.kv.hashing import chain_digest, namespace_digest
from segcache.lint.findings import Evidence, Fix, LintOptions, Rule
from segcache.lint.trace import Request, request_units
from segcache.lint.view import MODEL_FINGERPRINT, RequestView


@dataclass
class _Burst:
    leader: int
    source: str
    start: float
    followers: list[int] = field(default_factory=list)
    lost: int = 0
    shared_tokens: int = 0


class ColdFanout(Rule):
    id = "cold-fanout"
    severity = "warning"
    title = "Parallel fan-out before the shared prefix is warm"
    explanation = ("Several requests sharing a prefix arrive within the warm-up delay of the first "
                   "one, so each computes the shared prefix itself instead of reusing it.")
    fix = ("Warm the shared prefix first (POST /v1/cache/warm, or send one request and wait for its "
           "first token), then fan out.")

    def __init__(self, options: LintOptions) -> None:
        super().__init__(options)
        self._first: dict[tuple[str, str], tuple[float, int, str]] = {}  # chain -> (time, request, source)
        self._bursts: dict[int, _Burst] = {}

    def observe(self, view: RequestView) -> None:
        t = view.request.timestamp
        if t is None:
            return
        tenant = view.request.tenant
        warm_tokens = cold_tokens = 0
        leader = None
        for i, chain in enumerate(view.chains):
            first = self._first.get((tenant, chain))
            if first is None:
                break
            if t - first[0] >= self.options.warm_delay_s:
                warm_tokens = sum(view.tokens[:i + 1])
            else:
                cold_tokens, leader = sum(view.tokens[:i + 1]), first
        for chain in view.chains:
            self._first.setdefault((tenant, chain), (t, view.index, view.request.source))
        lost = cold_tokens - warm_tokens
        if leader is None or lost < self.options.min_lost_tokens:
            return
        burst = self._bursts.get(leader[1])
        if burst is None:
            burst = self._bursts[leader[1]] = _Burst(leader[1], leader[2], leader[0])
        burst.followers.append(view.index)
        burst.lost += lost
        burst.shared_tokens = max(burst.shared_tokens, cold_tokens)

    def finish(self) -> None:
        for b in sorted(self._bursts.values(), key=lambda b: b.leader):
            if len(b.followers) + 1 < self.options.fanout_min:
                continue
            text = (f"{len(b.followers) + 1} requests within {self.options.warm_delay_s:g}s share "
                    f"{b.shared_tokens} cold tokens")
            self.report(Evidence(b.leader, b.source, None, "prefix", 0, 0, text,
                                 {"followers": b.followers, "shared_tokens": b.shared_tokens}),
                        tokens_lost=b.lost)

    def make_fix(self) -> Fix:
        return WarmFirst()


class WarmFirst(Fix):
    warm_delay_s = 0.0


class RoundRobin(Rule):
    id = "round-robin"
    severity = "warning"
    title = "One prefix spread across replicas"
    explanation = ("Requests land on a replica where their prefix is cold while another replica "
                   "holds it warm: the router spreads repeated prefixes (round-robin or random).")
    fix = ("Route by prefix (segcache route) or with session/agent affinity so repeated prefixes "
           "land where they are warm.")

    def __init__(self, options: LintOptions) -> None:
        super().__init__(options)
        self._where: dict[tuple[str, str], set[str]] = {}  # (tenant, chain) -> replicas
        self._routed = 0
        self._pending: list[tuple[Evidence, int]] = []
        self.replicas: set[str] = set()

    def observe(self, view: RequestView) -> None:
        replica = view.request.replica
        if replica is None:
            return
        self._routed += 1
        self.replicas.add(replica)
        tenant = view.request.tenant
        own = anywhere = 0
        for i, chain in enumerate(view.chains):
            where = self._where.get((tenant, chain))
            if not where:
                break
            anywhere = i + 1
            if own == i and replica in where:
                own = i + 1
        lost = sum(view.tokens[own:anywhere])
        if lost >= self.options.min_lost_tokens:
            warm_on = sorted(self._where[(tenant, view.chains[anywhere - 1])])
            text = f"sent to {replica!r}; {lost} prefix tokens were warm on {', '.join(map(repr, warm_on))}"
            self._pending.append((Evidence(view.index, view.request.source, None, "route", 0, 0, text,
                                           {"replica": replica, "warm_on": warm_on}), lost))
        for chain in view.chains:
            self._where.setdefault((tenant, chain), set()).add(replica)

    def finish(self) -> None:
        n = len(self._pending)
        if n >= self.options.roundrobin_min_misrouted and n >= self.options.roundrobin_min_fraction * self._routed:
            for ev, lost in self._pending:
                self.report(ev, tokens_lost=lost)

    def make_fix(self) -> Fix:
        return PrefixRouting(sorted(self.replicas))


class PrefixRouting(Fix):
    """Send each request to the replica that holds its deepest known prefix;
    a new prefix goes to the next replica in turn."""

    def __init__(self, replicas: list[str]) -> None:
        self.replicas = replicas
        self._owner: dict[str, str] = {}
        self._next = 0

    def apply(self, request: Request) -> Request:
        if request.replica is None or not self.replicas:
            return request
        chain = namespace_digest(request.tenant, MODEL_FINGERPRINT)
        chains = []
        for u in request_units(request):
            chain = chain_digest(chain, u.digest)
            chains.append(chain)
        owner = next((self._owner[c] for c in reversed(chains) if c in self._owner), None)
        if owner is None:
            owner = self.replicas[self._next % len(self.replicas)]
            self._next += 1
        for c in chains:
            self._owner.setdefault(c, owner)
        return request.with_body(request.body, replica=owner)
