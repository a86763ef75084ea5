"""segcache lint's cache simulation on tiny traces with hand-computed hit counts.

A one-token-per-character counter makes every count a string length:
ChatML frames are ``<|im_start|>{role}\\n`` + text + ``<|im_end|>\\n`` (system 30
chars + text, user 28, assistant 33) and the generation prompt is 22 chars.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from segcache.kv.autoseg import TOOLS_FOOTER, TOOLS_HEADER
from segcache.lint.analyze import lint
from segcache.lint.dynamic import mask
from segcache.lint.simulate import CacheSim, TokenRadix
from segcache.lint.tokens import TokenCounter
from segcache.lint.trace import Request
from segcache.lint.view import build_view


class CharCounter(TokenCounter):
    def __init__(self) -> None:
        super().__init__(None)

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(map(ord, text))


SYS = {"role": "system", "content": "You are terse."}  # 44 chars framed
Q1 = {"role": "user", "content": "Q1"}  # 30
A1 = {"role": "assistant", "content": "A1"}  # 35
Q2 = {"role": "user", "content": "Q2"}  # 30
GEN = 22


def req(i: int, messages: list, **kw) -> Request:
    return Request(index=i, source=f"t:{i + 1}", body={"messages": messages, **{
        k: v for k, v in kw.items() if k == "tools"}}, **{k: v for k, v in kw.items() if k != "tools"})


def simulate(requests: list[Request], warm_delay_s: float = 0.0) -> list[tuple[int, int, int, int]]:
    sim, counter = CacheSim(warm_delay_s), CharCounter()
    return [sim.observe(build_view(r, counter)) for r in requests]


def test_append_only_turns_hit_everything_before_the_new_message():
    rows = simulate([req(0, [SYS, Q1]), req(1, [SYS, Q1, A1, Q2])])
    assert rows[0] == (96, 0, 96, 0)
    # Turn 2: system + Q1 + the reply the server generated (A1) hit; Q2 + generation prompt miss.
    assert rows[1] == (161, 109, 161, 109)


def test_identical_request():
    # A plain prefix cache matches the generation prompt too and recomputes one token;
    # segcache hits every unit and computes the generation prompt (its tail).
    assert simulate([req(0, [SYS, Q1]), req(1, [SYS, Q1])])[1] == (96, 95, 96, 96 - GEN)


def test_tool_order_costs_plain_prefix_caching_only():
    a = {"type": "function", "function": {"name": "alpha"}}
    b = {"type": "function", "function": {"name": "beta"}}
    rows = simulate([req(0, [SYS, Q1], tools=[a, b]), req(1, [SYS, Q1], tools=[b, a])])
    frame = 30 + len(TOOLS_HEADER) + len(TOOLS_FOOTER) + 96
    plain = frame + 51 + 1 + 50  # as sent: '{"type": "function", "function": {"name": "alpha"}}'
    seg = frame + 47 + 1 + 46  # canonical: '{"function":{"name":"alpha"},"type":"function"}'
    # The system message comes first (tools go after the leading system text), then the tools.
    common = 44 + len('<|im_start|>system\n') + len(TOOLS_HEADER) + len('{"type": "function", "function": {"name": "')
    assert rows[1] == (plain, common, seg, seg - GEN)


def test_tenants_and_replicas_do_not_share():
    rows = simulate([req(0, [SYS, Q1]), req(1, [SYS, Q1], tenant="other"),
                     req(2, [SYS, Q1], replica="r1"), req(3, [SYS, Q1], replica="r1")])
    assert [r[1] for r in rows] == [0, 0, 0, 95]
    assert [r[3] for r in rows] == [0, 0, 0, 96 - GEN]


def test_prompt_is_cached_only_after_the_warm_delay():
    reqs = [req(0, [SYS, Q1], timestamp=100.0), req(1, [SYS, Q2], timestamp=100.5),
            req(2, [SYS, Q2], timestamp=102.0)]
    rows = simulate(reqs, warm_delay_s=1.0)
    # Request 1 arrives while request 0 is still warming: its system message misses.
    # By 102 s request 1's prompt is stored: system (44) + Q2 (30) hit.
    assert [r[3] for r in rows] == [0, 0, 44 + 30]
    assert [r[3] for r in simulate(reqs, warm_delay_s=0.0)] == [0, 44, 44 + 30]


def test_whole_trace_rates_and_the_dynamic_value_fix():
    """Two requests whose system message differs only in a timestamp, followed by
    the same long question: baseline, then the same trace with the value masked."""
    question = {"role": "user", "content": "Please summarise the attached design notes. " * 2}  # 88 chars
    def system(ts: str) -> dict:
        return {"role": "system", "content": f"Now: {ts}. You are terse."}
    reqs = [req(0, [system("2025-01-01T00:00:00Z"), question]),
            req(1, [system("2025-01-01T00:00:07Z"), question])]
    result = lint(lambda: reqs, CharCounter())
    assert result.fired() == {"dynamic-prefix"}
    sys_len = 30 + len("Now: 2025-01-01T00:00:00Z. You are terse.")  # 71
    total = sys_len + 28 + 88 + GEN  # 209
    base = result.baseline.result
    common = len("<|im_start|>system\nNow: 2025-01-01T00:00:0")
    assert base.per_request == [(total, 0, total, 0), (total, common, total, 0)]
    assert base.plain_rate == common / (2 * total) and base.seg_rate == 0.0
    fixed = result.fixes[0].result
    masked_total = total - len("2025-01-01T00:00:00Z") + len(mask("2025-01-01T00:00:00Z"))
    assert fixed.per_request[1] == (masked_total, masked_total - 1, masked_total, masked_total - GEN)
    assert fixed.seg_rate == (masked_total - GEN) / (2 * masked_total)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), max_size=8), min_size=1, max_size=8),
       st.lists(st.integers(0, 3), max_size=8))
def test_radix_match_is_the_longest_common_prefix(inserted, probe):
    radix = TokenRadix()
    for seq in inserted:
        radix.insert(tuple(seq))
    def lcp(a, b):
        return sum(1 for _ in itertools.takewhile(lambda p: p[0] == p[1], zip(a, b, strict=False)))
    assert radix.match(tuple(probe)) == max(lcp(s, probe) for s in inserted)
    for seq in inserted:
        assert radix.is_terminal(tuple(seq))


# The server's model of reuse beyond the unit walk: partial hits on the first missed
# unit (kv.partial.reusable_tokens) and blending of chunks at any position (--blend auto).
# Unit ids as the server lays them out: the template text before the block, then the block:
# "<|im_start|>system\n" (19) before the first message, "<|im_end|>\n<|im_start|>user\n" (28)
# and "<|im_end|>\n<|im_start|>assistant\n" (33) before later ones.


def simulate_with(requests: list[Request], **kw) -> tuple[list[tuple[int, int, int, int]], CacheSim]:
    sim, counter = CacheSim(**kw), CharCounter()
    return [sim.observe(build_view(r, counter)) for r in requests], sim


def test_partial_hit_rounds_the_shared_head_down_to_the_prefill_chunk():
    a = {"role": "system", "content": "S" * 40 + "AAAA"}
    b = {"role": "system", "content": "S" * 40 + "BBBB"}
    reqs = [req(0, [a, Q1]), req(1, [b, Q1])]
    total = 30 + 44 + 30 + GEN  # 126
    # Shared head: 19 + 40 = 59 tokens of a 63-token unit; rows depend on the call's
    # shape (independent_rows=0), so the reuse is 59 rounded down to 8: 56.
    rows, sim = simulate_with(reqs, prefill_chunk=8)
    assert rows[1] == (total, 59, total, 56)
    assert sim.result.reuse == [(0, 0), (56, 0)] and sim.result.partial_tokens == 56
    # Rows independent of the call: all 59, as the rest (4 tokens) does not end in a 1-token call.
    rows, _ = simulate_with(reqs, prefill_chunk=8, independent_rows=16)
    assert rows[1] == (total, 59, total, 59)
    # The default 256-token chunk: a 59-token head is not worth a chunk.
    assert simulate_with(reqs)[0][1] == (total, 59, total, 0)


def test_partial_hit_after_the_units_that_hit():
    reqs = [req(0, [SYS, {"role": "user", "content": "U" * 30 + "x"}]),
            req(1, [SYS, {"role": "user", "content": "U" * 30 + "y"}])]
    rows, sim = simulate_with(reqs, prefill_chunk=8)
    # System hits (44); the user unit is 28 + 31 = 59 ids sharing 28 + 30 = 58: 56 reused.
    # (A plain prefix cache matches the framed text: 44 + 17 + 30.)
    assert rows[1] == (44 + 59 + GEN, 44 + 17 + 30, 44 + 59 + GEN, 44 + 56)
    assert sim.result.reuse[1] == (56, 0)


def test_partial_hit_on_a_kept_reply_extended_by_the_client():
    """CrewAI appends the tool's observation to the reply it sends back: the reply
    node (generation prompt + generated ids) shares its whole length with it."""
    reply = "R" * 40
    reqs = [req(0, [SYS, Q1], reply=reply),
            req(1, [SYS, Q1, {"role": "assistant", "content": reply + "\nObservation: ok"}])]
    rows, sim = simulate_with(reqs, prefill_chunk=8)
    # Reply node: 11 + 22 + 40 = 73 ids; the unit: 33 + 56 = 89 ids; common 73 -> 72.
    total = 44 + 30 + (33 + 56) + GEN
    assert rows[1][2:] == (total, 44 + 30 + 72)
    assert sim.result.reuse[1] == (72, 0)


BLOCK = "```\n" + "b" * 40 + "\n```\n\n"  # 50 characters: a chunk of its own wherever it stands


def test_blend_auto_reuses_chunks_at_another_position():
    first = {"role": "system", "content": "Intro A.\n\n" + BLOCK + "Tail."}
    moved = {"role": "system", "content": "Other intro.\n\n" + BLOCK + "Tail."}
    reqs = [req(0, [first, Q1]), req(1, [moved, Q1]), req(2, [moved, Q1])]
    total = 30 + 14 + 50 + 5 + 30 + GEN  # 151
    # The system message is three chunk units; the first misses (its 19-token shared
    # head is under a prefill chunk), the block (50) and "Tail." (5) are blended. "Q1"
    # is one piece: a message unit, which the server never blends.
    rows, sim = simulate_with(reqs, blend="auto")
    assert rows[1] == (total, 19, total, 55)
    assert sim.result.reuse[1] == (0, 55)
    # The tree keeps what came before the blend point (the new first chunk: 19 + 14),
    # not what was blended nor what came after it: the same request again blends again.
    assert rows[2] == (total, total - 1, total, 33 + 55)
    assert sim.result.nonprefix_rate == 2 * 55 / (total - 4 + 2 * total)  # request 0's intro is 4 shorter
    assert sim.result.summary()["segcache_blended_tokens"] == 2 * 55
    # Without --blend auto, plain messages are whole units: nothing after the miss is reused.
    assert simulate_with(reqs, blend="marked")[0][1] == (total, 19, total, 0)


def test_blend_marked_reuses_marked_segments_only():
    doc = {"id": "doc", "content": "D" * 60, "reuse": "anywhere"}
    plain = {"id": "doc2", "content": "E" * 60}
    def body(i, segs):
        return Request(index=i, source="t", body={"segments": segs, "messages": [Q1]})
    reqs = [body(0, [doc, plain]), body(1, [{"id": "x", "content": "new"}, doc, plain])]
    total = 33 + 90 + 90 + 30 + GEN
    rows, sim = simulate_with(reqs)  # the server's default: --blend marked
    assert rows[1] == (total, 19, total, 60) and sim.result.reuse[1] == (0, 60)
    assert simulate_with(reqs, blend="auto")[0][1][3] == 60 + 60  # every segment
    assert simulate_with(reqs, blend="off")[0][1][3] == 0


def test_blend_option_is_checked():
    import pytest

    with pytest.raises(ValueError, match="blend"):
        CacheSim(blend="sometimes")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2), max_size=40), st.lists(st.integers(0, 2), max_size=40))
def test_fast_common_prefix_is_the_servers(a, b):
    from segcache.kv.partial import common_prefix as servers
    from segcache.lint.simulate import common_prefix

    assert common_prefix(tuple(a), tuple(b)) == servers(a, b)
