"""Automatic segmentation of plain requests, kept replies and tool calls (tiny model)."""

from __future__ import annotations

import json
import re

import pytest

from segcache.engine.toolcalls import ToolCallFilter, parse_tool_calls
from segcache.engine.types import ChatRequest, SamplingParams
from segcache.kv.autoseg import canonical_tools, message_digest, tools_block

TOOLS = [
    {"type": "function", "function": {"name": "read_file", "description": "Read a file",
                                      "parameters": {"type": "object", "properties": {
                                          "path": {"type": "string"}}, "required": ["path"]}}},
    {"type": "function", "function": {"name": "run_tests", "description": "Run the tests",
                                      "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "edit", "description": "Edit a file",
                                      "parameters": {"properties": {"path": {"type": "string"}},
                                                     "type": "object"}}},
]
SYSTEM = {"role": "system", "content": "You are a coding agent. Be brief."}
GREEDY = SamplingParams(max_tokens=5, temperature=0.0)


def statuses(result, kind=None):
    return [(u.kind, u.status) for u in result.segments if kind is None or u.kind == kind]


def test_tool_order_and_key_order_do_not_matter():
    shuffled = [TOOLS[2], TOOLS[0], TOOLS[1]]
    keys_reordered = [json.loads(json.dumps(t, sort_keys=True)) for t in reversed(TOOLS)]
    assert tools_block(TOOLS) == tools_block(shuffled) == tools_block(keys_reordered)
    assert [t["function"]["name"] for t in canonical_tools(shuffled)] == ["edit", "read_file", "run_tests"]


def test_message_digest_is_canonical():
    call = {"id": "x1", "type": "function", "function": {"name": "f", "arguments": '{"b":1, "a":2}'}}
    same = {"id": "y2", "type": "function", "function": {"name": "f", "arguments": '{"a":2,"b":1}'}}
    a = message_digest({"role": "assistant", "content": None, "tool_calls": [call]})
    assert a == message_digest({"role": "assistant", "content": "", "tool_calls": [same]})
    assert message_digest({"role": "user", "content": "hi"}) != message_digest(
        {"role": "assistant", "content": "hi"})


def test_tools_in_different_order_share_the_tool_segment(tiny_engine_factory):
    engine = tiny_engine_factory()
    user = [SYSTEM, {"role": "user", "content": "List the files."}]
    first = engine.chat(ChatRequest("t", user, tools=TOOLS, sampling=GREEDY))
    # the tools block goes after the leading system text, as Qwen's template puts it
    assert [k for k, _ in statuses(first)] == ["message", "tools", "message"]
    second = engine.chat(ChatRequest("t", user[:1] + [{"role": "user", "content": "Run tests."}],
                                     tools=[TOOLS[1], TOOLS[2], TOOLS[0]], sampling=GREEDY))
    assert statuses(second)[:2] == [("message", "hit"), ("tools", "hit")]
    assert statuses(second)[2][1] in ("miss", "partial")
    assert first.tools_count == 3 and first.tools_digest == second.tools_digest
    # another tool set: the shared system text is still a shared prefix
    changed = [dict(TOOLS[0], function=dict(TOOLS[0]["function"], description="Read one file"))]
    third = engine.chat(ChatRequest("t", user, tools=changed + TOOLS[1:], sampling=GREEDY))
    assert statuses(third)[0] == ("message", "hit")
    assert statuses(third)[1][0] == "tools" and statuses(third)[1][1] != "hit"
    assert third.cached_tokens >= third.segments[0].tokens


def test_tools_without_a_system_message_come_first(tiny_engine_factory):
    engine = tiny_engine_factory()
    first = engine.chat(ChatRequest("t", [{"role": "user", "content": "Hi."}], tools=TOOLS,
                                    sampling=GREEDY))
    assert [k for k, _ in statuses(first)] == ["tools", "message"]


def test_a_name_the_template_drops_does_not_change_the_digest(tiny_engine_factory):
    """LangGraph sends its assistant messages back with ``name``: SmolLM2's template
    does not render it, so the kept reply must still hit."""
    engine = tiny_engine_factory()
    assert engine.tokenizer.renders_name is False
    msg = {"role": "assistant", "content": "Done."}
    assert message_digest({**msg, "name": "researcher"}) == message_digest(msg)
    assert message_digest({**msg, "name": "researcher"}, with_name=True) != message_digest(msg)
    tool = {"role": "tool", "content": "ok", "tool_call_id": "call_1"}
    assert message_digest(tool) == message_digest({**tool, "tool_call_id": "call_2"})
    conv = [SYSTEM, {"role": "user", "content": "Hello there."}]
    r1 = engine.chat(ChatRequest("t", conv, sampling=GREEDY))
    conv2 = conv + [{"role": "assistant", "content": r1.text, "name": "researcher"},
                    {"role": "user", "content": "And now?"}]
    r2 = engine.chat(ChatRequest("t", conv2, sampling=GREEDY))
    assert statuses(r2)[:3] == [("message", "hit")] * 3
    assert r2.cached_tokens == r1.prompt_tokens + r1.completion_tokens


def test_reply_is_kept_and_reused_next_turn(tiny_engine_factory):
    engine = tiny_engine_factory()
    conv = [SYSTEM, {"role": "user", "content": "Hello there."}]
    r1 = engine.chat(ChatRequest("t", conv, sampling=GREEDY))
    conv2 = conv + [{"role": "assistant", "content": r1.text},
                    {"role": "user", "content": "And now?"}]
    r2 = engine.chat(ChatRequest("t", conv2, sampling=GREEDY))
    assert statuses(r2) == [("message", "hit")] * 3 + [("message", "miss")]
    # everything of turn 1 (prompt + reply) was reused
    assert r2.cached_tokens == r1.prompt_tokens + r1.completion_tokens
    # The kept reply holds the ids the model generated, not a re-tokenization of
    # its text (which may differ: this model emits "\n" tokens that re-tokenize
    # as fewer "\n\n" tokens), so the prompt is exactly turn 1 + reply + new text.
    assert r2.prompt_tokens == r1.prompt_tokens + r1.completion_tokens + r2.segments[-1].tokens + len(
        engine.tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", special=True))


def test_unfinished_reply_leaves_no_node(tiny_engine_factory):
    engine = tiny_engine_factory()
    conv = [SYSTEM, {"role": "user", "content": "Hello there."}]
    calls = {"n": 0}
    orig = engine.runtime.decode

    def fail_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure mid-generation")
        return orig(*a, **k)

    engine.runtime.decode = fail_on_third
    with pytest.raises(RuntimeError):
        engine.chat(ChatRequest("t", conv, sampling=SamplingParams(max_tokens=8, temperature=0)))
    engine.runtime.decode = orig
    assert engine.cache_stats("t")["nodes"] == 2  # the two messages, no reply node
    cancelled = engine.chat(ChatRequest("t", conv, sampling=SamplingParams(max_tokens=8, temperature=0)),
                            is_cancelled=lambda: True)
    assert cancelled.finish_reason == "cancelled"
    assert engine.cache_stats("t")["nodes"] == 2
    engine.tree.check_integrity()


def test_parse_tool_calls():
    text = 'Sure.\n<tool_call>\n{"name": "read_file", "arguments": {"path": "a.py"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Sure."
    assert calls[0]["function"] == {"name": "read_file", "arguments": '{"path": "a.py"}'}
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    assert parse_tool_calls("<tool_call>{not json</tool_call>") == ("<tool_call>{not json</tool_call>", [])


def test_tool_call_ids_are_unique_and_outside_the_reply_key():
    call = '<tool_call>\n{"name": "ls", "arguments": {}}\n</tool_call>'
    _, calls = parse_tool_calls(call + "\n" + call)
    _, again = parse_tool_calls(call)
    ids = [c["id"] for c in calls + again]
    assert len(set(ids)) == 3
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
    # The client sends the reply back with its ids; the key the engine kept it
    # under (content and calls as generated) does not depend on them.
    kept = message_digest({"role": "assistant", "content": "", "tool_calls": again})
    for call_id in ("call_x", ids[2]):
        sent = [dict(again[0], id=call_id)]
        assert message_digest({"role": "assistant", "content": None, "tool_calls": sent}) == kept


def test_tool_call_filter_hides_call_text():
    out: list[str] = []
    f = ToolCallFilter(out.append)
    for piece in ["Let me ", "check.<tool", "_call>\n{", '"name": "x"}']:
        f(piece)
    f.flush()
    assert "".join(out) == "Let me check."
    out.clear()
    g = ToolCallFilter(out.append)
    g("a <too")
    g("l> b")
    g.flush()
    assert "".join(out) == "a <tool> b"
