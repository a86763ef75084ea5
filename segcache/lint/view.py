"""A request as the rules and the simulation see it: its units with token ids,
where each unit starts in the flat prompt, and its chain digests.

``chains[i]`` is the server's chain digest after units ``0..i`` (root = the
tenant's namespace digest), so "unit i hits" is "chains[i] was stored
before". ``masked_chains`` is the same chain over the units with their
dynamic-looking values masked: where the raw chain misses and the masked one
hits, only such values stood in the way.
"""

from __future__ import annotations

from dataclasses import dataclass

from segcache.kv.hashing import chain_digest, namespace_digest, segment_digest
from segcache.lint.dynamic import mask
from segcache.lint.tokens import TokenCounter
from segcache.lint.trace import GENERATION_PROMPT, Request, Unit, request_units

# The linter has no weights; one fixed fingerprint keeps tenants apart like the server does.
MODEL_FINGERPRINT = "segcache-lint"


@dataclass
class RequestView:
    request: Request
    units: list[Unit]
    tokens: list[int]  # per unit, segcache rendering
    plain_ids: list[tuple[int, ...]]  # per unit, plain rendering
    generation_ids: tuple[int, ...]
    char_starts: list[int]  # of each unit in the flat plain prompt
    token_starts: list[int]
    chains: list[str]
    masked: list[str]  # masked digest of each unit
    masked_chains: list[str]
    counter: TokenCounter

    @property
    def index(self) -> int:
        return self.request.index

    @property
    def plain_total(self) -> int:
        return sum(len(p) for p in self.plain_ids) + len(self.generation_ids)

    @property
    def seg_total(self) -> int:
        return sum(self.tokens) + len(self.generation_ids)

    def locate(self, unit: int, char_in_unit: int) -> tuple[int, int]:
        """(char offset, token offset) in the flat plain prompt of a position in a unit."""
        text = self.units[unit].plain_text
        return (self.char_starts[unit] + char_in_unit,
                self.token_starts[unit] + self.counter.count(text[:char_in_unit]))

    def content_start(self, unit: int) -> int:
        """Offset of the unit's content inside its ChatML frame."""
        return len(f"<|im_start|>{self.units[unit].role}\n")

    def agent_key(self) -> tuple[str, str] | None:
        return agent_key(self.request, self.units)

    def message_units(self) -> list[int]:
        return [i for i, u in enumerate(self.units) if u.kind == "message"]


def agent_key(request: Request, units: list[Unit]) -> tuple[str, str] | None:
    """Which agent sent this: the explicit ``agent`` field, else the conversation
    (the digest of its first user message); None if neither exists."""
    if request.agent is not None:
        return (request.tenant, "agent:" + request.agent)
    for u in units:
        if u.kind == "message" and u.role == "user":
            return (request.tenant, "conversation:" + u.digest)
    return None


def masked_digest(unit: Unit) -> str:
    return segment_digest(f"{unit.kind}\x00{unit.role}\x00{mask(unit.text)}")


def build_view(request: Request, counter: TokenCounter) -> RequestView:
    units = request_units(request)
    root = namespace_digest(request.tenant, MODEL_FINGERPRINT)
    chains, masked, masked_chains = [], [], []
    chain = mchain = root
    char_starts, token_starts, plain_ids = [], [], []
    chars = toks = 0
    for u in units:
        chain = chain_digest(chain, u.digest)
        m = masked_digest(u)
        mchain = chain_digest(mchain, m)
        chains.append(chain)
        masked.append(m)
        masked_chains.append(mchain)
        ids = counter.encode(u.plain_text)
        char_starts.append(chars)
        token_starts.append(toks)
        plain_ids.append(ids)
        chars += len(u.plain_text)
        toks += len(ids)
    return RequestView(
        request=request, units=units, tokens=[counter.count(u.text) for u in units],
        plain_ids=plain_ids, generation_ids=counter.encode(GENERATION_PROMPT),
        char_starts=char_starts, token_starts=token_starts, chains=chains, masked=masked,
        masked_chains=masked_chains, counter=counter,
    )
