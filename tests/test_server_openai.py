"""OpenAI-compatible routes through a real uvicorn server and the real openai client."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI

from segcache.config import ServerConfig
from segcache.kv.hashing import segment_digest
from tests.fakes import FakeEngine
from tests.server_harness import running_server

USER = [{"role": "user", "content": "hello there world"}]


@pytest.fixture
def engine():
    return FakeEngine()


def seg(seg_id: str, content: str) -> dict:
    return {"id": seg_id, "hash": segment_digest(content), "content": content}


def test_chat_non_streaming_shape(client):
    r = client.chat.completions.create(model="fake-model", messages=USER)
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == "fake-model"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "echo: hello there world"
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens == u.prompt_tokens + 4
    assert u.prompt_tokens_details.cached_tokens == 0
    extra = u.model_extra
    assert extra["cached_prefix_tokens"] == 0
    assert extra["segcache"]["chain"].startswith("sha256:")


def test_seed_scenario_cached_prefix_tokens(client):
    """Agents A+B+D, A+C+E, A+B+E: 0, tokens(A), tokens(A+B) cached; repeats hit fully."""
    A, B, C, D, E = (seg(k, f"{k} " * n) for k, n in zip("ABCDE", (50, 20, 21, 7, 8), strict=True))
    plans = [([A, B, D], 0), ([A, C, E], 50), ([A, B, E], 70)]
    for segments, expected in plans:
        r = client.chat.completions.create(
            model="fake-model", messages=USER, extra_body={"segments": segments}
        )
        assert r.usage.model_extra["cached_prefix_tokens"] == expected
        assert r.usage.prompt_tokens_details.cached_tokens == expected
    for segments, _ in plans:
        r = client.chat.completions.create(
            model="fake-model", messages=USER, extra_body={"segments": segments}
        )
        statuses = [s["status"] for s in r.usage.model_extra["segcache"]["segments"]]
        assert statuses == ["hit", "hit", "hit"]


def test_chat_streaming_shape_with_usage(client):
    stream = client.chat.completions.create(
        model="fake-model",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"segments": [seg("a", "alpha beta")]},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello there world"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert last.usage.model_extra["segcache"]["segments"][0]["status"] == "miss"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_nulls_mean_defaults(base_url):
    body = {"messages": USER, "n": None, "stream": None, "max_tokens": None, "stop": None}
    r = httpx.post(base_url + "/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"


def test_stream_wire_format(base_url):
    body = {"messages": USER, "stream": True}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all("usage" not in p for p in payloads)  # include_usage not requested
    assert payloads[-1]["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"
    }  # fmt: skip


def test_completions(client):
    r = client.completions.create(model="fake-model", prompt="once upon", max_tokens=5)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == "then once upon"
    assert r.usage.prompt_tokens == 2 and r.usage.completion_tokens == 3

    r = client.completions.create(model="fake-model", prompt=["a b c d"], max_tokens=2)
    assert r.choices[0].text == "then a" and r.choices[0].finish_reason == "length"


def test_completions_streaming(client):
    chunks = list(
        client.completions.create(
            model="fake-model", prompt="x y", stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "then x y"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 5


def test_request_translation(client, engine):
    client.chat.completions.create(
        model="fake-model",
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}],
            },
        ],
        max_tokens=10,
        max_completion_tokens=7,
        stop="zzz",
        seed=3,
        top_p=0.5,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        tool_choice="auto",
        extra_body={"top_k": 5, "segments": [{"id": "s", "content": "sss", "ttl": 30}]},
    )
    req = engine.last_chat
    assert req.tenant == "local"
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a b"},
    ]
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (
        7, 1.0, 0.5, 5, 3, ("zzz",)
    )  # fmt: skip
    assert req.segments[0].ttl_s == 30 and req.segments[0].content == "sss"


def test_stop_and_length(client):
    r = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=2)
    assert r.choices[0].message.content == "echo: hello"
    assert r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model="fake-model", messages=USER, stop=["there"])
    assert r.choices[0].message.content == "echo: hello"


def test_models_and_health(client, base_url):
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert models.data[0].model_extra["execution_plan"] == "fake: no model"
    assert httpx.get(base_url + "/health").json() == {"status": "ok", "plan": "fake: no model"}


def test_served_model_name_override():
    with running_server(FakeEngine(), ServerConfig(model_name="team-model")) as url:
        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert client.models.list().data[0].id == "team-model"
        assert client.chat.completions.create(model="team-model", messages=USER).model == "team-model"
