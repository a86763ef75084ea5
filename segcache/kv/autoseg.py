"""Automatic segmentation of plain OpenAI chat requests. Stdlib only: the server,
the linter and the router all use these functions, so their verdicts agree.

A request without ``segments`` is cut into:

- ``tools``: the tool list in canonical form (sorted by function name, JSON keys
  sorted, fixed separators), rendered as one system-prompt block, after the
  leading system message's text (``tools_after_system``);
- one unit per message (system, user, assistant with its tool calls, tool), keyed
  by the digest of what the template renders of it (``message_digest``).

Two agents whose tools differ only in order therefore share the tools segment,
and a conversation that grows append-only reuses every earlier message.
"""

from __future__ import annotations

import json
from typing import Any

from segcache.kv.chunking import chunk_text
from segcache.kv.hashing import segment_digest

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")


def canonical_json(value: Any) -> str:
    """One byte sequence per JSON value: sorted keys, no spaces, UTF-8 kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def tool_name(tool: dict[str, Any]) -> str:
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    return str(fn.get("name", ""))


def canonical_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools sorted by name (then by canonical JSON, so duplicates order stably)."""
    return sorted(tools, key=lambda t: (tool_name(t), canonical_json(t)))


def tools_block(tools: list[dict[str, Any]]) -> str:
    """The system-prompt text that declares ``tools`` (Hermes/Qwen style), canonical."""
    lines = "\n".join(canonical_json(t) for t in canonical_tools(tools))
    return TOOLS_HEADER + lines + TOOLS_FOOTER


def message_text(message: dict[str, Any], canonical: bool = True) -> str:
    """The content of a message as the template will see it: text parts joined,
    assistant tool calls appended in ``<tool_call>`` blocks. ``canonical=False``
    keeps the tool-call arguments byte for byte as sent (what a plain prefix
    cache sees; the linter compares both)."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    text = content or ""
    for call in message.get("tool_calls") or []:
        block = _call_body(call.get("function", {}), canonical)
        text += ("\n" if text else "") + f"<tool_call>\n{block}\n</tool_call>"
    return text


def _call_body(fn: dict[str, Any], canonical: bool) -> str:
    args = fn.get("arguments", "{}")
    if not canonical:
        raw = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        return f'{{"name": "{fn.get("name")}", "arguments": {raw}}}'
    try:
        value = json.loads(args) if isinstance(args, str) else args
    except (json.JSONDecodeError, RecursionError):  # kept as sent: still one key per text
        value = args
    return canonical_json({"name": fn.get("name"), "arguments": value})


def message_digest(message: dict[str, Any], with_name: bool = False) -> str:
    """Key of a message unit: what its rendering puts in front of the model, the
    role and the text, plus ``name`` where the template renders it (``with_name``,
    ``ChatTokenizer.renders_name``). Fields the template drops (``name`` in most
    templates, ``tool_call_id``, which no template is given) are not part of it: a
    kept reply that comes back with a ``name`` (LangGraph sets one) still hits."""
    key = {"role": message.get("role"), "text": message_text(message)}
    if with_name and message.get("name") is not None:
        key["name"] = message["name"]
    return segment_digest(canonical_json(key))


def message_pieces(role: str, text: str, chunks: bool) -> list[str]:
    """The texts a message is keyed and tokenized as: its whole text, or with ``chunks``
    (``--blend auto``) the content-defined chunks of any message but an assistant's (a
    kept reply stays one unit). An empty text stays one piece: its template text must
    stay in a unit of its own. Two or more pieces are keyed by ``chunk_digest``, one by
    ``message_digest``. The engine, the router and the linter all cut by this."""
    if not chunks or role == "assistant":
        return [text]
    return chunk_text(text) or [text]


def chunk_digest(role: str, index: int, text: str, name: str | None = None) -> str:
    """Key of chunk ``index`` of a message cut into content-defined chunks
    (``kv.chunking``, ``--blend auto``): its text, plus, for the first chunk, the
    role (and a rendered ``name``) whose template text leads it. A later chunk's key
    is its text alone, the same wherever the block stands, so its position-free KV
    (CacheBlend) is found again at any position."""
    key: dict[str, Any] = {"chunk": text}
    if index == 0:
        key["role"] = role
        if name is not None:
            key["name"] = name
    return segment_digest(canonical_json(key))


def tools_after_system(messages: list[dict[str, Any]]) -> bool:
    """Where the tools block goes: after the leading system message's text when the
    request has one (as Qwen-style templates place tool declarations, so agents with
    different tools still share the system text as a prefix), else first, in a
    system message of its own. Unit order: explicit segments, [the leading system
    message, tools | tools], the other messages."""
    return bool(messages) and messages[0].get("role") == "system"


def reply_digest(text: str) -> str:
    """Key under which a generated reply is stored: the digest of the assistant
    message it will come back as next turn."""
    return message_digest({"role": "assistant", "content": text})
