"""A client that leaves after the first streamed chunk still leaves a request-log
line and metrics, as cancelled."""

from __future__ import annotations

import json
import logging
import time

import httpx

from segcache.config import CacheConfig, ServerConfig
from tests.server_harness import running_server

CHAT = "/v1/chat/completions"


def test_disconnect_after_first_chunk_is_logged_and_counted_as_cancelled(tiny_engine_factory, caplog):
    engine = tiny_engine_factory()
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 400,
            "temperature": 0, "stream": True}
    caplog.set_level(logging.INFO, logger="segcache.requests")
    with running_server(engine, ServerConfig(), CacheConfig()) as url:
        with httpx.stream("POST", url + CHAT, json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
        deadline = time.monotonic() + 20
        records = []
        while time.monotonic() < deadline:
            records = [json.loads(r.getMessage()) for r in caplog.records
                       if r.name == "segcache.requests"]
            if records:
                break
            time.sleep(0.05)
        assert [r["status"] for r in records] == ["cancelled"]
        assert records[0]["completion_tokens"] < 400
        metrics = httpx.get(url + "/metrics").text
        line = next(x for x in metrics.splitlines()
                    if x.startswith('segcache_generations_total{finish_reason="cancelled"}'))
        assert float(line.split()[-1]) == 1.0
        assert engine.scheduler.load() == {"running": 0, "waiting": 0}
        assert engine.cache_stats("local")["pinned"] == 0
