"""Tool calls in the model's output.

segcache declares tools with the block in ``segcache.kv.autoseg.tools_block``
(Hermes/Qwen style), so the model answers a call as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. Output that does
not parse stays plain text.
"""

from __future__ import annotations

import hashlib
import json
import re
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
    for i, m in enumerate(_BLOCK.finditer(text, start)):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            return text, []
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return text, []
        args = obj.get("arguments", {})
        call_id = "call_" + hashlib.sha256(f"{i}:{m.group(1)}".encode()).hexdigest()[:24]
        calls.append({"id": call_id, "type": "function", "function": {
            "name": obj["name"],
            "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    content = text[:start].strip()
    return (content or None), calls


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
