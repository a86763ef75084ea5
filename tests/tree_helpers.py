"""Fakes shared by the tree tests (``test_segment_tree.py``, ``test_radix.py``)."""

from __future__ import annotations

from typing import Any


class FakeClock:
    """A tree clock that stands still until the test sets ``now``."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """on_remove callback that remembers (node, reason, handle at call time)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, str, object]] = []

    def __call__(self, node: Any, reason: str) -> None:
        self.calls.append((node, reason, node.handle))

    def removals(self, attr: str) -> list[tuple[Any, str]]:
        """``(getattr(node, attr), reason)`` per call, e.g. ``removals("digest")``."""
        return [(getattr(node, attr), reason) for node, reason, _ in self.calls]
