"""logprobs / top_logprobs and n > 1 through the HTTP API (tiny model, plain HTTP
and the openai client; the real model in the slow tests)."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from openai import OpenAI

from tests.server_harness import running_server

USER = [{"role": "user", "content": "Say something about the sea."}]
CHAT = "/v1/chat/completions"


@pytest.fixture
def tiny(tiny_engine_factory):
    engine = tiny_engine_factory()
    with running_server(engine) as url:
        yield engine, url


def stream_events(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = [e.removeprefix("data: ") for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_logprobs_shape_and_greedy_consistency(tiny):
    _, url = tiny
    body = {"messages": USER, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 3}
    r = httpx.post(url + CHAT, json=body).json()
    choice = r["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 6
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["logprob"] <= 0 and bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
        assert len(e["top_logprobs"]) == 3
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)
        # greedy: the chosen token is the most likely one
        assert e["top_logprobs"][0]["token"] == e["token"] and tops[0] == e["logprob"]
    # top_logprobs 0: the chosen tokens only; without logprobs: null
    r0 = httpx.post(url + CHAT, json={**body, "top_logprobs": 0}).json()
    assert [e["top_logprobs"] for e in r0["choices"][0]["logprobs"]["content"]] == [[]] * 6
    plain = httpx.post(url + CHAT, json={"messages": USER, "max_tokens": 2}).json()
    assert plain["choices"][0]["logprobs"] is None


def test_logprobs_stop_where_a_stop_string_cuts_the_text(tiny):
    """A stop string that starts inside a token: the reply ends before it, and the
    logprobs are those of the tokens that start inside the reply."""
    _, url = tiny
    body = {"messages": USER, "max_tokens": 8, "temperature": 0, "logprobs": True,
            "logit_bias": {"198": -100}}  # "\n", the tiny model's favourite, is too short
    full = httpx.post(url + CHAT, json=body).json()["choices"][0]["logprobs"]["content"]
    tokens = [e["token"] for e in full]
    assert len(tokens[1]) >= 2
    stop_at = "".join(tokens).find(tokens[1][1:] + tokens[2])
    starts = [len("".join(tokens[:i])) for i in range(len(tokens))]
    want = [t for t, at in zip(tokens, starts, strict=True) if at < stop_at]
    for stream in (False, True):
        stop = {**body, "stop": [tokens[1][1:] + tokens[2]]}
        if stream:
            entries, text = [], ""
            for chunk in stream_events(url, CHAT, stop):
                c = chunk["choices"][0]
                text += c["delta"].get("content") or ""
                entries += (c["logprobs"] or {}).get("content", [])
        else:
            choice = httpx.post(url + CHAT, json=stop).json()["choices"][0]
            entries, text = choice["logprobs"]["content"], choice["message"]["content"]
        assert text == "".join(tokens)[:stop_at]
        assert [e["token"] for e in entries] == want


def test_logprobs_come_from_the_models_logits(tiny):
    """A token-id prompt to /v1/completions: the first token's logprobs equal
    log_softmax of the runtime's own logits for that prompt."""
    engine, url = tiny
    ids = engine.tokenizer.encode("The sea is")
    body = {"prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 5}
    r = httpx.post(url + "/v1/completions", json=body).json()
    lp = r["choices"][0]["logprobs"]
    kv = engine.runtime.new_kv(len(ids) + 1)
    with torch.inference_mode():
        logits = engine.runtime.prefill(torch.tensor(ids), torch.arange(len(ids)), kv, 0)[-1]
    want = torch.log_softmax(logits.float(), -1)
    best = torch.topk(want, 5)
    assert lp["tokens"] == [engine.tokenizer.decode([int(best.indices[0])])]
    assert math.isclose(lp["token_logprobs"][0], float(best.values[0]), abs_tol=1e-4)
    tops = lp["top_logprobs"][0]
    assert len(tops) == 5 and lp["text_offset"] == [0]
    for i, v in zip(best.indices, best.values, strict=True):
        assert math.isclose(tops[engine.tokenizer.decode([int(i)])], float(v), abs_tol=1e-4)
    # the token-id prompt is the same prompt as its text
    text = httpx.post(url + "/v1/completions", json={**body, "prompt": "The sea is"}).json()
    assert text["choices"][0]["text"] == r["choices"][0]["text"]


def test_streamed_logprobs_match_the_text_they_come_with(tiny):
    _, url = tiny
    body = {"messages": USER, "max_tokens": 8, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    whole = httpx.post(url + CHAT, json=body).json()["choices"][0]["logprobs"]["content"]
    streamed = []
    for chunk in stream_events(url, CHAT, body):
        choice = chunk["choices"][0]
        if choice["logprobs"] is not None:
            entries = choice["logprobs"]["content"]
            assert "".join(e["token"] for e in entries) == choice["delta"]["content"]
            streamed += entries
    assert streamed == whole
    cbody = {"prompt": "The sea", "max_tokens": 5, "temperature": 0, "logprobs": 1}
    full = httpx.post(url + "/v1/completions", json=cbody).json()["choices"][0]
    tokens, offsets = [], []
    for chunk in stream_events(url, "/v1/completions", cbody):
        lp = chunk["choices"][0]["logprobs"]
        if lp is not None:
            tokens += lp["tokens"]
            offsets += lp["text_offset"]
    assert tokens == full["logprobs"]["tokens"] and offsets == full["logprobs"]["text_offset"]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def _prefilled_tokens(engine) -> list[int]:
    """Wraps the runner's prefill: records how many prompt tokens each call computes."""
    seen: list[int] = []
    runner = engine.scheduler.runner
    original = runner.prefill

    def counting(work, n, pause_s=None):
        before = work.done
        original(work, n, pause_s)
        seen.append(work.done - before)

    runner.prefill = counting
    return seen


def test_n_choices_share_one_prompt_computation(tiny):
    engine, url = tiny
    seen = _prefilled_tokens(engine)
    newline = engine.tokenizer.encode("\n")[0]  # the tiny model's overwhelming favourite
    body = {"messages": [{"role": "user", "content": "n choices, one prompt"}], "max_tokens": 5,
            "temperature": 1.0, "seed": 7, "n": 3, "logit_bias": {str(newline): -100}}
    r = httpx.post(url + CHAT, json=body).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    usage = r["usage"]
    assert sum(seen) == usage["prompt_tokens"]  # computed once, not three times
    assert usage["completion_tokens"] == 15
    assert usage["total_tokens"] == usage["prompt_tokens"] + 15
    texts = [c["message"]["content"] for c in r["choices"]]
    assert len(set(texts)) > 1  # sampled independently
    again = httpx.post(url + CHAT, json=body).json()  # seeded: the same choices again
    assert [c["message"]["content"] for c in again["choices"]] == texts
    # streamed: chunks per index assemble the same choices
    parts = {0: "", 1: "", 2: ""}
    finishes = {}
    for chunk in stream_events(url, CHAT, body):
        for c in chunk["choices"]:
            parts[c["index"]] += c["delta"].get("content") or ""
            if c["finish_reason"]:
                finishes[c["index"]] = c["finish_reason"]
    assert [parts[i] for i in range(3)] == texts and set(finishes) == {0, 1, 2}
    # every choice's reply is kept: the next turn after choice 2 reuses it
    turn = {"messages": [*body["messages"], {"role": "assistant", "content": texts[2]},
                         {"role": "user", "content": "more"}], "max_tokens": 2}
    nxt = httpx.post(url + CHAT, json=turn).json()["usage"]
    assert nxt["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] + 5
    engine.tree.check_integrity()


def test_greedy_choices_equal_the_single_choice(tiny):
    engine, url = tiny
    body = {"messages": [{"role": "user", "content": "greedy twice"}], "max_tokens": 6,
            "temperature": 0}
    one = httpx.post(url + CHAT, json=body).json()["choices"][0]["message"]["content"]
    engine.purge("local")
    two = httpx.post(url + CHAT, json={**body, "n": 2}).json()
    assert [c["message"]["content"] for c in two["choices"]] == [one, one]
    client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = client.completions.create(model="tiny", prompt="one two", max_tokens=4, temperature=0,
                                  n=2)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text
    assert r.usage.completion_tokens == 8


def test_a_list_of_prompts_is_one_response(tiny):
    engine, url = tiny
    prompts = ["one two", "The sea is"]
    body = {"prompt": prompts, "max_tokens": 3, "temperature": 0, "n": 2}
    r = httpx.post(url + "/v1/completions", json=body).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    singles = [httpx.post(url + "/v1/completions",
                          json={**body, "prompt": p, "n": 1}).json() for p in prompts]
    texts = [c["text"] for c in r["choices"]]
    assert texts == [singles[0]["choices"][0]["text"]] * 2 + [singles[1]["choices"][0]["text"]] * 2
    assert r["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert r["usage"]["completion_tokens"] == 12
    parts = ["", "", "", ""]
    for chunk in stream_events(url, "/v1/completions", body):
        for c in chunk["choices"]:
            parts[c["index"]] += c["text"]
    assert parts == texts
    as_ids = {**body, "prompt": [engine.tokenizer.encode(p) for p in prompts]}
    assert [c["text"] for c in httpx.post(url + "/v1/completions", json=as_ids).json()["choices"]] \
        == texts


@pytest.mark.slow
def test_logprobs_and_n_on_the_real_model(real_engine):
    from segcache.config import CacheConfig
    from segcache.engine.engine import Engine

    engine = Engine(real_engine.runtime, real_engine.tokenizer, CacheConfig(),
                    real_engine.model_name)
    try:
        with running_server(engine) as url:
            client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            r = client.chat.completions.create(
                model=engine.model_name, messages=[{"role": "user", "content": "What is 2+2?"}],
                max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, n=2)
            assert len(r.choices) == 2
            a, b = r.choices
            assert a.message.content == b.message.content
            content = a.logprobs.content
            assert "".join(e.token for e in content) == a.message.content
            assert all(e.logprob <= 0 and e.top_logprobs[0].token == e.token for e in content)
            assert [e.logprob for e in b.logprobs.content] == [e.logprob for e in content]
            single = client.chat.completions.create(
                model=engine.model_name, messages=[{"role": "user", "content": "What is 2+2?"}],
                max_tokens=8, temperature=0)
            assert single.choices[0].message.content == a.message.content
            assert single.usage.prompt_tokens == r.usage.prompt_tokens
    finally:
        engine.close(drain=False)


def test_streamed_logprobs_with_tools_offered(tiny):
    """Tools in the request (calls are parsed, text before a call streams): the
    streamed text still carries its tokens' logprobs."""
    _, url = tiny
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"messages": USER, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "tools": [tool], "logit_bias": {"198": -100}}
    whole = httpx.post(url + CHAT, json=body).json()["choices"][0]
    assert not whole["message"].get("tool_calls")
    entries, text = [], ""
    for chunk in stream_events(url, CHAT, body):
        c = chunk["choices"][0]
        text += c["delta"].get("content") or ""
        entries += (c["logprobs"] or {}).get("content", [])
    assert text == whole["message"]["content"]
    assert entries == whole["logprobs"]["content"]
