"""A chat request's segment chain, as the ingress and the simulator see it: no
tokenizer, no torch, the same digests as the engine's segment tree.

The engine cuts a request into units (``segcache.engine.prompt``): explicit
``segments`` in order, the canonical tools block, then one unit per message, and
keys each unit's tree node by ``chain = H(parent chain, unit digest)`` from the
namespace root (``segcache.kv.hashing``). ``request_chain`` folds the same digests,
so a chain digest here names exactly the node a replica reports as warm.

Token counts are estimates (``len(text) / chars_per_token``): routing weighs a
match by how much prefill it saves and loads by tokens, and needs no exact count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from segcache.kv.autoseg import (
    chunk_digest,
    message_digest,
    message_pieces,
    message_text,
    tools_after_system,
    tools_block,
)
from segcache.kv.hashing import chain_digest, is_digest, namespace_digest, segment_digest

CHARS_PER_TOKEN = 3.8  # SmolLM2's tokenizer on English prose and code (bench/workloads.py)


@dataclass(frozen=True)
class RouteKey:
    """What a router needs of one request.

    ``chain[i]`` is the chain digest after unit i, ``tokens[i]`` that unit's
    estimated token count; ``decode_tokens`` is the reply budget (``max_tokens``).
    ``text`` is the prompt text in unit order (for ``ray-prefix``, which matches text).
    """

    chain: tuple[str, ...]
    tokens: tuple[int, ...]
    decode_tokens: int
    text: str = ""

    @property
    def prompt_tokens(self) -> int:
        return sum(self.tokens)

    def to_kwargs(self) -> dict[str, Any]:
        """The form the ingress passes to the engine deployment (``route=``); no text."""
        return {"chain": list(self.chain), "tokens": list(self.tokens), "decode": self.decode_tokens}

    @classmethod
    def from_kwargs(cls, route: dict[str, Any]) -> RouteKey:
        return cls(tuple(route.get("chain", ())), tuple(route.get("tokens", ())), int(route.get("decode", 0)))

    @property
    def first(self) -> str | None:
        """The first segment's chain digest: the consistent-hashing key of the request."""
        return self.chain[0] if self.chain else None


def estimate_tokens(text: str, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    return max(1, round(len(text) / chars_per_token))


def _units(body: dict[str, Any], chunks: bool = False) -> list[tuple[str, str]]:
    """(digest, text) per unit of ``body``, in prompt order, as ``engine/prompt.py``
    lays it out (``chunks``: the replicas run ``--blend auto``). A segment sent by hash
    only (or by registry name) has no text here; a name-only segment ends the chain
    (its digest is only known to the replica), so nothing after it is routed on."""
    units = []
    for seg in body.get("segments") or []:
        if not isinstance(seg, dict):
            return units
        content = seg.get("content")
        if isinstance(content, str):
            units.append((segment_digest(content), content))
        elif isinstance(seg.get("hash"), str) and is_digest(seg["hash"]):
            units.append((seg["hash"], ""))
        else:
            return units
    tools = body.get("tools")
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    tools_unit = []
    if isinstance(tools, list) and tools:
        block = tools_block([t for t in tools if isinstance(t, dict)])
        tools_unit = [(segment_digest(block), block)]
    after = tools_after_system(messages)  # the engine's order: [system, tools | tools], messages
    if not after:
        units += tools_unit
    for i, m in enumerate(messages):
        text = message_text(m)
        pieces = message_pieces(str(m.get("role")), text, chunks)
        if len(pieces) == 1:
            units.append((message_digest(m), text))
        else:  # --blend auto: the engine keys each content-defined chunk (engine/prompt.py)
            units += [(chunk_digest(str(m.get("role")), k, p), p) for k, p in enumerate(pieces)]
        if after and i == 0:
            units += tools_unit
    return units


def request_chain(body: dict[str, Any], namespace: str,
                  chars_per_token: float = CHARS_PER_TOKEN, default_max_tokens: int = 256,
                  chunks: bool = False) -> RouteKey:
    """The route key of an OpenAI chat body (optionally with ``segments``) under
    ``namespace`` (``namespace_digest(tenant, model fingerprint)``). Never raises on
    malformed input: what cannot be read is left out (the replica reports the error)."""
    chain, tokens, texts = [], [], []
    parent = namespace
    for digest, text in _units(body, chunks):
        parent = chain_digest(parent, digest)
        chain.append(parent)
        tokens.append(estimate_tokens(text, chars_per_token))
        texts.append(text)
    budget = body.get("max_completion_tokens") or body.get("max_tokens")
    decode = budget if isinstance(budget, int) and budget > 0 else default_max_tokens
    return RouteKey(tuple(chain), tuple(tokens), decode, "".join(texts))


# The root of routing chains. Routing ignores tenants and purge generations (the
# engine's namespaces): the same segments are warm on a replica for whoever sends
# them next, as far as placement goes; isolation is the engine's business.
ROUTE_ROOT = namespace_digest("segcache-route", "v1")


def route_chain(digests: list[str]) -> str:
    """The routing chain digest after the unit digests ``digests`` (root to node)."""
    chain = ROUTE_ROOT
    for digest in digests:
        chain = chain_digest(chain, digest)
    return chain


def simulated_namespace(tenant: str = "default") -> str:
    """The namespace the simulator uses (no model: one fixed fingerprint)."""
    return namespace_digest(tenant, "simulated")
