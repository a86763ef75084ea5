"""The error a cache structure's ``check_integrity`` raises (stdlib only).

Invariant checks are ordinary ``if``/``raise``, never ``assert``: they must
still run under ``python -O``, where asserts are stripped.
"""

from __future__ import annotations


class IntegrityError(AssertionError):
    """A cache structure broke one of its invariants; the message names which.

    A subclass of ``AssertionError`` so callers that expected the old asserts
    keep working."""


def require(ok: bool, message: str) -> None:
    """Raise ``IntegrityError(message)`` unless ``ok``."""
    if not ok:
        raise IntegrityError(message)
