"""Reading a request trace, and cutting each request into the units the server caches.

Accepted input: JSON Lines, one JSON object per line, in either shape:

1. An OpenAI chat request body (``messages``, optional ``tools``,
   ``response_format``, ``segments``), with optional metadata fields next to
   them or inside its ``metadata`` object.
2. A request-log record: ``{"request": <body>, ...metadata}``; the record may
   carry ``response`` (an OpenAI response object, or the reply text) so the
   simulation knows what the model generated.

Metadata fields (all optional): ``timestamp`` (seconds since the epoch, or an
ISO-8601 string; also ``ts``/``time``), ``route`` or ``replica`` (which
backend served it), ``tenant`` (the cache namespace; default ``"default"``),
``agent`` (or ``agent_id``/``session_id``: which agent or conversation sent it).
Blank lines are skipped; lines that are not a JSON object with ``messages``
are counted as skipped and reported.

Units follow ``segcache.kv.autoseg`` exactly: explicit ``segments`` in order,
the leading system message (if the first message is one), the tools block if
there are tools, then one unit per other message. Each unit
is rendered twice: ``text`` as segcache renders it (canonical tools and tool
call arguments) and ``plain_text`` as a plain prefix cache sees the bytes the
client sent (tool order, key order and argument strings as sent). Both use
the ChatML frame of the default model's template.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from segcache.kv.autoseg import (
    TOOLS_FOOTER,
    TOOLS_HEADER,
    message_digest,
    message_text,
    tools_after_system,
    tools_block,
)
from segcache.kv.hashing import segment_digest

GENERATION_PROMPT = "<|im_start|>assistant\n"


@dataclass
class Request:
    """One request of the trace. ``index`` counts requests over all input files."""

    index: int
    source: str
    body: dict[str, Any]
    tenant: str = "default"
    agent: str | None = None
    timestamp: float | None = None
    replica: str | None = None
    reply: str | None = None

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages") or []

    @property
    def tools(self) -> list[dict[str, Any]]:
        return self.body.get("tools") or []

    def with_body(self, body: dict[str, Any], **changes: Any) -> Request:
        fields = {**self.__dict__, "body": body, **changes}
        return Request(**fields)


@dataclass(frozen=True)
class Unit:
    """What one segment-tree node holds. ``index`` is the message (or segment)
    index, -1 for the tools block."""

    kind: str  # "segment" | "tools" | "message"
    index: int
    role: str
    digest: str
    text: str
    plain_text: str
    content: str = field(default="", compare=False)  # the text inside the frame

    @property
    def label(self) -> str:
        if self.kind == "tools":
            return "tools"
        return f"{self.kind} {self.index} ({self.role})" if self.kind == "message" else f"segment {self.index}"


def frame(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def plain_tools_text(tools: list[dict[str, Any]]) -> str:
    """The tools block with tools and keys in the order sent (what vLLM-style templates render)."""
    return TOOLS_HEADER + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_FOOTER


def plain_message_text(message: dict[str, Any]) -> str:
    """``message_text`` but with tool-call arguments exactly as sent."""
    return message_text(message, canonical=False)


def request_units(request: Request) -> list[Unit]:
    """The request cut as the server cuts it (see the module docstring)."""
    units = []
    for i, seg in enumerate(request.body.get("segments") or []):
        content = str(seg.get("content") or "")
        digest = segment_digest(content) if content else str(seg.get("hash") or seg.get("name") or "")
        units.append(Unit("segment", i, "system", digest, frame("system", content),
                          frame("system", content), content))
    messages = [_message_unit(i, m) for i, m in enumerate(request.messages)]
    # The tools block goes after the leading system message's text, as Qwen-style
    # templates place it; with no leading system message it comes first.
    lead = 1 if tools_after_system(request.messages) else 0
    units += messages[:lead]
    if request.tools:
        block = tools_block(request.tools)
        units.append(Unit("tools", -1, "system", segment_digest(block), frame("system", block),
                          frame("system", plain_tools_text(request.tools)), block))
    return units + messages[lead:]


def _message_unit(i: int, m: dict[str, Any]) -> Unit:
    role = str(m.get("role", "user"))
    text = message_text(m)
    return Unit("message", i, role, message_digest(m), frame(role, text),
                frame(role, plain_message_text(m)), text)


def parse_timestamp(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) / (1000.0 if value > 1e11 else 1.0)  # milliseconds
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def _first(record: dict[str, Any], body: dict[str, Any], *keys: str) -> Any:
    meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    for source in (record, body, meta):
        for key in keys:
            if source.get(key) is not None:
                return source[key]
    return None


def _reply_text(response: Any) -> str | None:
    if isinstance(response, str):
        return response
    if isinstance(response, dict):
        try:
            return response["choices"][0]["message"].get("content") or None
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
    return None


def parse_record(record: Any, index: int, source: str) -> Request | None:
    """A ``Request`` from one decoded JSON line, or None if it is not a chat request."""
    if not isinstance(record, dict):
        return None
    body = record.get("request") if isinstance(record.get("request"), dict) else record
    if not isinstance(body.get("messages"), list):
        return None
    agent = _first(record, body, "agent", "agent_id", "session_id")
    replica = _first(record, body, "replica", "route")
    return Request(
        index=index,
        source=source,
        body=body,
        tenant=str(_first(record, body, "tenant") or "default"),
        agent=None if agent is None else str(agent),
        timestamp=parse_timestamp(_first(record, body, "timestamp", "ts", "time")),
        replica=None if replica is None else str(replica),
        reply=_reply_text(record.get("response")),
    )


@dataclass
class ReadStats:
    lines: int = 0
    skipped: int = 0
    first_skipped: list[str] = field(default_factory=list)


def read_requests(paths: list[Path], stats: ReadStats | None = None,
                  on_bytes: Any = None) -> Iterator[Request]:
    """Stream requests from JSONL files, in order; ``on_bytes(n)`` reports progress."""
    stats = stats if stats is not None else ReadStats()
    index = 0
    for path in paths:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if on_bytes is not None:
                    on_bytes(len(raw))
                if not raw.strip():
                    continue
                stats.lines += 1
                source = f"{path}:{line_no}"
                try:
                    request = parse_record(json.loads(raw), index, source)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    request = None
                if request is None:
                    stats.skipped += 1
                    if len(stats.first_skipped) < 5:
                        stats.first_skipped.append(source)
                    continue
                index += 1
                yield request
