"""Structured outputs and enforced tool calls (constrained decoding with llguidance):
the tiny random model exercises the grammar (its choices are arbitrary, so only
the mask makes them valid); the real model answers through the openai client."""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI

from segcache.config import CacheConfig, read_environment
from segcache.engine.types import ChatRequest, SamplingParams
from tests.server_harness import running_server

CHAT = "/v1/chat/completions"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"],
        "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
        "additionalProperties": False}}}
USER = [{"role": "user", "content": "Describe a person."}]


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


@pytest.fixture
def tiny(tiny_engine_factory):
    engine = tiny_engine_factory()
    with running_server(engine) as url:
        yield engine, url


def chat(url: str, **body) -> dict:
    r = httpx.post(url + CHAT, json={"messages": USER, "max_tokens": 120, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stream_chunks(url: str, **body) -> list[dict]:
    body = {"messages": USER, "max_tokens": 120, **body, "stream": True}
    with httpx.stream("POST", url + CHAT, json=body, timeout=120) as r:
        assert r.status_code == 200
        events = [e.removeprefix("data: ") for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]



def chat_together(engine, jobs) -> list:
    """The results of ``jobs`` sent to ``engine`` at once (one thread each, released
    together), in order: they decode in shared steps."""
    results: dict[int, object] = {}
    start = threading.Barrier(len(jobs))

    def run(i):
        start.wait()
        results[i] = engine.chat(jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(jobs))]

def test_json_schema_answers_validate(tiny):
    _, url = tiny
    for temperature, seed in ((0, None), (1.0, 1), (1.0, 2)):
        r = chat(url, response_format=schema_format(PERSON), temperature=temperature, seed=seed)
        choice = r["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    obj = chat(url, response_format={"type": "json_object"}, temperature=0.7, seed=3)
    assert isinstance(json.loads(obj["choices"][0]["message"]["content"]), dict)


def test_streamed_json_schema_and_n_choices(tiny):
    _, url = tiny
    chunks = stream_chunks(url, response_format=schema_format(PERSON), temperature=1.0, seed=5)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    jsonschema.validate(json.loads(text), PERSON)
    r = chat(url, response_format=schema_format(PERSON), temperature=1.0, seed=9, n=3)
    for choice in r["choices"]:  # each choice has its own grammar state
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


def test_constrained_and_plain_requests_share_the_cache(tiny_engine_factory):
    """The mask only picks tokens: a constrained request hits the segments a plain
    one cached, and both answer exactly as on a cold cache (greedy)."""
    warm = tiny_engine_factory()
    messages = [{"role": "system", "content": "You are a JSON service. " * 20},
                {"role": "user", "content": "A person, please."}]

    def ask(engine, fmt):
        req = ChatRequest("t", messages, sampling=SamplingParams(max_tokens=60, temperature=0),
                          response_format=fmt)
        return engine.chat(req)

    fmt = schema_format(PERSON)
    plain = ask(warm, None)
    constrained = ask(warm, fmt)
    assert constrained.cached_tokens >= constrained.prompt_tokens - 8  # the messages hit
    plain_again = ask(warm, None)
    for fmt_used, result in ((None, plain), (fmt, constrained), (None, plain_again)):
        cold = ask(tiny_engine_factory(), fmt_used)
        assert result.token_ids == cold.token_ids
    jsonschema.validate(json.loads(constrained.text), PERSON)
    warm.tree.check_integrity()


def test_masks_are_per_request_inside_one_batched_decode(tiny_engine_factory):
    """A constrained and a plain request decoding in the same steps: each gets its
    own mask (or none) and answers as it does alone."""

    engine = tiny_engine_factory()

    def req(fmt, text):
        return ChatRequest("t", [{"role": "user", "content": text}], response_format=fmt,
                           sampling=SamplingParams(max_tokens=40, temperature=0))

    jobs = [req(schema_format(PERSON), "json please"), req(None, "plain please"),
            req({"type": "json_object"}, "an object")]
    alone = [tiny_engine_factory().chat(r).token_ids for r in jobs]
    steps = engine.scheduler.steps
    results = chat_together(engine, jobs)
    assert [results[i].token_ids for i in range(len(jobs))] == alone
    decoded = sum(results[i].completion_tokens for i in range(len(jobs)))
    assert engine.scheduler.steps - steps < decoded  # some steps decoded several requests
    jsonschema.validate(json.loads(results[0].text), PERSON)


def test_invalid_schema_is_a_400_naming_the_field(tiny):
    engine, url = tiny
    bad = schema_format({"$ref": "#/$defs/missing"})
    r = httpx.post(url + CHAT, json={"messages": USER, "response_format": bad})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and "cannot be enforced" in err["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}
    r = httpx.post(url + CHAT, json={"messages": USER, "tools": [tool], "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    assert engine.scheduler.load() == {"running": 0, "waiting": 0}


def _check_calls(calls: list[dict], tools: list[dict]) -> None:
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), by_name[call["function"]["name"]])


def test_forced_tool_calls(tiny):
    engine, url = tiny
    tools = [WEATHER, CLOCK]
    named = {"type": "function", "function": {"name": "get_time"}}
    # The tiny model favours "\n" so much that with parallel calls allowed it would
    # start call after call; biased against it, it ends where the grammar allows.
    newline = {str(engine.tokenizer.encode("\n")[0]): -100}
    for choice, parallel in (("required", True), ("required", False), (named, True)):
        for seed in (1, 2):
            r = chat(url, tools=tools, tool_choice=choice, parallel_tool_calls=parallel,
                     temperature=1.0, seed=seed, max_tokens=200, logit_bias=newline)
            c = r["choices"][0]
            assert c["finish_reason"] == "tool_calls", c
            calls = c["message"]["tool_calls"]
            _check_calls(calls, tools)
            if not parallel or choice is named:
                assert len(calls) == 1
            if choice is named:
                assert {call["function"]["name"] for call in calls} == {"get_time"}
    # streamed: the calls arrive once, in the finish chunk, with their ids
    chunks = stream_chunks(url, tools=tools, tool_choice="required", temperature=0,
                           parallel_tool_calls=False, max_tokens=200)
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "tool_calls"
    streamed = finish[0]["choices"][0]["delta"]["tool_calls"]
    assert [c["index"] for c in streamed] == [0]
    _check_calls(streamed, tools)
    assert not any(c["choices"][0]["delta"].get("content") for c in chunks if c["choices"])


def test_strict_tool_under_auto(tiny):
    """``strict`` tools with tool_choice auto: the reply is text without a call
    block, or calls whose arguments follow the schema."""
    _, url = tiny
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    for seed in range(3):
        r = chat(url, tools=[strict], temperature=1.0, seed=seed, max_tokens=80)
        message = r["choices"][0]["message"]
        if message.get("tool_calls"):
            _check_calls(message["tool_calls"], [strict])
        else:
            assert "<tool_call>" not in message["content"]


def test_call_ids_are_unique_and_the_reply_is_reused_whatever_the_id(tiny):
    """Identical forced calls get different ids; the next turn, sent back with
    either id, reuses the kept reply (the id is not in its key)."""
    _, url = tiny
    body = {"tools": [CLOCK], "tool_choice": "required", "temperature": 0, "max_tokens": 100,
            "parallel_tool_calls": False}
    first, second = chat(url, **body), chat(url, **body)
    call_a = first["choices"][0]["message"]["tool_calls"][0]
    call_b = second["choices"][0]["message"]["tool_calls"][0]
    assert call_a["function"] == call_b["function"] and call_a["id"] != call_b["id"]
    reused = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    for call in (call_a, call_b, dict(call_a, id="call_client_made_up")):
        turn = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "12:00"}]
        r = httpx.post(url + CHAT, json={"messages": turn, "tools": [CLOCK], "max_tokens": 2})
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= reused - 1, call


# ---------------------------------------------------------------- property test

_leaf = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(lambda a, d: {"type": "integer", "minimum": a, "maximum": a + d},
              st.integers(-50, 50), st.integers(0, 100)),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda xs: {"enum": xs}, st.lists(st.sampled_from(["x", "y", 1, 2.5, None, True]),
                                                min_size=1, max_size=3, unique=True)),
)
_names = st.text(alphabet="abcdefgh", min_size=1, max_size=5)


def _objects(children):
    def make(props, required_all):
        names = list(props)
        return {"type": "object", "properties": props, "additionalProperties": False,
                "required": names if required_all else names[:1]}
    return st.builds(make, st.dictionaries(_names, children, min_size=1, max_size=3),
                     st.booleans())


def _arrays(children):
    return st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n},
                     children, st.integers(0, 3))


SCHEMAS = st.recursive(_leaf, lambda c: st.one_of(_objects(c), _arrays(c)), max_leaves=6)


@pytest.fixture(scope="module")
def property_engine(tokenizer):
    from segcache.engine.engine import Engine
    from tests.tiny import tiny_runtime

    engine = Engine(tiny_runtime(), tokenizer, CacheConfig(), "tiny")
    yield engine
    engine.close(drain=False)


# SEGCACHE_LONG_TESTS=1 for a longer fuzzing run (300 schemas)
@settings(max_examples=300 if read_environment().long_tests else 25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(schema=SCHEMAS, seed=st.integers(0, 2**31))
def test_random_schemas_always_yield_valid_instances(property_engine, schema, seed):
    req = ChatRequest("prop", [{"role": "user", "content": "Some JSON."}],
                      sampling=SamplingParams(max_tokens=300, temperature=1.0, seed=seed),
                      response_format=schema_format(schema))
    result = property_engine.chat(req)
    assert result.finish_reason == "stop", (schema, result.text)
    jsonschema.validate(json.loads(result.text), schema)


# ---------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def real_client(real_engine):
    from segcache.engine.engine import Engine

    engine = Engine(real_engine.runtime, real_engine.tokenizer, CacheConfig(),
                    real_engine.model_name)
    with running_server(engine) as url:
        yield engine, OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    engine.close(drain=False)


@pytest.mark.slow
def test_schema_constrained_answer_on_the_real_model(real_client):
    engine, client = real_client
    messages = [{"role": "user", "content": "Give me a person named Alice who is 30, as JSON."}]
    r = client.chat.completions.create(model=engine.model_name, messages=messages, max_tokens=80,
                                       temperature=0, response_format=schema_format(PERSON))
    person = json.loads(r.choices[0].message.content)
    jsonschema.validate(person, PERSON)
    stream = client.chat.completions.create(model=engine.model_name, messages=messages,
                                            max_tokens=80, temperature=0, stream=True,
                                            response_format=schema_format(PERSON))
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert json.loads(text) == person


@pytest.mark.slow
def test_forced_tool_call_on_the_real_model(real_client):
    engine, client = real_client
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        r = client.chat.completions.create(model=engine.model_name, messages=messages,
                                           tools=[WEATHER, CLOCK], tool_choice=choice,
                                           max_tokens=60, temperature=0, parallel_tool_calls=False)
        assert r.choices[0].finish_reason == "tool_calls"
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    stream = client.chat.completions.create(model=engine.model_name, messages=messages,
                                            tools=[WEATHER, CLOCK], tool_choice=named,
                                            max_tokens=60, temperature=0, stream=True)
    calls = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert calls[0].id.startswith("call_") and calls[0].id != call.id


def test_a_grammar_in_error_lets_the_sequence_end(property_engine):
    """If the matcher ever allowed nothing (an error state), EOS is allowed: the
    request ends instead of sampling from an all -inf row."""
    import torch

    from segcache.engine.grammar import Constraint, grammar_for

    req = ChatRequest("t", USER, response_format=schema_format(PERSON))
    grammars = property_engine.grammars
    c = Constraint(grammars.compile(grammar_for(req), "response_format"),
                   property_engine.tokenizer.eos_ids)
    logits = torch.zeros(property_engine.runtime.arch.vocab_size)
    assert torch.isfinite(c.mask(logits)).sum() == 1  # '{' only
    c.advance(property_engine.tokenizer.encode("}")[0])  # not allowed: error state
    assert c.failed
    masked = c.mask(logits)
    assert set(torch.nonzero(torch.isfinite(masked)).flatten().tolist()) == set(c.eos_ids)


@pytest.mark.parametrize(("extra", "accepted", "refused"), [
    # auto without parallel calls: one call, or text that holds no call
    ({"parallel_tool_calls": False},
     ["plain words", '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'],
     ['<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
      '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
      'text first <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
      '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>']),
    # auto with a JSON answer format: a call, or the JSON answer
    ({"response_format": {"type": "json_object"}},
     ['{"a": 1}', '<tool_call>\n{"name": "get_time", "arguments": {"zone": "x"}}\n</tool_call>'],
     ["plain words", '[1, 2]']),
    # a strict tool under auto: its arguments follow its schema
    ({"tools": [{"type": "function", "function": {**CLOCK["function"], "strict": True}}]},
     ['<tool_call>\n{"name": "get_time", "arguments": {"zone": "utc"}}\n</tool_call>', "hello"],
     ['<tool_call>\n{"name": "get_time", "arguments": {"zone": 5}}\n</tool_call>']),
])
def test_auto_grammars(property_engine, extra, accepted, refused):
    from segcache.engine.grammar import grammar_for

    req = ChatRequest("t", USER, **{"tools": [CLOCK], **extra})
    lark = grammar_for(req)
    tok = property_engine.tokenizer
    for text, ok in [(t, True) for t in accepted] + [(t, False) for t in refused]:
        matcher = property_engine.grammars.compile(lark, "tools")
        consumed = matcher.consume_tokens(tok.encode(text)) and matcher.is_accepting()
        assert consumed == ok, (text, matcher.get_error())
    assert grammar_for(ChatRequest("t", USER, tools=[CLOCK])) is None  # plain auto: free
