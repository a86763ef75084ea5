"""segcache.client against a real server (fake engine; the real model is covered in e2e)."""

from __future__ import annotations

from segcache.client import SegcacheClient, Segment
from segcache.kv.hashing import segment_digest
from tests.fakes import FakeEngine
from tests.server_harness import running_server


def test_client_builds_hashed_segments_and_reads_usage():
    engine = FakeEngine()
    rules = Segment("rules", "Global rules. " * 20)
    assert rules.to_json()["hash"] == segment_digest(rules.content)
    assert "content" not in Segment("rules", rules.content, send_content=False).to_json()
    with running_server(engine) as url:
        client = SegcacheClient(url + "/v1", max_retries=0)
        first = client.chat([rules, Segment("b", "Backend.")], [{"role": "user", "content": "hi"}],
                            max_tokens=4)
        assert engine.last_chat.segments[0].hash == rules.hash
        assert SegcacheClient.cached_tokens(first) == 0
        second = client.chat([Segment("rules", rules.content, send_content=False)],
                             [{"role": "user", "content": "hi"}], max_tokens=4)
        assert SegcacheClient.cached_tokens(second) > 0
        assert [s["status"] for s in SegcacheClient.segment_usage(second)][:1] == ["hit"]
        warm = client.warm([Segment("c", "Frontend.")])
        assert warm["cached_segments"] == 1
        reg = client.register("global", rules.content, ttl=60)
        assert reg["hash"] == rules.hash
