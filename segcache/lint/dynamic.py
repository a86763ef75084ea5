"""Values that change from request to request: timestamps, dates, UUIDs, ids,
counters, random tokens. ``mask`` replaces each with a placeholder naming its
kind, so two texts that differ only in such values mask to the same string.

Order matters: the first alternative that matches at a position wins, so the
specific shapes (UUID, ISO timestamp) come before the generic ones (numbers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_MONTHS = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|Jun(?:e)?|Jul(?:y)?|"
    r"Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_PATTERNS: tuple[tuple[str, str], ...] = (
    ("uuid", r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"),
    ("timestamp", r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?"),
    ("date", r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}/\d{1,2}/\d{2,4}\b"
             rf"|\b{_MONTHS}\.? \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}\b"
             rf"|\b\d{{1,2}} {_MONTHS}\.?,? \d{{4}}\b"),
    ("time", r"\b\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:\s?[AaPp][Mm])?\b"),
    ("epoch", r"\b1[5-9]\d{8}(?:\d{3})?\b"),
    ("id", r"\b(?:req|request|trace|span|run|session|sess|msg|call|chatcmpl|corr|txn|id)"
           r"[-_:][A-Za-z0-9_-]{4,}"),
    ("hex", r"\b[0-9a-fA-F]{12,}\b"),
    ("random", r"\b(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{10,}\b"),
    ("number", r"\b\d+(?:\.\d+)?\b"),
)
_RE = re.compile("|".join(f"(?P<{kind}>{pattern})" for kind, pattern in _PATTERNS))


@dataclass(frozen=True)
class Value:
    """One dynamic-looking value: its kind, where it is in the text, and its text."""

    kind: str
    start: int
    end: int
    text: str


def find_values(text: str) -> list[Value]:
    return [Value(m.lastgroup or "value", m.start(), m.end(), m.group()) for m in _RE.finditer(text)]


@lru_cache(maxsize=65536)  # prompts repeat the same blocks; the regex is the linter's hot spot
def mask(text: str) -> str:
    """``text`` with every dynamic-looking value replaced by ``⟨kind⟩``."""
    return _RE.sub(lambda m: f"\u27e8{m.lastgroup}\u27e9", text)


def first_difference(a: str, b: str) -> int:
    """Index of the first character where ``a`` and ``b`` differ (len of the shorter if none)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def common_suffix(a: str, b: str, limit: int) -> int:
    """Length of the common suffix of ``a`` and ``b``, at most ``limit``."""
    n = 0
    while n < limit and n < len(a) and n < len(b) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def snippet(text: str, at: int, width: int = 40) -> str:
    """Up to ``width`` characters of ``text`` from ``at``, one line, for evidence."""
    piece = text[at:at + width]
    return piece.replace("\n", "\\n") + ("…" if at + width < len(text) else "")


def word_start(text: str, at: int) -> int:
    """Back ``at`` up to the start of the word it falls in (for readable evidence)."""
    while at > 0 and text[at - 1].isalnum():
        at -= 1
    return at
