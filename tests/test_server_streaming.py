"""A client that goes away stops the generation: ``is_cancelled()`` turns True."""

from __future__ import annotations

import httpx
import pytest

from tests.fakes import FakeEngine

LONG = [{"role": "user", "content": " ".join(f"w{i}" for i in range(200))}]


@pytest.fixture
def engine():
    e = FakeEngine()
    e.token_delay_s = 0.02  # 200 words: ~4 s if nobody cancels
    return e


def test_disconnect_during_stream_cancels(base_url, engine):
    body = {"messages": LONG, "stream": True}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the stream is running
    assert engine.cancel_seen.wait(2.0)


def test_disconnect_while_waiting_non_streaming_cancels(base_url, engine):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/chat/completions", json={"messages": LONG}, timeout=0.3)
    assert engine.cancel_seen.wait(2.0)


def test_completed_stream_is_not_cancelled(base_url, engine):
    engine.token_delay_s = 0
    body = {"prompt": "a b c", "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body) as r:
        assert r.read().decode().endswith("data: [DONE]\n\n")
    assert not engine.cancel_seen.is_set()
