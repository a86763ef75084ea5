"""``segcache serve --replicas 2`` from the command line, on the real model: the
OpenAI API through Ray Serve, seed 000's agents hit their warm prefix, and each
replica publishes its own KV events (``--kv-events``: replica R on PORT + 2R)."""

from __future__ import annotations

import httpx
import pytest

from segcache.deploy.kv_events import replay_endpoint_for
from tests.serve_process import ServeProcess
from tests.test_kv_events import Consumer
from tests.test_ray_serve import agent_bodies
from tests.tier_helpers import free_port


def free_ports(n: int) -> int:
    """A port P with P..P+n-1 free now."""
    import socket

    for _ in range(100):
        base = free_port()
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no run of free ports")


@pytest.mark.slow
def test_serve_replicas_on_the_real_model(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    port = free_ports(4)  # replica 0: PUB, replay; replica 1: PUB, replay
    events = f"tcp://127.0.0.1:{port}"
    args = ["--replicas", "2", "--cpus-per-replica", "0.5", "--kv-events", events, "--pod-name", "pod"]
    with ServeProcess(args, log=tmp_path / "serve.log", startup_timeout_s=300) as srv:
        served = {}
        for label, body in agent_bodies():
            r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "SmolLM2-135M-Instruct", "temperature": 0, **body},
                           timeout=120)
            assert r.status_code == 200, r.text
            served[label] = (r.headers["x-segcache-replica"], r.json()["usage"])
        for label, (replica, usage) in served.items():
            if label.endswith("turn2"):
                assert replica == served[label.replace("turn2", "turn1")][0]
                assert [s["status"] for s in usage["segcache"]["segments"] if s["kind"] == "segment"] == ["hit"] * 3
                assert usage["prompt_tokens_details"]["cached_tokens"] > 0
        held = set()
        for rank in range(2):  # the agents' blocks are on one of the two replicas' streams
            endpoint = f"tcp://127.0.0.1:{port + 2 * rank}"
            consumer = Consumer(endpoint, replay_endpoint_for(endpoint))
            try:
                consumer.fetch_replay(0)
                assert consumer.events()[0] == {"type": "AllBlocksCleared"}
                held |= consumer.held()
            finally:
                consumer.close()
        assert held
