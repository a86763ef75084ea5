"""Tool calls in the model's output.

segcache declares tools with the block in ``segcache.kv.autoseg.tools_block``
(Hermes/Qwen style), so the model answers a call as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. Output that does
not parse stays plain text.

Call ids are random (``call_`` + 24 letters and digits, as OpenAI's): two identical
calls, in one reply or in two turns, get different ids, which agent frameworks rely
on to tell history items apart. An id is made once per reply, so a stream and its
final object agree, and it is never part of a cache key: the kept reply is keyed by
the text the template renders (name and arguments), see ``kv.autoseg.message_text``.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.S)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split ``text`` into (content before the first call or None, OpenAI tool_calls).
    Returns (text, []) when no block parses."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls = []
    for m in _BLOCK.finditer(text, start):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            return text, []
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return text, []
        args = obj.get("arguments", {})
        calls.append({"id": new_call_id(), "type": "function", "function": {
            "name": obj["name"],
            "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    content = text[:start].strip()
    return (content or None), calls


_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


class ToolCallFilter:
    """Wraps a text callback: passes text through until a ``<tool_call>`` starts,
    then holds everything back (the calls are returned parsed at the end)."""

    def __init__(self, forward) -> None:
        self._forward = forward
        self._pending = ""
        self.capturing = False

    def __call__(self, delta: str) -> None:
        if self.capturing:
            return
        text = self._pending + delta
        at = text.find(OPEN)
        if at >= 0:
            self.capturing = True
            text, self._pending = text[:at], ""
            if text:
                self._forward(text)
            return
        keep = _partial_suffix(text, OPEN)
        self._pending = text[len(text) - keep:] if keep else ""
        if text[: len(text) - keep]:
            self._forward(text[: len(text) - keep])

    def flush(self) -> None:
        if not self.capturing and self._pending:
            self._forward(self._pending)
        self._pending = ""


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
