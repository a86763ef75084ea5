"""Concurrent serving through the HTTP server: 429 with Retry-After, disconnects,
no head-of-line blocking on the real model."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from segcache.config import CacheConfig, SchedulerConfig
from segcache.engine.engine import Engine
from tests.server_harness import running_server

CHAT = "/v1/chat/completions"


def body(text: str, max_tokens: int = 4, stream: bool = False, segments=None) -> dict:
    b = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
         "temperature": 0, "stream": stream}
    if segments:
        b["segments"] = segments
    return b


def wait_until(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_overload_is_429_with_retry_after(tiny_engine_factory):
    engine = tiny_engine_factory(scheduler=SchedulerConfig(max_running=1, max_waiting=1))
    gate = threading.Event()
    orig = engine.runtime.prefill
    engine.runtime.prefill = lambda *a, **k: (gate.wait(10), orig(*a, **k))[1]
    with running_server(engine) as url:
        replies = []
        threads = [threading.Thread(target=lambda i=i: replies.append(
            httpx.post(url + CHAT, json=body(f"hello {i}"), timeout=60))) for i in range(2)]
        threads[0].start()  # one at a time: a request is "waiting" until the loop admits it
        wait_until(lambda: engine.scheduler.load() == {"running": 1, "waiting": 0})
        threads[1].start()
        wait_until(lambda: engine.scheduler.load() == {"running": 1, "waiting": 1})
        r = httpx.post(url + CHAT, json=body("one too many"), timeout=60)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert "capacity" in r.json()["error"]["message"]
        gate.set()
        for t in threads:
            t.join(60)
        assert [x.status_code for x in replies] == [200, 200]


def test_disconnect_mid_stream_releases_everything(tiny_engine_factory):
    engine = tiny_engine_factory()
    with running_server(engine) as url:
        with httpx.stream("POST", url + CHAT, json=body("Tell a long story.", 200, stream=True),
                          timeout=60) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
        assert any(line.startswith("data:") for line in got)
        wait_until(lambda: engine.scheduler.load() == {"running": 0, "waiting": 0})
        assert engine.cache_stats("local")["pinned"] == 0
        engine.tree.check_integrity()
        assert httpx.post(url + CHAT, json=body("still there?"), timeout=60).status_code == 200


@pytest.mark.slow
def test_short_cached_request_is_not_blocked_by_a_long_cold_prefill(real_engine):
    """Issue 6: a short request whose prefix is cached, sent while a cold ~4k-token
    prefill runs, gets its whole answer before that prefill finishes."""
    engine = Engine(real_engine.runtime, real_engine.tokenizer, CacheConfig(), real_engine.model_name)
    shared = [{"id": "rules", "content": "Answer in one short sentence. " * 20}]
    long_text = " ".join(f"Record {i}: the value of item {i} is {i * 7 % 97}." for i in range(320))
    try:
        with running_server(engine) as url:
            httpx.post(url + CHAT, json=body("Hi.", 2, segments=shared), timeout=120)  # warm it
            times: dict[str, float] = {}

            def cold() -> None:
                with httpx.stream("POST", url + CHAT, json=body(long_text, 2, stream=True),
                                  timeout=300) as r:
                    for line in r.iter_lines():
                        if '"content":"' in line and '"content":""' not in line:
                            times["cold_first_token"] = time.monotonic()
                            break

            t = threading.Thread(target=cold)
            t.start()
            wait_until(lambda: engine.scheduler.load()["running"] == 1)
            time.sleep(0.5)  # the cold prefill is under way
            r = httpx.post(url + CHAT, json=body("Hi.", 8, segments=shared), timeout=300)
            times["short_done"] = time.monotonic()
            t.join(300)
            assert r.status_code == 200
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
            assert times["short_done"] < times["cold_first_token"]
    finally:
        engine.close(drain=False)


def test_open_streams_hold_no_threads(tiny_engine_factory):
    """Issue 15: the server awaits the engine's futures (``EngineClient``), so requests
    queued or generating hold no worker thread: while six streams wait on a held
    engine, no thread is blocked on a request's result."""
    import sys

    engine = tiny_engine_factory(scheduler=SchedulerConfig(max_running=8, max_waiting=8))
    gate = threading.Event()
    orig = engine.runtime.prefill
    engine.runtime.prefill = lambda *a, **k: (gate.wait(30), orig(*a, **k))[1]
    with running_server(engine) as url:
        statuses = []

        def stream(i):
            with httpx.stream("POST", url + CHAT, json=body(f"story {i}", 8, stream=True),
                              timeout=60) as r:
                statuses.append(r.status_code)
                for _ in r.iter_lines():
                    pass

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        wait_until(lambda: sum(engine.scheduler.load().values()) == 6)
        time.sleep(0.2)
        waiting_on_results = []
        for frame in sys._current_frames().values():
            stack = []
            while frame is not None:
                stack.append((frame.f_code.co_filename, frame.f_code.co_name))
                frame = frame.f_back
            if any(f.endswith("concurrent/futures/_base.py") and n == "result" for f, n in stack) \
                    or any(f.endswith("server/generation.py") for f, _ in stack):
                waiting_on_results.append(stack[-1])
        gate.set()
        for t in threads:
            t.join(60)
    assert waiting_on_results == []
    assert statuses == [200] * 6
