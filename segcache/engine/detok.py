"""Incremental detokenization with stop strings.

Text is released only when it is final: never half a UTF-8 character, never the
start of what could still become a stop string. Each token costs O(1): the
tokenizer's streaming decoder (``ChatTokenizer.decode_stream``) decodes a short
window of ids, not the whole reply, and stop strings are searched only in the
text not yet released (plus the held-back tail).
"""

from __future__ import annotations

from collections.abc import Callable

# Feeds one token id to an incremental decoder; returns the text it made final
# (None or "" while a multi-byte character is incomplete). The concatenation of
# the returns is the one-shot decode of every id fed.
StepDecoder = Callable[[int], "str | None"]


class TextStream:
    """The text of one reply, released as it becomes final.

    ``text`` is the reply so far (cut at a stop string once one is found) and
    ``ids`` every token pushed; without a stop string the released pieces plus
    ``flush()`` concatenate to ``text``, the one-shot decode of ``ids``."""

    def __init__(self, step: StepDecoder, stop: tuple[str, ...] = ()) -> None:
        self._step = step
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
        piece = self._step(token_id)
        if not piece:
            return ""  # an incomplete multi-byte character: wait for the next token
        self.text += piece
        if self._stop:
            begin = max(0, self.emitted - self._hold)
            hits = [i for i in (self.text.find(s, begin) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._release(len(self.text))
        return self._release(max(self.emitted, len(self.text) - self._hold))

    def flush(self) -> str:
        """Release everything still held back (at the end of generation)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return out
