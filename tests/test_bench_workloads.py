"""Benchmark workloads: deterministic for a seed, seed 000's structure, real text, sizes."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from segcache.bench.corpus import fit
from segcache.bench.runner import request_body
from segcache.bench.workloads import (
    CHARS_PER_TOKEN,
    MultiAgentSizes,
    WorkloadOptions,
    agent_loop,
    multi_agent,
)
from segcache.kv.hashing import segment_digest


@pytest.fixture(scope="module")
def requests():
    return multi_agent(WorkloadOptions(seed=0))


def test_same_seed_same_requests_other_seed_other_text(requests):
    assert multi_agent(WorkloadOptions(seed=0)) == requests
    other = multi_agent(WorkloadOptions(seed=1))
    assert other[0].segments[0][1] != requests[0].segments[0][1]


def test_seed_000_structure(requests):
    assert [r.label for r in requests] == [f"agent{a}/turn{t}" for t in (1, 2, 3) for a in (1, 2, 3)]
    a1, a2, a3 = requests[:3]
    A, B, D = a1.segments
    assert a2.segments[0] == A and a3.segments[0] == A          # every agent starts with A
    assert a3.segments[:2] == [A, B]                            # agents 1 and 3 share A+B
    assert a2.segments[1] != B                                  # agent 2 shares only A
    assert a2.segments[2] == a3.segments[2] != D                # 2 and 3 share task E
    assert len({c for r in requests[:3] for _, c in r.segments}) == 5  # A..E all distinct
    for later in requests[3:]:                                  # later turns: same segments, new question
        assert later.segments == requests[later.agent - 1].segments
    questions = [r.messages[0]["content"] for r in requests]
    assert len(set(questions)) == len(questions)
    assert all(r.messages[0]["role"] == "user" for r in requests)


@pytest.mark.parametrize("sizes", [MultiAgentSizes(), MultiAgentSizes(1200, 400, 100)])
def test_block_sizes_within_tolerance(sizes):
    reqs = multi_agent(WorkloadOptions(seed=3, sizes=sizes, turns=1))
    (_, a), (_, b), (_, d) = reqs[0].segments
    (_, c), (_, e) = reqs[1].segments[1:]
    for text, tokens in ((a, sizes.global_tokens), (b, sizes.agent_tokens), (c, sizes.agent_tokens),
                         (d, sizes.task_tokens), (e, sizes.task_tokens)):
        target = tokens * CHARS_PER_TOKEN
        assert 0.85 * target <= len(text) <= target, (len(text), target)


def test_text_is_real_stdlib_text(requests):
    _, task = requests[0].segments[2]
    header, _, code = task.partition("\n\n")
    file_name = header.rsplit(" ", 1)[-1]
    source = (Path(sysconfig.get_paths()["stdlib"]) / file_name).read_text(encoding="utf-8")
    assert code in source
    assert "lorem" not in requests[0].segments[0][1].lower()


def test_global_block_holds_rules_and_valid_tool_schemas(requests):
    _, a = requests[0].segments[0]
    rules, _, tools = a.partition("\n\n## Tools\n\n")
    assert "\n1. " in rules
    schemas = [json.loads(obj) for obj in tools.split("\n\n")]
    assert len(schemas) >= 5
    assert all(s["type"] == "function" and "parameters" in s["function"] for s in schemas)


def test_agent_loop_history_grows_by_appending():
    reqs = agent_loop(WorkloadOptions(seed=0, turns=4))
    assert len(reqs) == 4
    for prev, cur in zip(reqs, reqs[1:], strict=False):
        assert cur.segments == prev.segments
        assert cur.messages[: len(prev.messages)] == prev.messages
        assert len(cur.messages) == len(prev.messages) + 2
    assert agent_loop(WorkloadOptions(seed=0, turns=4)) == reqs


def test_request_body_modes_carry_the_same_text(requests):
    req = requests[0]
    messages, extra = request_body(req, "segments")
    assert messages == req.messages
    assert [s["id"] for s in extra["segments"]] == [i for i, _ in req.segments]
    assert all(s["hash"] == segment_digest(s["content"]) for s in extra["segments"])
    flat, extra_flat = request_body(req, "flat")
    assert extra_flat == {}
    assert flat[0] == {"role": "system", "content": "\n\n".join(c for _, c in req.segments)}
    assert flat[1:] == req.messages
    # A nonce makes every segment new (a non-prefix cache could reuse any of them);
    # in flat mode, the system message.
    nonced, extra_n = request_body(req, "segments", nonce="n1")
    for seg, plain in zip(extra_n["segments"], extra["segments"], strict=True):
        assert seg["content"] == "[n1]\n" + plain["content"]
        assert seg["hash"] == segment_digest(seg["content"])
    flat_n, _ = request_body(req, "flat", nonce="n1")
    assert flat_n[0]["content"] == "[n1]\n" + flat[0]["content"]
    assert all("reuse" not in s for s in extra["segments"])  # multi-agent marks nothing
    with pytest.raises(ValueError, match="mode"):
        request_body(req, "bogus")


def test_fit_cuts_at_a_line_end_near_the_limit():
    text = "\n".join(["x" * 9] * 100)
    assert fit(text, 5000) == text
    assert fit(text, 205) == "\n".join(["x" * 9] * 20)
    assert fit("y" * 300, 100) == "y" * 100  # no line end near the limit: a hard cut


def test_options_validate():
    with pytest.raises(ValueError):
        WorkloadOptions(turns=0)
    with pytest.raises(ValueError):
        MultiAgentSizes(global_tokens=5)
