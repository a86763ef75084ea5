"""Partial hits: a unit whose digest misses reuses the head a cached sibling shares
(issue 16), with KV bit-identical to a cold prefill's and exact usage."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segcache.config import CacheConfig, SchedulerConfig
from segcache.engine.types import ChatRequest, SamplingParams
from segcache.kv.partial import common_prefix, reusable_tokens

GREEDY = SamplingParams(max_tokens=5, temperature=0.0)
HEAD = ("Shared rules for every agent: answer in English, cite the files you read, never invent "
        "APIs, keep answers short. ") * 6


def agent_messages(part: str, task: str = "Start.") -> list[dict]:
    return [{"role": "system", "content": HEAD + part}, {"role": "user", "content": task}]


def chat(engine, messages, tenant="t"):
    return engine.chat(ChatRequest(tenant, messages, [], GREEDY))


def unit(result, uid):
    return next(u for u in result.segments if u.id == uid)


# ------------------------------------------------------------------ the rule


@pytest.mark.parametrize("common,unit_len,node_len,chunk,indep,want", [
    (700, 900, 800, 256, 0, 512),     # rows depend on the call: whole chunks only
    (200, 900, 800, 256, 0, 0),       # less than a chunk in common: nothing
    (900, 900, 900, 256, 0, 768),     # the same tokens: all but the last (partial) chunk
    (700, 900, 800, 256, 256, 700),   # independent rows: the common prefix
    (700, 701, 800, 256, 256, 699),   # ... but the rest must not be one 1-token call
    (700, 769, 800, 256, 256, 512),   # the unit alone ends in a 1-token call: so must the rest
    (257, 900, 257, 256, 256, 256),   # the sibling's last token came from a 1-token call
    (10, 20, 30, 0, 0, 0),            # no chunking: one call, nothing is the same call
])
def test_reusable_tokens(common, unit_len, node_len, chunk, indep, want):
    assert reusable_tokens(common, unit_len, node_len, chunk, indep) == want


@given(st.integers(0, 3000), st.integers(1, 3000), st.integers(1, 3000),
       st.sampled_from([1, 2, 8, 64, 256]), st.sampled_from([0, 256]))
def test_reusable_tokens_keeps_the_cold_calls(common, unit_len, node_len, chunk, indep):
    """The rest after the reuse runs the calls a cold prefill of the unit runs on
    those tokens: the same chunk starts, or (independent rows) the same 1-token calls."""
    common = min(common, unit_len, node_len)
    r = reusable_tokens(common, unit_len, node_len, chunk, indep)
    assert 0 <= r <= min(common, unit_len - 1)
    if r == 0:
        return
    if not 2 <= chunk <= indep:
        assert r % chunk == 0
    else:
        assert ((unit_len - r) % chunk == 1) == (unit_len % chunk == 1)
        assert not (r == node_len and node_len % chunk == 1)


# ------------------------------------------------------------------ the engine


@pytest.fixture
def chunked(tiny_engine_factory):
    """Engines prefilling in 16-token chunks: alignment matters on short prompts."""
    return lambda **kw: tiny_engine_factory(CacheConfig(**kw), scheduler=SchedulerConfig(prefill_chunk=16))


def test_a_changed_system_message_reuses_its_shared_head(chunked):
    engine = chunked()
    chat(engine, agent_messages("You are the backend agent."))
    second = chat(engine, agent_messages("You are the frontend agent; you write TypeScript."))
    sys = unit(second, "messages[0]")
    assert sys.status == "partial"
    n_head = len(engine.tokenizer.encode(HEAD))
    assert n_head - 16 <= sys.reused <= sys.tokens  # the head, to a 16-token chunk boundary
    assert sys.reused % 16 == 0
    assert second.cached_tokens == sys.reused
    assert second.usage()["prompt_tokens_details"]["cached_tokens"] == sys.reused
    cold_engine = chunked()
    cold = chat(cold_engine, agent_messages("You are the frontend agent; you write TypeScript."))
    assert second.token_ids == cold.token_ids
    assert second.prompt_tokens == cold.prompt_tokens
    # the partially reused unit's stored KV: the same bits as the cold prefill's
    assert torch.equal(stored(engine, second, 0).handle, stored(cold_engine, cold, 0).handle)
    engine.tree.check_integrity()
    assert engine.cache_stats("t")["pinned"] == 0
    # and the unit is a plain hit next time
    again = chat(engine, agent_messages("You are the frontend agent; you write TypeScript."))
    assert unit(again, "messages[0]").status == "hit"
    assert again.token_ids == cold.token_ids


def stored(engine, result, index, tenant="t"):
    """The tree node of unit ``index`` of ``result`` (its path replayed by digest)."""
    digests = [u.hash for u in result.segments[:index + 1]]
    return engine.tree.peek(engine.namespace(tenant), digests)[index]


# ------------------------------------------------------------------ the property

HEADS = [HEAD, HEAD[: len(HEAD) // 2] + "Other rules follow. " * 8]
PARTS = ["You are the backend agent.", "You are the frontend agent; TypeScript only.", "Reviewer."]
TURNS = ["Start.", "Fix the login bug in auth.py please.", "Now write the tests.", "Thanks."]
conversations = st.lists(
    st.tuples(st.sampled_from(range(len(HEADS))), st.sampled_from(range(len(PARTS))),
              st.lists(st.sampled_from(range(len(TURNS))), min_size=1, max_size=3)),
    min_size=2, max_size=4)


def build(head: int, part: int, turns: list[int]) -> list[dict]:
    msgs = [{"role": "system", "content": HEADS[head] + PARTS[part]}]
    for i, t in enumerate(turns):
        if i:
            msgs.append({"role": "assistant", "content": f"Done with step {i}."})
        msgs.append({"role": "user", "content": TURNS[t]})
    return msgs


def layout(engine, messages):
    """(unit token counts, flat prompt ids) as the engine builds the prompt."""
    prompt = engine._build_prompt("t", engine.namespace("t"), messages, [], [], True)
    flat = [t for u in prompt.units for t in u.ids] + list(prompt.tail)
    return [len(u.ids) for u in prompt.units], flat


def least_reuse(units: list[int], flat: list[int], earlier: list[tuple[list[int], list[int]]],
                chunk: int) -> int:
    """What any earlier prompt's common token prefix promises: whole units up to the
    unit it ends in, then that unit's head as ``reusable_tokens`` allows."""
    best = 0
    for e_units, e_flat in earlier:
        lcp = common_prefix(flat, e_flat)
        start = 0
        for n, e_n in zip(units, e_units, strict=False):
            if start + n <= lcp and n == e_n:
                start += n
                continue
            if n != e_n or start + n > lcp:
                best = max(best, start + reusable_tokens(lcp - start, n, e_n, chunk, 0))
            break
        else:
            best = max(best, start)
    return best


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversations)
def test_cached_tokens_cover_every_common_prefix_and_equal_cold(chunked, convo):
    engine = chunked()
    earlier: list[tuple[list[int], list[int]]] = []
    for head, part, turns in convo:
        messages = build(head, part, turns)
        units, flat = layout(engine, messages)
        got = chat(engine, messages)
        assert got.cached_tokens >= least_reuse(units, flat, earlier, 16)
        assert got.cached_tokens == sum(u.tokens if u.status == "hit" else (u.reused or 0)
                                        for u in got.segments)
        cold = chat(chunked(), messages)
        assert got.token_ids == cold.token_ids
        earlier.append((units, flat))
    engine.tree.check_integrity()
