"""KV cache structures: pure Python bookkeeping over opaque KV handles (no torch)."""

from segcache.kv.integrity import IntegrityError
from segcache.kv.segment_tree import REMOVE_REASONS, SegmentNode, SegmentTree

__all__ = ["REMOVE_REASONS", "IntegrityError", "SegmentNode", "SegmentTree"]
