"""Content digests that name cache entries. Stdlib only: the router and the
linter import this too, so their verdicts match the server's.

- segment digest: ``sha256:`` + hex of the UTF-8 content
- namespace digest: H(tenant id, model fingerprint); the root of one tree
- chain digest: H(parent chain, segment digest); "the KV after exactly this
  sequence of segments", used by disk files, Redis keys and the router
"""

from __future__ import annotations

import hashlib

PREFIX = "sha256:"


def _sha(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        data = p.encode("utf-8")
        # Length-prefix every part so ("ab", "c") and ("a", "bc") differ.
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return PREFIX + h.hexdigest()


def segment_digest(content: str) -> str:
    """``sha256:<hex>`` of the UTF-8 bytes of ``content`` (what clients send as ``hash``)."""
    return PREFIX + hashlib.sha256(content.encode("utf-8")).hexdigest()


def namespace_digest(tenant: str, model_fingerprint: str) -> str:
    """Root of one tenant's tree for one model; KV never crosses namespaces."""
    return _sha("segcache-namespace-v1", tenant, model_fingerprint)


def chain_digest(parent_chain: str, seg_digest: str) -> str:
    """Digest naming the KV after the parent's sequence followed by this segment."""
    return _sha("segcache-chain-v1", parent_chain, seg_digest)


def is_digest(value: str) -> bool:
    """True for a well-formed ``sha256:`` + 64 lowercase hex digest."""
    if not value.startswith(PREFIX) or len(value) != len(PREFIX) + 64:
        return False
    return all(c in "0123456789abcdef" for c in value[len(PREFIX):])
