"""Hypothesis request bodies through the ASGI app: text with lone surrogates,
extreme numbers, wrong nesting, in every field of every body. Never a 5xx, and
after every refused request the cache, the registry and the memo are as before.

``SEGCACHE_LONG_TESTS=1`` tries ten times as many bodies."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from segcache.config import CacheConfig, ServerConfig, read_environment
from segcache.server import create_app
from tests.tiny import TINY

LONG = read_environment().long_tests  # SEGCACHE_LONG_TESTS=1
BODIES = 3000 if LONG else 300
SHORT = dataclasses.replace(TINY, max_position=128)  # short generations, whatever max_tokens

TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)  # surrogates too
NUMBER = st.one_of(st.integers(), st.integers(min_value=-(2**80), max_value=2**80),
                   st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from([0, -1, 1, 2**63, 2**64, 1e-300, 5e-324, 1e308, -0.0]))
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
JSONISH = st.recursive(SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)

VALID = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                             "segments": [{"id": "s", "content": "rules"}],
                             "tools": [{"type": "function", "function": {"name": "f"}}]},
    "/v1/completions": {"prompt": "Once", "max_tokens": 2},
    "/v1/cache/warm": {"segments": [{"id": "s", "content": "rules"}]},
    "/v1/segments/doc": {"content": "text", "ttl": 60},
}
FIELDS = ["model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "stream_options", "n", "messages", "segments", "tools", "tool_choice", "logprobs",
          "max_completion_tokens", "prompt", "echo", "best_of", "content", "ttl"]


@st.composite
def bodies(draw):
    path = draw(st.sampled_from(sorted(VALID)))
    body = json.loads(json.dumps(VALID[path]))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "message", "segment", "tool_call"]))
        value = draw(JSONISH)
        if where == "top":
            body[draw(st.sampled_from(FIELDS))] = value
        elif where == "message" and "messages" in body:
            key = draw(st.sampled_from(["role", "content", "name", "tool_calls", "tool_call_id"]))
            body["messages"] = [{"role": "user", "content": "hi", key: value}]
        elif where == "segment" and "segments" in body:
            key = draw(st.sampled_from(["id", "content", "hash", "name", "ttl", "reuse"]))
            body["segments"] = [{"id": "s", "content": "rules", key: value}]
        elif "messages" in body:
            body["messages"] = [{"role": "assistant", "tool_calls": [
                {"id": "1", "type": "function", "function": value}]},
                {"role": "user", "content": "go"}]
    return path, body


TRIED = [0, 0]  # accepted, refused


@pytest.fixture(scope="module")
def app_and_engine(tokenizer):
    from segcache.engine.engine import Engine
    from tests.tiny import tiny_runtime

    cache = CacheConfig(cache_bytes=4 << 20)
    engine = Engine(tiny_runtime(arch=SHORT), tokenizer, cache, "tiny")
    app = create_app(engine, ServerConfig(max_request_bytes=1 << 20), cache)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, engine
    engine.close(drain=False)
    print(f"\nbody fuzz: {sum(TRIED)} bodies, {TRIED[1]} refused (4xx), {TRIED[0]} served, 0 5xx")


def state(engine) -> tuple:
    stats = engine.cache_stats("local")
    return (stats["nodes"], stats["bytes"], stats["radix"]["nodes"],
            stats["standalone"]["entries"], tuple(stats["registered_segments"]),
            engine.memo.tenant_bytes(engine.namespace("local")))


@seed(20261201)
@settings(max_examples=BODIES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(case=bodies())
def test_no_body_gets_a_server_error_and_refusals_change_nothing(app_and_engine, case):
    client, engine = app_and_engine
    path, body = case
    raw = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as \\udXXX
    before = state(engine)
    method = "PUT" if path.startswith("/v1/segments/") else "POST"
    r = client.request(method, path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text, raw[:300])
    TRIED[r.status_code >= 400] += 1
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and set(err) == {"message", "type", "param", "code"}
        assert state(engine) == before, (r.text, raw[:300])
