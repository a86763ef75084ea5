"""Issue 3 end to end on the real model (float32), through a real uvicorn server
and the real `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai import OpenAI

from segcache.config import CacheConfig, ServerConfig
from segcache.engine.engine import Engine
from segcache.kv.hashing import segment_digest
from tests.server_harness import running_server

pytestmark = pytest.mark.slow

A = ("Global rules for every agent in this company. Answer in plain English. Cite the file you "
     "changed. Never invent an API. Keep answers short. Tools: read_file(path), write_file(path, "
     "text), run_tests(pattern). ")
B = "You are the backend agent. You own the Python services, the SQL schema and the pytest suite. "
C = "You are the frontend agent. You own the React app, its TypeScript types and the CSS. "
D = "Current task: split auth.py into login.py and tokens.py."
E = "Current task: document the login page for new users."
MODEL = "SmolLM2-135M-Instruct"  # the one name of the default model (/v1/models, README)
USER = [{"role": "user", "content": "In one sentence, what will you do first?"}]


def seg(i: str, content: str) -> dict:
    return {"id": i, "hash": segment_digest(content), "content": content}


AGENTS = [[seg("A", A), seg("B", B), seg("D", D)], [seg("A", A), seg("C", C), seg("E", E)],
          [seg("A", A), seg("B", B), seg("E", E)]]


def fresh(real_engine, **cache) -> Engine:
    """Another engine over the same loaded weights, with an empty cache."""
    return Engine(real_engine.runtime, real_engine.tokenizer, CacheConfig(**cache),
                  real_engine.model_name)


def ask(client: OpenAI, segments, messages=USER, max_tokens=12):
    return client.chat.completions.create(model=MODEL, messages=messages,
                                          max_tokens=max_tokens, temperature=0,
                                          extra_body={"segments": segments})


def usage_segments(resp) -> list[dict]:
    """The explicit segments' usage entries (message units are reported too)."""
    return [s for s in resp.usage.model_extra["segcache"]["segments"] if s["kind"] == "segment"]


@pytest.fixture
def server(real_engine):
    engine = fresh(real_engine)
    with running_server(engine) as url:
        yield engine, OpenAI(base_url=url + "/v1", api_key="local", max_retries=0), url


def test_seed_scenario_exact_cached_tokens_and_cold_equality(server, real_engine):
    engine, client, _ = server
    r1, r2, r3 = (ask(client, s) for s in AGENTS)
    tok = {s["id"]: s["tokens"] for r in (r1, r2) for s in usage_segments(r)}
    assert r1.usage.model_extra["cached_prefix_tokens"] == 0
    assert r2.usage.model_extra["cached_prefix_tokens"] == tok["A"]
    assert r3.usage.model_extra["cached_prefix_tokens"] == tok["A"] + tok["B"]
    assert r3.usage.prompt_tokens_details.cached_tokens == tok["A"] + tok["B"]
    assert [s["status"] for s in usage_segments(r3)] == ["hit", "hit", "miss"]
    for segments, first in zip(AGENTS, (r1, r2, r3), strict=True):
        again = ask(client, segments)
        assert [s["status"] for s in usage_segments(again)] == ["hit"] * 3
        assert again.choices[0].message.content == first.choices[0].message.content
        # cached == cold: a server with an empty cache answers the same
        with running_server(fresh(real_engine)) as cold_url:
            cold = ask(OpenAI(base_url=cold_url + "/v1", api_key="x", max_retries=0), segments)
        assert cold.choices[0].message.content == first.choices[0].message.content
    engine.tree.check_integrity()


def test_streaming_reports_usage_and_same_text(server):
    _, client, _ = server
    full = ask(client, AGENTS[0])
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"segments": AGENTS[0]}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - usage.model_extra[
        "segcache"]["computed_tokens"] > 0


def test_tenant_isolation(real_engine, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": {"sk-tenant-one": "one", "sk-tenant-two": "two"}}))
    with running_server(fresh(real_engine), ServerConfig(api_keys_file=keys)) as url:
        one = OpenAI(base_url=url + "/v1", api_key="sk-tenant-one", max_retries=0)
        two = OpenAI(base_url=url + "/v1", api_key="sk-tenant-two", max_retries=0)
        ask(one, AGENTS[0])
        assert ask(two, AGENTS[0]).usage.prompt_tokens_details.cached_tokens == 0
        assert ask(one, AGENTS[0]).usage.prompt_tokens_details.cached_tokens > 0
        with pytest.raises(openai.ConflictError):  # hash-only reference to another tenant's segment
            ask(two, [{"id": "A", "hash": segment_digest(A + "x")}])


def test_eviction_under_tiny_budget_keeps_outputs(real_engine):
    engine = fresh(real_engine, cache_bytes=3 * 1024 * 1024)
    cold = fresh(real_engine)
    with running_server(engine) as url:
        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for segments in AGENTS * 2:
            got = ask(client, segments, max_tokens=6)
            assert engine.tree.resident_bytes <= 3 * 1024 * 1024
            cold.purge("local")
            from segcache.engine.types import ChatRequest, SamplingParams, SegmentInput

            ref = cold.chat(ChatRequest("local", USER, [SegmentInput(id=s["id"], content=s["content"])
                                                        for s in segments],
                                        SamplingParams(max_tokens=6, temperature=0)))
            assert got.choices[0].message.content == ref.text
        stats = httpx.get(url + "/v1/cache").json()
        assert stats["evictions"] > 0 and stats["pinned"] == 0
    engine.tree.check_integrity()


def test_warm_registry_and_cache_routes(server):
    engine, client, url = server
    w = httpx.post(url + "/v1/cache/warm", json={"segments": AGENTS[0]}).json()
    assert w["cached_segments"] == 3 and w["root_hash"].startswith("sha256:")
    r = ask(client, AGENTS[0])
    assert [s["status"] for s in usage_segments(r)] == ["hit"] * 3
    assert r.usage.model_extra["segcache"]["prefix_chain"] == w["root_hash"]

    put = httpx.put(url + "/v1/segments/global-rules", json={"content": A, "ttl": 600})
    assert put.status_code == 200 and put.json()["hash"] == segment_digest(A)
    by_name = [{"id": "A", "name": "global-rules"}, seg("B", B), seg("D", D)]
    assert [s["status"] for s in usage_segments(ask(client, by_name))] == ["hit"] * 3
    assert httpx.delete(url + "/v1/segments/global-rules").status_code in (200, 204)
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, by_name)
    assert "global-rules" in e.value.message
    assert httpx.get(url + "/v1/cache").json()["nodes"] >= 3
    assert httpx.delete(url + "/v1/cache").json()["purged_nodes"] >= 3
    assert httpx.get(url + "/v1/cache").json()["nodes"] == 0


def test_bad_input_is_4xx_and_cache_unchanged(server):
    engine, client, url = server
    ask(client, AGENTS[0])
    before = httpx.get(url + "/v1/cache").json()
    chat = url + "/v1/chat/completions"
    cases = [
        ({"messages": USER, "segments": [{"id": "A", "content": A, "hash": segment_digest(B)}]}, 400, "'A'"),
        ({"messages": USER, "segments": [{"id": "Z", "hash": segment_digest("never")}]}, 409, "'Z'"),
        ({"messages": USER, "segments": [seg(str(i), f"s{i}") for i in range(65)]}, 400, "segments"),
        ({"messages": [{"role": "user", "content": "hi " * 9000}], "max_tokens": 10}, 400, "context window"),
        ({"messages": "not a list"}, 400, "messages"),
        ({"messages": USER, "max_tokens": "many"}, 400, "max_tokens"),
    ]
    for body, status, needle in cases:
        r = httpx.post(chat, json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        assert needle in r.json()["error"]["message"], r.text
    bad_json = httpx.post(chat, content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    after = httpx.get(url + "/v1/cache").json()
    assert {k: after[k] for k in ("nodes", "bytes", "pinned")} == {k: before[k] for k in ("nodes", "bytes", "pinned")}
    engine.tree.check_integrity()


TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file of the repository",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]


def test_agent_loop_reuses_previous_turn(server, real_engine):
    """Issue 5: a 6-turn loop of plain OpenAI requests (no segments): from turn 2 on,
    cached tokens >= 95% of the previous turn's prompt + reply; outputs equal a cold
    server's."""
    _, client, _ = server
    messages = [{"role": "system", "content": "You are a repository agent. " + A},
                {"role": "user", "content": "Find where the login handler is defined."}]
    previous = None
    cold_engine = fresh(real_engine)
    with running_server(cold_engine) as cold_url:
        cold_client = OpenAI(base_url=cold_url + "/v1", api_key="x", max_retries=0)
        for turn in range(6):
            r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                               temperature=0, tools=TOOLS)
            if previous is not None:
                reused = previous.usage.prompt_tokens + previous.usage.completion_tokens
                assert r.usage.prompt_tokens_details.cached_tokens >= 0.95 * reused, turn
            cold_engine.purge("local")
            cold = cold_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                       temperature=0, tools=TOOLS)
            assert cold.usage.prompt_tokens_details.cached_tokens == 0
            assert cold.choices[0].message.content == r.choices[0].message.content, turn
            previous = r
            messages = messages + [
                {"role": "assistant", "content": r.choices[0].message.content},
                {"role": "tool", "content": f"auth/login_{turn}.py: def handle_login(request): ..."},
            ]


def test_plain_agents_reuse_the_shared_head_of_their_system_message(server, real_engine):
    """Issue 16: three agents, one system message each = shared head + own part +
    task, no ``segments``: later agents reuse the head (a partial hit, whole prefill
    chunks of it), their answers equal a cold server's, and the partially reused
    unit's KV is the same bits as a cold prefill's."""
    import torch

    engine, client, _ = server
    head = A * 12  # ~600 tokens: two whole 256-token chunks in common
    systems = [head + B + D, head + C + E, head + B + E]
    cold_engine = fresh(real_engine)
    with running_server(cold_engine) as cold_url:
        cold_client = OpenAI(base_url=cold_url + "/v1", api_key="x", max_retries=0)
        for i, system in enumerate(systems):
            messages = [{"role": "system", "content": system}] + USER
            r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                               temperature=0)
            units = r.usage.model_extra["segcache"]["segments"]
            cached = r.usage.prompt_tokens_details.cached_tokens
            if i == 0:
                assert cached == 0
            else:
                assert units[0]["status"] == "partial"
                assert units[0]["reused"] >= 512 and units[0]["reused"] % 256 == 0
                assert cached == units[0]["reused"] if i == 1 else cached >= units[0]["reused"]
            cold_engine.purge("local")
            cold = cold_client.chat.completions.create(model=MODEL, messages=messages,
                                                       max_tokens=10, temperature=0)
            assert cold.choices[0].message.content == r.choices[0].message.content, i
            ns, digest = engine.namespace("local"), units[0]["hash"]
            warm_kv = engine.tree.peek(ns, [digest])[0].handle
            cold_kv = cold_engine.tree.peek(cold_engine.namespace("local"), [digest])[0].handle
            assert torch.equal(warm_kv, cold_kv), i
    engine.tree.check_integrity()
