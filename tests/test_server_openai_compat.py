"""OpenAI's rules beyond types, over plain HTTP: each refusal names the field
(``param``) and says what to fix; model names, /v1/models/{id},
system_fingerprint, CORS and message roles."""

from __future__ import annotations

import json

import httpx
import pytest

from segcache.config import ServerConfig
from tests.fakes import FakeEngine
from tests.server_harness import running_server

USER = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def engine():
    return FakeEngine()


@pytest.fixture(scope="module")
def base_url(engine):
    with running_server(engine, ServerConfig(model_aliases=("alias-a", "alias-b"))) as url:
        yield url


def refused(r: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    for word in words:
        assert word in err["message"], err["message"]
    return err


BAD = [
    ({"tools": []}, "tools", ["at least 1"]),
    ({"tool_choice": "auto"}, "tool_choice", ["only allowed when 'tools'"]),
    ({"tool_choice": "required"}, "tool_choice", ["only allowed when 'tools'"]),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice", ["'sometimes'", "'required'"]),
    ({"tools": [TOOL], "tool_choice": {}}, "tool_choice.type", ["type"]),
    ({"tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice.function.name",
     ["function.name"]),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", ["'nope'", "get_weather"]),
    ({"logit_bias": {"abc": 1}}, "logit_bias", ["'abc'", "token ids"]),
    ({"logit_bias": {"1.5": 1}}, "logit_bias", ["'1.5'"]),
    ({"logit_bias": {"-3": 1}}, "logit_bias", ["'-3'"]),
    ({"logit_bias": {"12": "up"}}, "logit_bias", ["'up'", "numbers"]),
    ({"logit_bias": {"12": True}}, "logit_bias", ["True"]),
    ({"logit_bias": {"12": 101}}, "logit_bias", ["101", "-100 to 100"]),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "call_1", "type": "function",
                        "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[1].tool_calls[0].function.arguments", ["not valid JSON"]),
    ({"messages": [{"role": "narrator", "content": "x"}]}, "messages[0].role", ["'developer'"]),
]


@pytest.mark.parametrize(("extra", "param", "words"), BAD)
def test_openai_rules(base_url, engine, extra, param, words):
    calls = len(engine.calls)
    r = httpx.post(base_url + CHAT, json={"messages": USER, **extra})
    refused(r, 400, param, *words)
    assert len(engine.calls) == calls  # refused before the engine


def test_valid_tool_choices_pass(base_url, engine):
    for choice in ("none", "auto", {"type": "function", "function": {"name": "get_weather"}}):
        r = httpx.post(base_url + CHAT, json={"messages": USER, "tools": [TOOL],
                                              "tool_choice": choice})
        assert r.status_code == 200, r.text
    assert engine.last_chat.tool_choice == {"type": "function",
                                            "function": {"name": "get_weather"}}


def test_logit_bias_reaches_the_engine(base_url, engine):
    r = httpx.post(base_url + CHAT, json={"messages": USER, "logit_bias": {"7": -100, "3": 2.5}})
    assert r.status_code == 200, r.text
    assert engine.last_chat.sampling.logit_bias == ((3, 2.5), (7, -100.0))


def test_unknown_model_is_404_and_aliases_are_served(base_url):
    err = refused(httpx.post(base_url + CHAT, json={"model": "gpt-4o", "messages": USER}), 404,
                  "model", "The model `gpt-4o` does not exist")
    assert err["code"] == "model_not_found"
    refused(httpx.post(base_url + "/v1/completions", json={"model": "gpt-4o", "prompt": "x"}),
            404, "model", "`gpt-4o`")
    for name in ("fake-model", "alias-a", "alias-b", None):
        body = {"messages": USER} if name is None else {"model": name, "messages": USER}
        r = httpx.post(base_url + CHAT, json=body)
        assert r.status_code == 200 and r.json()["model"] == "fake-model", r.text


def test_models_list_and_retrieve(base_url):
    listed = httpx.get(base_url + "/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["fake-model", "alias-a", "alias-b"]
    one = httpx.get(base_url + "/v1/models/alias-a")
    assert one.status_code == 200 and one.json()["id"] == "alias-a"
    assert one.json()["object"] == "model"
    refused(httpx.get(base_url + "/v1/models/nope"), 404, "model", "`nope` does not exist")


def test_system_fingerprint_on_every_response(base_url):
    fps = set()
    for path, body in ((CHAT, {"messages": USER}), ("/v1/completions", {"prompt": "a b"})):
        fps.add(httpx.post(base_url + path, json=body).json()["system_fingerprint"])
        with httpx.stream("POST", base_url + path, json={**body, "stream": True,
                          "stream_options": {"include_usage": True}}) as r:
            events = [e.removeprefix("data: ") for e in r.read().decode().split("\n\n") if e]
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        assert len(chunks) >= 3
        fps.update(c["system_fingerprint"] for c in chunks)
    assert len(fps) == 1
    fp = fps.pop()
    assert fp.startswith("fp_") and len(fp) == 15


def test_system_fingerprint_follows_the_model_fingerprint():
    other = FakeEngine()
    other.fingerprint = "another-model-v2"
    prints = []
    for engine in (FakeEngine(), other):
        with running_server(engine) as url:
            prints.append(httpx.post(url + CHAT, json={"messages": USER}).json()["system_fingerprint"])
    assert prints[0] != prints[1]


def test_roles_as_openai(base_url, engine):
    msgs = [{"role": "developer", "content": "be brief"},
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
            {"role": "function", "name": "f", "content": "42"},
            {"role": "user", "content": "y"}]
    r = httpx.post(base_url + CHAT, json={"messages": msgs})
    assert r.status_code == 200, r.text
    assert [m["role"] for m in engine.last_chat.messages] == [
        "system", "user", "assistant", "tool", "user"]


def test_cors_off_by_default_and_on_behind_the_flag(base_url):
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(base_url + CHAT, headers=pre)
    assert "access-control-allow-origin" not in r.headers
    cfg = ServerConfig(cors_origins=("http://app.example",))
    with running_server(FakeEngine(), cfg) as url:
        r = httpx.options(url + CHAT, headers=pre)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.post(url + CHAT, json={"messages": USER}, headers={"Origin": "http://app.example"})
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.options(url + CHAT, headers={**pre, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_logit_bias_checked_against_the_vocabulary_and_applied(tiny_engine_factory):
    engine = tiny_engine_factory()
    vocab = engine.runtime.arch.vocab_size
    with running_server(engine) as url:
        r = httpx.post(url + CHAT, json={"messages": USER, "logit_bias": {str(vocab): 1}})
        refused(r, 400, "logit_bias", str(vocab), f"0..{vocab - 1}")
        body = {"messages": USER, "max_tokens": 3, "temperature": 0}
        plain = httpx.post(url + CHAT, json=body).json()
        forced = httpx.post(url + CHAT, json={**body, "logit_bias": {"314": 100}}).json()
    said = engine.tokenizer.decode([314])
    assert forced["choices"][0]["message"]["content"] == said * 3
    assert plain["choices"][0]["message"]["content"] != said * 3
