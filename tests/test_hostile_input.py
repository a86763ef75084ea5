"""The "500 from input" class: text that is not valid Unicode, numbers at the
edge of their range, nested fields of the wrong type. Each is a 400 that names
the field (or, where the value is valid, a normal answer), never a 500, and
nothing reaches the engine before the body is known to be sound."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from segcache.config import CacheConfig, ServerConfig
from segcache.engine.sampling import Sampler
from segcache.engine.types import SamplingParams
from tests.server_harness import running_server

CHAT, COMPLETIONS, WARM = "/v1/chat/completions", "/v1/completions", "/v1/cache/warm"
LONE = "\\ud800"  # a JSON escape of a lone high surrogate (valid JSON, invalid Unicode)


@pytest.fixture(scope="module")
def engine(tokenizer):
    from segcache.engine.engine import Engine
    from tests.tiny import tiny_runtime

    engine = Engine(tiny_runtime(), tokenizer, CacheConfig(), "tiny")
    yield engine
    engine.close(drain=False)


@pytest.fixture(scope="module")
def base_url(engine):
    with running_server(engine, ServerConfig(), CacheConfig()) as url:
        yield url


def send(base_url: str, method: str, path: str, raw: str) -> httpx.Response:
    return httpx.request(method, base_url + path, content=raw.encode(),
                         headers={"content-type": "application/json"}, timeout=60)


def msg(content: str) -> str:
    return '{"messages": [{"role": "user", "content": "@"}], "max_tokens": 2}'.replace("@", content)


def lone(body: str) -> str:
    """``body`` with its ``@`` replaced by the escape of a lone surrogate."""
    return body.replace("@", LONE)


SURROGATES = [
    ("POST", CHAT, msg("a" + LONE + "b"), "messages[0].content"),
    ("POST", CHAT, lone('{"messages": [{"role": "user", "content": [{"type": "text", '
                        '"text": "x@"}]}]}'), "messages[0].content[0].text"),
    ("POST", CHAT, lone('{"messages": [{"role": "user", "content": "a", "name": "@"}]}'),
     "messages[0].name"),
    ("POST", CHAT, '{"messages": [{"role": "user", "content": "a"}], "segments": '
     '[{"id": "s", "content": "x\\udc00"}]}', "segments[0].content"),
    ("POST", CHAT, lone('{"messages": [{"role": "user", "content": "a"}], "tools": [{"type": '
                        '"function", "function": {"name": "f@"}}]}'), "tools[0].function.name"),
    ("POST", CHAT, lone('{"messages": [{"role": "user", "content": "a"}], "stop": "@"}'), "stop"),
    ("POST", COMPLETIONS, lone('{"prompt": "a@", "max_tokens": 2}'), "prompt"),
    ("POST", COMPLETIONS, lone('{"prompt": ["a@"], "max_tokens": 2}'), "prompt[0]"),
    ("POST", WARM, lone('{"segments": [{"id": "s", "content": "x@"}]}'), "segments[0].content"),
    ("PUT", "/v1/segments/doc", lone('{"content": "a@"}'), "content"),
]


@pytest.mark.parametrize(("method", "path", "raw", "param"), SURROGATES)
def test_lone_surrogates_are_400_naming_the_field(base_url, engine, method, path, raw, param):
    before = engine.cache_stats("local")
    r = send(base_url, method, path, raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert "surrogate" in err["message"] and param in err["message"]
    assert engine.cache_stats("local") == before  # refused before any work


def test_a_surrogate_pair_is_valid_text(base_url):
    r = send(base_url, "POST", CHAT, msg("smile \\ud83d\\ude00"))
    assert r.status_code == 200, r.text


def test_too_deep_nesting_is_400(base_url):
    deep = "[" * 70 + "]" * 70
    body = ('{"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function", '
            '"function": {"name": "f", "parameters": {"x": @}}}]}').replace("@", deep)
    r = send(base_url, "POST", CHAT, body)
    assert r.status_code == 400, r.text
    assert "nested" in r.json()["error"]["message"]


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_seed_outside_64_bits_is_400_before_any_work(base_url, engine, seed):
    steps = engine.scheduler.steps
    r = send(base_url, "POST", CHAT, json.dumps(
        {"messages": [{"role": "user", "content": "x " * 500}], "seed": seed, "max_tokens": 2}))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "seed"
    assert engine.scheduler.steps == steps
    r = send(base_url, "POST", COMPLETIONS, json.dumps({"prompt": "a", "seed": seed}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_seed_at_the_64_bit_edges_is_served(base_url, seed):
    r = send(base_url, "POST", COMPLETIONS, json.dumps({"prompt": "a", "seed": seed,
                                                        "temperature": 1, "max_tokens": 2}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-8])
def test_tiny_positive_temperature_samples_the_best_token(base_url, temperature):
    greedy = send(base_url, "POST", COMPLETIONS,
                  json.dumps({"prompt": "Once upon", "temperature": 0, "max_tokens": 4}))
    r = send(base_url, "POST", COMPLETIONS,
             json.dumps({"prompt": "Once upon", "temperature": temperature, "max_tokens": 4}))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_sampler_never_overflows():
    logits = torch.tensor([3.0, 1.0, 3.0 - 1e-6, -50.0])
    for t in (1e-300, 5e-324, 1e-40, 1e-4):
        picks = {Sampler(SamplingParams(temperature=t, seed=s)).sample(logits) for s in range(20)}
        assert picks <= {0, 2}, (t, picks)


WRONG_NESTING = [
    ({"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": "f()"}]},
     "messages[0].tool_calls[0].function"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": 5, "arguments": "{}"}}]},
     "messages[0].tool_calls[0].function.name"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": ["f"]}, "messages[0].tool_calls[0]"),
    ({"role": "assistant", "tool_calls": {"function": {}}}, "messages[0].tool_calls"),
]


@pytest.mark.parametrize(("message", "param"), WRONG_NESTING)
def test_nested_fields_of_the_wrong_type_are_400(base_url, message, param):
    body = {"messages": [message, {"role": "user", "content": "go"}], "max_tokens": 2}
    r = send(base_url, "POST", CHAT, json.dumps(body))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tool_call_arguments_nested_past_the_json_limit_are_served(base_url):
    """Arguments are a JSON string the server canonicalises; one too deep to parse
    is kept as sent, not a RecursionError."""
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "[" * 1500}}
    body = {"messages": [{"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "user", "content": "go"}], "max_tokens": 2}
    with pytest.raises(RecursionError):
        json.loads(call["function"]["arguments"])
    r = send(base_url, "POST", CHAT, json.dumps(body))
    assert r.status_code == 200, r.text


def test_a_lone_surrogate_in_a_key_is_400_with_an_encodable_param(base_url):
    r = send(base_url, "POST", WARM, lone('{"segments": [{"id": "s", "content": "x"}], '
                                          '"model": {"@": null}}'))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "model.\\ud800"
