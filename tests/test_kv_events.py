"""KV events in vLLM's map format over ZMQ (segcache.deploy.kv_events): a pyzmq
subscriber, written the way Dynamo's and llm-d's consumers read the stream, checks
the events against the engine's trees: stored on warm, removed on eviction and
purge, cleared when a purge empties the cache, and missed batches replayed."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from segcache.config import CacheConfig
from segcache.deploy.kv_events import (
    BLOCK_SIZE,
    END_SEQ,
    BlockEvents,
    KVEventPublisher,
    block_hash,
    chained_hashes,
    path_tokens,
    replay_endpoint_for,
    topic_for,
)
from segcache.engine.types import ChatRequest, SamplingParams, SegmentInput
from segcache.kv.segment_tree import SegmentTree
from tests.tier_helpers import free_port

TOPIC = topic_for("pod-a", "tiny")


class Consumer:
    """SUB on the stream plus a DEALER on the replay socket; keeps the set of blocks
    the replica holds, as a KV router's index would, and checks every event."""

    def __init__(self, endpoint: str, replay: str) -> None:
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.connect(endpoint)
        self.sub.setsockopt_string(zmq.SUBSCRIBE, "kv@")
        self.replay = self.ctx.socket(zmq.DEALER)
        self.replay.connect(replay)
        self.batches: dict[int, list] = {}  # seq -> [ts, events, dp_rank]
        self.live: list[int] = []  # sequence numbers seen on the SUB socket

    def poll(self, seconds: float = 0.5) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.sub.poll(50):
                topic, seq, payload = self.sub.recv_multipart()
                assert topic.decode().startswith("kv@pod") and len(seq) == 8
                n = int.from_bytes(seq, "big")
                self.live.append(n)
                self.batches[n] = msgpack.unpackb(payload)

    def fetch_replay(self, start: int) -> list[int]:
        self.replay.send_multipart([b"", start.to_bytes(8, "big")])
        got = []
        while True:
            assert self.replay.poll(5000), "replay did not answer"
            empty, seq, payload = self.replay.recv_multipart()
            assert empty == b""
            if seq == END_SEQ:
                assert payload == b""
                return got
            n = int.from_bytes(seq, "big")
            got.append(n)
            self.batches[n] = msgpack.unpackb(payload)

    def events(self) -> list[dict]:
        seqs = sorted(self.batches)
        assert seqs == list(range(len(seqs))), f"gap in sequence numbers: {seqs}"
        return [e for s in seqs for e in self.batches[s][1]]

    def held(self) -> set[int]:
        """Blocks held after replaying every event, checking each as a consumer would:
        hashes recomputed from token ids in 16-token blocks, parents already known."""
        held: set[int] = set()
        for e in self.events():
            if e["type"] == "BlockStored":
                assert e["block_size"] == BLOCK_SIZE and e["lora_id"] is None and e["medium"] == "CPU"
                assert e["parent_block_hash"] is None or e["parent_block_hash"] in held
                tokens, parent = e["token_ids"], e["parent_block_hash"]
                assert len(tokens) == BLOCK_SIZE * len(e["block_hashes"])
                for k, h in enumerate(e["block_hashes"]):
                    parent = block_hash(parent, tokens[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE])
                    assert h == parent and 0 <= h < 2**64
                    held.add(h)
            elif e["type"] == "BlockRemoved":
                assert set(e["block_hashes"]) <= held
                held -= set(e["block_hashes"])
            else:
                assert e == {"type": "AllBlocksCleared"}
                held.clear()
        return held

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def tree_blocks(engine) -> set[int]:
    """Every full 16-token block of every prompt prefix the engine's trees hold."""
    standalone = {engine.blender.standalone_namespace(n) for n in engine.tree.namespaces}
    out: set[int] = set()
    for node in [*engine.tree.nodes(), *engine.radix.nodes()]:
        if node.parent is None or node.namespace in standalone:
            continue
        tokens = path_tokens(node)
        out.update(chained_hashes(tokens, len(tokens) // BLOCK_SIZE))
    return out


@pytest.fixture
def wired(tiny_engine_factory):
    engine = tiny_engine_factory(CacheConfig(blend="off"))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    replay = f"tcp://127.0.0.1:{free_port()}"
    publisher = KVEventPublisher(endpoint, replay, TOPIC).attach_engine(engine)
    consumer = Consumer(endpoint, replay)
    yield engine, publisher, consumer
    consumer.close()
    publisher.close()


GLOBAL = "Global rules: answer briefly, cite the file, never invent an API. " * 4
AGENT = "Backend agent: owns the auth module and its tests. " * 3


def warm(engine, *contents: str, tenant: str = "default"):
    return engine.warm(tenant, [SegmentInput(f"s{i}", c) for i, c in enumerate(contents)])


def settle(consumer: Consumer, publisher: KVEventPublisher) -> None:
    """Wait for the publisher to send what is queued; fill any gap from the replay socket."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        consumer.poll(0.2)
        if publisher._queue.empty():
            break
    consumer.fetch_replay(0)


def test_stored_removed_cleared_match_the_tree(wired):
    engine, publisher, consumer = wired
    warm(engine, GLOBAL, AGENT)
    engine.chat(ChatRequest("default", [{"role": "user", "content": "Name one risk."}],
                            [SegmentInput("g", GLOBAL), SegmentInput("a", AGENT)],
                            SamplingParams(max_tokens=3, temperature=0)))
    warm(engine, GLOBAL, tenant="other")  # same tokens in another namespace: refcounted
    settle(consumer, publisher)
    held = consumer.held()
    assert held and held == tree_blocks(engine)
    types = [e["type"] for e in consumer.events()]
    assert types[0] == "AllBlocksCleared" and "BlockStored" in types

    with engine._lock:  # evict down to half the bytes: BlockRemoved for what left
        engine.tree.evict_until(engine.tree.resident_bytes // 2)
        engine.radix.evict_until(0)
    settle(consumer, publisher)
    assert "BlockRemoved" in [e["type"] for e in consumer.events()]
    assert consumer.held() == tree_blocks(engine) and consumer.held() < held

    engine.purge("other")
    settle(consumer, publisher)
    assert consumer.held() == tree_blocks(engine)
    engine.purge("default")  # nothing left anywhere: a full purge
    settle(consumer, publisher)
    assert tree_blocks(engine) == set() and consumer.held() == set()
    assert consumer.events()[-1] == {"type": "AllBlocksCleared"}


def test_replay_serves_missed_batches_by_sequence_number(wired):
    engine, publisher, consumer = wired
    warm(engine, GLOBAL)
    settle(consumer, publisher)
    first = sorted(consumer.batches)
    warm(engine, GLOBAL, AGENT)
    settle(consumer, publisher)
    later = sorted(set(consumer.batches) - set(first))
    assert later, "the second warm published nothing"
    missed = {s: consumer.batches[s] for s in later}
    for s in later:
        del consumer.batches[s]
    assert consumer.fetch_replay(later[0]) == sorted(set(first + later))[later[0]:]
    assert {s: consumer.batches[s] for s in later} == missed
    assert consumer.held() == tree_blocks(engine)


def test_the_live_stream_carries_the_batches(wired):
    engine, publisher, consumer = wired
    time.sleep(0.3)  # let the subscription reach the publisher (ZMQ's slow joiner)
    warm(engine, GLOBAL, AGENT)
    consumer.poll(1.0)
    assert consumer.live, "nothing arrived on the SUB socket"
    assert all(b[2] == 0 and isinstance(b[0], float) for b in consumer.batches.values())


def test_blocks_follow_node_boundaries_and_refcounts():
    """A block straddling two nodes is announced with the child; the same blocks under
    two namespaces are stored once and removed when the last holder goes."""
    events: list[dict] = []
    tree = SegmentTree.create_simulated()
    tree.listeners.append(BlockEvents(events.append))
    a = tree.insert(tree.root("ns1"), "sha256:a", list(range(20)), None, 20)
    assert [e["block_hashes"] for e in events] == [chained_hashes(list(range(20)), 1)]
    b = tree.insert(a, "sha256:b", list(range(20, 40)), None, 20)
    h = chained_hashes(list(range(40)), 2)
    assert events[-1]["block_hashes"] == [h[1]] and events[-1]["parent_block_hash"] == h[0]
    assert events[-1]["token_ids"] == list(range(16, 32))
    n = len(events)
    tree.insert(tree.root("ns2"), "sha256:a", list(range(20)), None, 20)
    assert len(events) == n  # already held by ns1: no event
    tree.purge("ns1")
    assert events[-1] == {"type": "BlockRemoved", "block_hashes": [h[1]], "medium": "CPU", "group_idx": 0}
    assert b.parent is a
    tree.purge("ns2")
    assert events[-2]["block_hashes"] == [h[0]] and events[-1] == {"type": "AllBlocksCleared"}


def test_endpoints_and_topic():
    assert replay_endpoint_for("tcp://*:5557") == "tcp://*:5558"
    assert topic_for("pod-1", "SmolLM2") == "kv@pod-1@SmolLM2"
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        replay_endpoint_for("localhost:5557")


@pytest.mark.slow
def test_segcache_serve_publishes_kv_events(tmp_path, tokenizer):
    """The real server and model: ``segcache serve --kv-events``; warming over HTTP
    announces blocks whose token ids are the warmed text, a purge clears them."""
    import httpx

    from tests.serve_process import ServeProcess

    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    with ServeProcess(["--kv-events", endpoint, "--pod-name", "pod-a"], log=tmp_path / "serve.log") as srv:
        consumer = Consumer(endpoint, replay_endpoint_for(endpoint))
        try:
            r = httpx.post(srv.url + "/v1/cache/warm", json={"segments": [{"id": "g", "content": GLOBAL}]},
                           timeout=120)
            assert r.status_code == 200, r.text
            consumer.poll(0.5)
            consumer.fetch_replay(0)
            stored = [e for e in consumer.events() if e["type"] == "BlockStored"]
            assert stored and consumer.held()
            text = tokenizer.hf.decode([t for e in stored for t in e["token_ids"]])
            assert "Global rules: answer briefly" in text
            assert httpx.delete(srv.url + "/v1/cache", timeout=60).status_code == 200
            consumer.poll(0.5)
            consumer.fetch_replay(0)
            assert consumer.held() == set() and consumer.events()[-1] == {"type": "AllBlocksCleared"}
        finally:
            consumer.close()


def test_standalone_blend_entries_are_not_announced(tiny_engine_factory):
    """CacheBlend's position-independent copies are not prompt prefixes: no events."""
    engine = tiny_engine_factory(CacheConfig(blend="marked"))
    events: list[dict] = []
    from segcache.deploy.kv_events import standalone_predicate

    listener = BlockEvents(events.append, skip=standalone_predicate(engine))
    engine.tree.listeners.append(listener)
    engine.warm("default", [SegmentInput("g", GLOBAL), SegmentInput("doc", AGENT, reuse="anywhere")])
    ns_s = engine.blender.standalone_namespace(engine.namespace("default"))
    assert engine.tree.nodes(ns_s), "the marked segment has no standalone copy"
    announced = {h for e in events if e["type"] == "BlockStored" for h in e["block_hashes"]}
    assert announced == tree_blocks(engine) and announced
