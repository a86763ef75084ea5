"""One structured JSON log line per request (seed 001's metrics)."""

from __future__ import annotations

import json
import logging

from openai import OpenAI

from tests.fakes import FakeEngine
from tests.server_harness import running_server


def test_each_request_logs_one_json_line(caplog):
    engine = FakeEngine()
    caplog.set_level(logging.INFO, logger="segcache.requests")
    with running_server(engine) as url:
        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, extra_body={"segments": [{"id": "a", "content": "rules"}]})
        client.completions.create(model="fake-model", prompt="hello", max_tokens=3)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "segcache.requests"]
    assert [line["event"] for line in lines] == ["chat.completion", "text_completion"]
    first = lines[0]
    for key in ("tenant", "prefix_hash", "chain", "tools_count", "schema_digest", "prompt_tokens",
                "cached_tokens", "computed_tokens", "completion_tokens", "ttft_s", "total_s", "status"):
        assert key in first, key
    assert first["tenant"] == "local"
    assert first["computed_tokens"] == first["prompt_tokens"] - first["cached_tokens"]


def test_request_log_file_feeds_the_linter(tmp_path):
    from segcache.cli import main
    from segcache.config import ServerConfig

    log_path = tmp_path / "requests.jsonl"
    engine = FakeEngine()
    system = "You are the release agent. Follow the checklist exactly. " * 30
    with running_server(engine, ServerConfig(request_log=log_path)) as url:
        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for i in range(4):  # a timestamp at the very start: the classic cache breaker
            stamp = f"Current time: 2026-11-23T10:{i:02d}:17Z\n"
            client.chat.completions.create(model="fake-model", max_tokens=3, messages=[
                {"role": "system", "content": stamp + system},
                {"role": "user", "content": f"Step {i}: what next?"}])
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(records) == 4 and records[0]["request"]["messages"][0]["role"] == "system"
    assert records[0]["tenant"] == "local" and "usage" in records[0]
    report = tmp_path / "lint.json"
    assert main(["lint", str(log_path), "--json", str(report)]) == 1
    assert "dynamic-prefix" in report.read_text()
