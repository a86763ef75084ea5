"""Every refusal is OpenAI's error shape, with the right status and a message
that names the problem."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai import OpenAI

from segcache.config import CacheConfig, ServerConfig
from segcache.engine.types import EngineError
from segcache.kv.hashing import segment_digest
from tests.fakes import FakeEngine
from tests.server_harness import running_server

USER = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def engine():
    return FakeEngine(context_window=100)


@pytest.fixture(scope="module")
def base_url(engine):
    cfg = ServerConfig(max_request_bytes=4096)
    with running_server(engine, cfg, CacheConfig(max_segments=3)) as url:
        yield url


@pytest.fixture(autouse=True)
def _reset(engine):
    engine.fail_with = None
    engine.fail_after = None


def post(base_url: str, path: str, body: object = None, raw: bytes | None = None) -> httpx.Response:
    if raw is not None:
        return httpx.post(
            base_url + path, content=raw, headers={"content-type": "application/json"}
        )
    return httpx.post(base_url + path, json=body)


def assert_error(r: httpx.Response, status: int, *words: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for word in words:
        assert word in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param
    return err


BAD_CHAT = [
    ({"messages": USER, "n": 0}, "n must be between 1 and", "n"),
    ({"messages": USER, "n": 17}, "n must be between 1 and 16", "n"),
    ({"messages": USER, "max_tokens": "ten"}, "integer", "max_tokens"),
    ({"messages": USER, "temperature": "hot"}, "number", "temperature"),
    ({"messages": USER, "temperature": 3}, "temperature", "temperature"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"messages": USER, "stream": "yes"}, "boolean", "stream"),
    ({"messages": "hi"}, "list", "messages"),
    ({"messages": []}, "at least 1", "messages"),
    ({}, "Missing required field 'messages'", "messages"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "'user'", "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "string", "messages[0].content"),
    ({"messages": USER, "stop": [1]}, "stop", None),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "'stream'", "stream_options"),
    ({"messages": USER, "top_logprobs": 2}, "needs 'logprobs'", "top_logprobs"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "between 0 and 20", "top_logprobs"),
    ({"messages": USER, "logprobs": True, "top_logprobs": -1}, "between 0 and 20", "top_logprobs"),
    ({"messages": USER, "response_format": {"type": "xml"}}, "'xml'", "response_format.type"),
    ({"messages": USER, "response_format": {"type": "json_schema"}}, "json_schema",
     "response_format.json_schema"),
    ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "name", "response_format.json_schema.name"),
    ({"messages": USER, "response_format": {"type": "json_schema",
                                            "json_schema": {"name": "a", "schema": [1]}}},
     "JSON Schema object", "response_format.json_schema.schema"),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        "image content is not supported",
        "messages[0].content[0]",
    ),
    ({"messages": USER, "segments": [{"id": "a"}] * 4}, "too many segments: 4", "segments"),
    ({"messages": USER, "segments": [{"id": "a"}]}, "segments[0] needs 'content'", "segments[0]"),
    ({"messages": USER, "segments": [{"id": "a", "content": 3}]}, "string", "segments[0].content"),
    (
        {"messages": USER, "segments": [{"content": "x", "ttl": -1}]},
        "greater than 0",
        "segments[0].ttl",
    ),
]


@pytest.mark.parametrize(("body", "words", "param"), BAD_CHAT)
def test_bad_chat_bodies(base_url, engine, body, words, param):
    calls = len(engine.calls)
    assert_error(post(base_url, CHAT, body), 400, words, param=param)
    assert len(engine.calls) == calls  # refused before reaching the engine


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{bad", "not valid JSON"),
        (b'{"messages": [}', "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"", "body is required"),
    ],
)
def test_malformed_bodies(base_url, raw, words):
    assert_error(post(base_url, CHAT, raw=raw), 400, words)


def test_json_without_content_type(base_url):
    r = httpx.post(base_url + CHAT, content=json.dumps({"messages": USER}).encode())
    assert_error(r, 400, "Content-Type: application/json")


def test_body_too_large(base_url):
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert_error(post(base_url, CHAT, big), 413, "too large", "4096")

    def chunks():  # no Content-Length: counted while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    r = httpx.post(base_url + CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "too large")


def test_engine_errors_map_to_status(base_url):
    content = "global rules"
    wrong = {"id": "rules", "hash": segment_digest("other"), "content": content}
    err = assert_error(
        post(base_url, CHAT, {"messages": USER, "segments": [wrong]}), 400, "'rules'"
    )
    assert "does not match" in err["message"]

    unknown = {"id": "ghost", "hash": segment_digest("never sent")}
    err = assert_error(
        post(base_url, CHAT, {"messages": USER, "segments": [unknown]}), 409, "'ghost'"
    )
    assert err["code"] == "segment_not_cached"

    by_name = {"id": "x", "name": "nobody"}
    assert_error(post(base_url, CHAT, {"messages": USER, "segments": [by_name]}), 404, "'nobody'")

    err = assert_error(post(base_url, CHAT, {"messages": USER, "max_tokens": 200}), 400, "context")
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"


def test_engine_error_in_stream_before_first_byte_keeps_status(base_url):
    unknown = {"id": "ghost", "hash": segment_digest("never sent either")}
    r = post(base_url, CHAT, {"messages": USER, "stream": True, "segments": [unknown]})
    assert_error(r, 409, "'ghost'")


def test_error_mid_stream_is_an_sse_event(base_url, engine):
    engine.fail_after = 1
    body = {"messages": USER, "stream": True, "max_tokens": 10}
    with httpx.stream("POST", base_url + CHAT, json=body) as r:
        assert r.status_code == 200
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert "[DONE]" not in events[-1]
    err = json.loads(events[-1].removeprefix("data: "))["error"]
    assert err["type"] == "server_error" and "Traceback" not in err["message"]
    assert json.loads(events[1].removeprefix("data: "))["choices"][0]["delta"] == {
        "content": "echo:"
    }


def test_unexpected_exception_is_a_generic_500(base_url, engine):
    engine.fail_with = RuntimeError("secret internal detail")
    err = assert_error(post(base_url, CHAT, {"messages": USER}), 500, "error")
    assert "secret" not in err["message"] and err["type"] == "server_error"


def test_engine_error_raised_from_engine(base_url, engine):
    engine.fail_with = EngineError("prompt must not be empty", "prompt")
    assert_error(post(base_url, "/v1/completions", {"prompt": "x"}), 400, "must not be empty")


def test_completion_prompt_shapes(base_url):
    assert_error(post(base_url, "/v1/completions", {"prompt": ["a", [1]]}), 400, param="prompt")
    assert_error(
        post(base_url, "/v1/completions", {"prompt": ["p"] * 17}), 400, "send 1 to 16",
        param="prompt",
    )
    assert_error(post(base_url, "/v1/completions", {"prompt": []}), 400, param="prompt")
    assert_error(post(base_url, "/v1/completions", {"prompt": [1.5]}), 400, param="prompt")
    assert_error(post(base_url, "/v1/completions", {"prompt": "x", "echo": True}), 400, "echo",
                 param="echo")
    assert_error(post(base_url, "/v1/completions", {"prompt": "x", "suffix": "y"}), 400,
                 "suffix is not supported", param="suffix")
    assert_error(post(base_url, "/v1/completions", {"prompt": "x", "logprobs": 6}), 400,
                 "0 to 5", param="logprobs")
    assert_error(post(base_url, "/v1/completions", {}), 400, "Missing required field 'prompt'")


def test_unknown_route_and_method(base_url):
    assert_error(httpx.get(base_url + "/v1/nothing"), 404, "/v1/nothing")
    assert_error(httpx.delete(base_url + "/health"), 405, "DELETE")


def test_openai_client_sees_messages(base_url):
    client = OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="fake-model", messages=USER, n=0)
    assert "n must be between 1 and 16" in exc.value.message
    with pytest.raises(openai.ConflictError):
        client.chat.completions.create(
            model="fake-model",
            messages=USER,
            extra_body={"segments": [{"id": "g", "hash": segment_digest("?")}]},
        )
