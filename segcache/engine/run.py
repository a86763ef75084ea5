"""One request's run state on the engine thread: its KV buffer, where it
stands in it, what it pinned, its usage so far."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from segcache.engine.kv_pool import Held
from segcache.engine.types import SegmentUsage
from segcache.kv.segment_tree import SegmentNode


@dataclass
class RunState:
    """One request's state: its KV buffer, where it stands, what it pinned."""

    kv: torch.Tensor  # [n_layers, 2, n_kv_heads, capacity, head_dim]
    parent: SegmentNode  # the node after the last unit so far (a root at first)
    pos: int = 0
    pinned: list[SegmentNode] = field(default_factory=list)
    usage: list[SegmentUsage] = field(default_factory=list)
    cached: int = 0
    prefix_chain: str = ""
    blended: bool = False  # KV from the blend point on is approximate: insert nothing
    tail_logits: torch.Tensor | None = None  # the last unit was prefilled with the tail
    held: Held = field(default_factory=list)  # cached nodes whose KV fills slots 0..held_tokens
    held_tokens: int = 0
    loads: Any = None  # lower-tier loads in flight for the units ahead (tiering.Loads)

    def hold(self, node: SegmentNode, n: int) -> None:
        """``node``'s KV (``n`` tokens) is now in slots ``pos..pos+n`` (before ``pos``
        moves); kept track of only while the held slots run on from 0 without a gap."""
        if self.pos == self.held_tokens and node.handle is not None:
            self.held.append((weakref.ref(node), weakref.ref(node.handle)))
            self.held_tokens += n
