"""``CacheKey``: the address of one node's KV, the same on RAM, disk and Redis."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from segcache.kv.hashing import chain_digest, is_digest


@dataclass(frozen=True)
class CacheKey:
    """The full address of one node's KV, the same on every tier.

    ``namespace`` = H(tenant, fingerprint) (the tree root), ``chain`` =
    H(``parent_chain``, ``segment_digest``). Raises ValueError if a field is
    not a ``sha256:`` digest or ``chain`` does not follow from its parts, so a
    key built from a client's hash can only name an entry of its own chain.
    """

    namespace: str
    fingerprint: str
    parent_chain: str
    segment_digest: str
    chain: str

    def __post_init__(self) -> None:
        for name in ("namespace", "fingerprint", "parent_chain", "segment_digest", "chain"):
            if not is_digest(getattr(self, name)):
                raise ValueError(f"CacheKey.{name} must be a sha256: digest")
        if chain_digest(self.parent_chain, self.segment_digest) != self.chain:
            raise ValueError("CacheKey.chain is not H(parent_chain, segment_digest)")

    @classmethod
    def child(cls, namespace: str, fingerprint: str, parent_chain: str, segment_digest: str) -> CacheKey:
        """The key of the node after ``parent_chain`` (the namespace itself for a root's child)."""
        return cls(namespace, fingerprint, parent_chain, segment_digest,
                   chain_digest(parent_chain, segment_digest))

    @property
    def ns_hex(self) -> str:
        return hex_of(self.namespace)

    @property
    def chain_hex(self) -> str:
        return hex_of(self.chain)


def hex_of(digest: str) -> str:
    """The 64 hex digits of a ``sha256:`` digest (a file or key name part)."""
    return digest.split(":", 1)[1]


def fingerprint_with(model_fingerprint: str, **settings: object) -> str:
    """``model_fingerprint`` extended with engine settings that change KV bits.

    The runtime's fingerprint covers weights, dtypes, tokenizer + chat template,
    kernel sources and KV layout; a setting decided above the model (the
    scheduler's ``prefill_chunk``, where chunking changes float32 bits) is
    added here. Same inputs, same digest; any change, another digest (and so
    another namespace: no old entry can be named)."""
    if not is_digest(model_fingerprint):
        raise ValueError("model_fingerprint must be a sha256: digest")
    blob = json.dumps({"model": model_fingerprint, "settings": settings}, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()
