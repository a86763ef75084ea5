"""Cache tiers below the RAM tree: local disk, then Redis (issue 17).

Torch-free: payloads are safetensors blobs built from raw KV bytes
(``payload.KVData``). The engine wiring is described in this docstring's
second half (to be written).
"""

from segcache.kv.tiers.base import Hit, Tier, TierStats
from segcache.kv.tiers.disk import DiskTier
from segcache.kv.tiers.keys import CacheKey
from segcache.kv.tiers.payload import (
    Expected,
    KVData,
    PayloadRejected,
    decode,
    encode,
    token_digest,
)
from segcache.kv.tiers.store import Fetched, TieredStore

__all__ = [
    "CacheKey", "DiskTier", "Expected", "Fetched", "Hit", "KVData", "PayloadRejected", "Tier",
    "TierStats", "TieredStore", "decode", "encode", "token_digest",
]
