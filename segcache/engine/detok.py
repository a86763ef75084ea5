"""Incremental detokenization with stop strings.

Text is released only when it is final: never half a UTF-8 character, never the
start of what could still become a stop string.
"""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded text so far (truncated at a stop string once found)
        self.emitted = 0  # characters of ``text`` already released
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the newly final text (may be ""). Sets ``stopped``
        when a stop string appears; the stop string itself is never returned."""
        self.ids.append(token_id)
        text = self._decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for the next token
        self.text = text
        if self._stop:
            begin = max(0, self.emitted - self._hold)
            hits = [i for i in (text.find(s, begin) for s in self._stop) if i >= 0]
            if hits:
                self.text = text[: min(hits)]
                self.stopped = True
                return self._release(len(self.text))
        return self._release(max(self.emitted, len(text) - self._hold))

    def flush(self) -> str:
        """Release everything still held back (at the end of generation)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return out
