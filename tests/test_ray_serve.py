"""``segcache serve --replicas``: the Ray Serve application on a local Ray with two
replicas of the tiny model (segcache.deploy.ray_app, ray_router): seed 000's agents
land where their prefix is warm, streaming works through the ingress, and a killed
replica loses no request that had not started streaming and gets no more traffic."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from segcache.bench.runner import request_body
from segcache.bench.workloads import MultiAgentSizes, WorkloadOptions, multi_agent
from segcache.config import Config
from tests.tier_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def fleet():
    """A local Ray, Serve on a free port, the app with 2 tiny replicas (half a CPU each)."""
    os.environ.update({"RAY_AUTH_MODE": "disabled"})
    import ray
    from ray import serve

    from segcache.deploy.ray_app import build_app
    from tests.ray_helpers import tiny_engine

    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": ENV}, logging_level="ERROR",
             log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(Config(), 2, make_engine=tiny_engine, cpus_per_replica=0.5, ingress_cpus=0.25,
                        max_ongoing_requests=8),
              name="segcache", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def chat(url: str, body: dict) -> tuple[dict, str]:
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "temperature": 0, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json(), r.headers["x-segcache-replica"]


def agent_bodies(turns: int = 2) -> list[tuple[str, dict]]:
    opts = WorkloadOptions(turns=turns, max_tokens=3, sizes=MultiAgentSizes(120, 60, 30))
    out = []
    for req in multi_agent(opts):
        messages, extra = request_body(req, "segments")
        out.append((req.label, {"messages": messages, "max_tokens": req.max_tokens, **extra}))
    return out


def test_seed_000_agents_land_where_their_prefix_is_warm(fleet):
    served = {}
    for label, body in agent_bodies():
        reply, replica = chat(fleet, body)
        served[label] = (replica, reply["usage"]["segcache"]["segments"])
    for label, (replica, segments) in served.items():
        if label.endswith("turn2"):
            assert [s["status"] for s in segments if s["kind"] == "segment"] == ["hit"] * 3, label
            # turn 2 went where turn 1 of that agent left the chain
            assert replica == served[label.replace("turn2", "turn1")][0], label


def test_streaming_through_the_ingress(fleet):
    client = OpenAI(base_url=fleet + "/v1", api_key="none")
    label, body = agent_bodies(1)[0]
    stream = client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=4,
                                            temperature=0, stream=True,
                                            extra_body={"segments": body["segments"]})
    chunks = list(stream)
    assert len(chunks) >= 2 and chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason
    # errors come back as the single server's, through the ingress
    r = httpx.post(fleet + "/v1/chat/completions", json={"model": "tiny", "messages": "nope"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"]


def _replica_actor(replica_id: str):
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].endswith(replica_id) and "SegcacheEngine" in entry["name"]:
            return ray.get_actor(entry["name"], namespace=entry["namespace"])
    raise AssertionError(f"no actor for replica {replica_id}")


def _replica_actors() -> list:
    import ray

    return [ray.get_actor(e["name"], namespace=e["namespace"])
            for e in ray.util.list_named_actors(all_namespaces=True) if "SegcacheEngine" in e["name"]]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to give each replica its own")
def test_replicas_report_warm_chains_and_run_on_their_own_cores(fleet):
    import ray

    label, body = agent_bodies(1)[0]
    chat(fleet, body)
    stats = [ray.get(a.record_routing_stats.remote()) for a in _replica_actors()]
    assert len(stats) == 2
    cores = [set(s["cores"]) for s in stats]
    assert cores[0] and cores[1] and not cores[0] & cores[1]
    # the routing chain of the request's segments is reported by the replica that served it
    from segcache.deploy.chain import ROUTE_ROOT, request_chain

    key = request_chain(body, ROUTE_ROOT)
    assert sum(set(key.chain[:3]) <= set(s["warm"]) for s in stats) >= 1


def test_a_killed_replica_loses_no_request_and_gets_no_more(fleet):
    import ray

    bodies = [{**b, "max_tokens": 48} for _, b in agent_bodies(3)]  # long enough to be mid-run
    _, victim = chat(fleet, bodies[0])  # the replica holding seed 000's prefix: all go there
    with ThreadPoolExecutor(len(bodies)) as pool:
        running = [pool.submit(chat, fleet, b) for b in bodies]
        time.sleep(0.2)
        ray.kill(_replica_actor(victim), no_restart=True)
        results = [f.result() for f in running]  # every one answered 200 (chat asserts it)
    survivors = [replica for _, replica in results if replica != victim]
    assert survivors, "no request was retried on the other replica"
    time.sleep(1.0)
    after = [chat(fleet, b)[1] for b in bodies[:4]]
    assert victim not in after
