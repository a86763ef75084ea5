"""A real KV-event consumer against two segcache replicas: Dynamo's SelectionService
(ai-dynamo-runtime 1.6.1, the runtime-free core of Dynamo's KV router: no etcd, no
NATS) subscribes to both replicas' ZMQ streams, rebuilds its radix index from the
events (recomputing its own block keys from ``token_ids``, filling the gap of the
batches published before it joined from the replay socket), and must score and
pick the replica holding the longer prefix.

ai-dynamo-runtime pins pydantic <= 2.13.5 (the server runs 2.14.x), so it runs in a
venv of its own, ``.venv-dynamo`` (``make dynamo-venv``; or point
``SEGCACHE_DYNAMO_PYTHON`` at any interpreter that has it), in a subprocess:
tests/dynamo_consumer.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from segcache.config import CacheConfig, read_environment
from segcache.deploy.kv_events import BLOCK_SIZE, KVEventPublisher, path_tokens, topic_for
from segcache.engine.types import SegmentInput
from tests.tier_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
GLOBAL = "Global rules: answer briefly, cite the file, never invent an API. " * 4
AGENT = "Backend agent: owns the auth module and its tests. " * 3


def dynamo_python() -> str | None:
    """The interpreter that has Dynamo: $SEGCACHE_DYNAMO_PYTHON, .venv-dynamo, or this one."""
    env = read_environment().dynamo_python
    if env is not None:
        if not env.exists():
            raise FileNotFoundError(f"SEGCACHE_DYNAMO_PYTHON={env} does not exist")
        return str(env)
    local = ROOT / ".venv-dynamo" / "bin" / "python"
    if local.exists():
        return str(local)
    if importlib.util.find_spec("dynamo") is not None and importlib.util.find_spec("dynamo.llm") is not None:
        return sys.executable
    return None


def deepest_path(engine) -> list[int]:
    """Token ids from the root to the deepest node of the engine's segment tree."""
    return max((path_tokens(n) for n in engine.tree.nodes() if n.parent is not None), key=len)


def test_dynamo_selection_service_picks_the_replica_with_the_longer_prefix(tiny_engine_factory):
    python = dynamo_python()
    if python is None:
        message = "ai-dynamo-runtime is not installed: run `make dynamo-venv` (or set SEGCACHE_DYNAMO_PYTHON)"
        if read_environment().ci:  # `make test` builds it: in CI its absence is a failure
            pytest.fail(message)
        pytest.skip(message)
    engines, publishers, workers = [], [], []
    for worker_id in (1, 2):
        engine = tiny_engine_factory(CacheConfig(blend="off"))
        endpoint, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        publishers.append(KVEventPublisher(endpoint, replay, topic_for(f"pod-{worker_id}", "tiny"))
                          .attach_engine(engine))
        engines.append(engine)
        workers.append({"worker_id": worker_id, "kv_events_endpoint": endpoint, "replay_endpoint": replay})
    consumer = subprocess.Popen([python, str(ROOT / "tests" / "dynamo_consumer.py")], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        consumer.stdin.write(json.dumps({"workers": workers, "model": "tiny", "block_size": BLOCK_SIZE}) + "\n")
        consumer.stdin.flush()
        assert json.loads(consumer.stdout.readline()) == {"ready": True}

        # replica 1 holds the global block and the agent block, replica 2 the global block only
        engines[0].warm("default", [SegmentInput("g", GLOBAL), SegmentInput("a", AGENT)])
        engines[1].warm("default", [SegmentInput("g", GLOBAL)])
        long, short = deepest_path(engines[0]), deepest_path(engines[1])
        assert long[:len(short)] == short and len(short) // BLOCK_SIZE >= 2
        # A later batch on each stream: had a batch above been lost to ZMQ's slow joiner,
        # Dynamo sees the gap in sequence numbers and fetches it from the replay socket.
        # This prompt shares at most the chat template's first tokens with the query.
        for engine in engines:
            engine.warm("default", [SegmentInput("n", "Unrelated note.")])
        query = long + [7, 8, 9]  # the request: that prefix, then a question
        expect = {"1": len(long) // BLOCK_SIZE, "2": len(short) // BLOCK_SIZE}
        consumer.stdin.write(json.dumps({"token_ids": query, "expect": expect, "timeout": 30}) + "\n")
        consumer.stdin.flush()
        answer = json.loads(consumer.stdout.readline())
    finally:
        consumer.kill()
        consumer.wait()
        for p in publishers:
            p.close()
    # Dynamo's index holds exactly the blocks each replica announced, keyed from token_ids
    assert answer["blocks"] == expect
    assert answer["select"]["worker_id"] == 1
    assert answer["select"]["overlap"]["longest_matched"] == expect["1"] * BLOCK_SIZE
