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
