"""KV events in vLLM's format (0.33, map-encoded), so Dynamo's KV router and llm-d's
precise prefix scorer can place requests on segcache replicas.

Wire format (what vLLM's ``ZmqEventPublisher`` sends):

- PUB socket, three frames per batch: topic (``kv@<pod>@<model>``, llm-d's form),
  the batch's sequence number as 8 bytes big-endian, and the msgpack payload
  ``[ts, [event, ...], dp_rank]``;
- each event a map with a ``"type"`` key: ``BlockStored`` (``block_hashes``,
  ``parent_block_hash``, ``token_ids``, ``block_size``, ``lora_id``, ``medium``,
  ``lora_name``, ``extra_keys``, ``group_idx``, ``kv_cache_spec_kind``),
  ``BlockRemoved`` (``block_hashes``, ``medium``, ``group_idx``) or ``AllBlocksCleared``;
- a ROUTER replay socket: a client sends ``start_seq`` (8 bytes big-endian; a REQ or
  DEALER socket); it gets ``[b"", seq, payload]`` for every buffered batch from
  ``start_seq`` on, then ``[b"", END_SEQ, b""]``.

Blocks. A tree node holds the KV of its own tokens; the prompt it ends is the
concatenation of the token ids from its namespace root. That sequence is cut into
16-token blocks from position 0 (what Dynamo and llm-d recompute from
``token_ids``); a node *owns* the full blocks that end inside its span, so a
block straddling a parent and a child is announced with the child, and a partial
last block is never announced. A block's hash is the first 8 bytes (unsigned, big
endian) of sha256(parent block hash, token ids): the same on every replica and in
every process, chained so equal hashes mean equal prefixes. Two namespaces
(tenants) holding the same tokens hold the same blocks: blocks are reference
counted, ``BlockStored`` goes out when a block is first held and ``BlockRemoved``
when the last holder goes. ``AllBlocksCleared`` goes out when the publisher starts
(a new replica has nothing) and when a purge leaves nothing held.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

BLOCK_SIZE = 16
END_SEQ = (-1).to_bytes(8, "big", signed=True)
Event = dict[str, Any]


def block_hash(parent: int | None, token_ids: tuple[int, ...] | list[int]) -> int:
    """64-bit hash of one block after ``parent`` (None for the first block)."""
    h = hashlib.sha256(b"segcache-block-v1")
    h.update(b"\0" * 8 if parent is None else b"\1" + parent.to_bytes(8, "big"))
    h.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return int.from_bytes(h.digest()[:8], "big")


def chained_hashes(tokens: list[int], n_blocks: int) -> list[int]:
    """Hashes of the first ``n_blocks`` full blocks of ``tokens``."""
    out: list[int] = []
    parent = None
    for k in range(n_blocks):
        parent = block_hash(parent, tokens[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE])
        out.append(parent)
    return out


def path_tokens(node: Any) -> list[int]:
    """Token ids from the namespace root to the end of ``node`` (parent links only)."""
    parts = []
    while node is not None and node.parent is not None:
        parts.append(node.token_ids)
        node = node.parent
    return [t for part in reversed(parts) for t in part]


def owned_blocks(node: Any) -> tuple[list[int], list[int], int | None, list[int]]:
    """(block indices, their hashes, hash of the block before the first, token ids of
    the owned blocks) of the full blocks ending inside ``node``'s span."""
    tokens = path_tokens(node)
    start = len(tokens) - len(node.token_ids)
    first, end = start // BLOCK_SIZE, len(tokens) // BLOCK_SIZE
    hashes = chained_hashes(tokens, end)
    idx = list(range(first, end))
    return idx, hashes[first:end], hashes[first - 1] if first > 0 else None, tokens


class BlockEvents:
    """A ``TreeListener`` (``segcache.kv.lru_tree``) that turns node changes into
    vLLM events, reference-counting blocks across namespaces and trees. ``emit``
    receives each event; pure Python (no sockets), so tests can drive it alone."""

    def __init__(self, emit: Callable[[Event], None], medium: str = "CPU",
                 skip: Callable[[str], bool] | None = None) -> None:
        self._emit = emit
        self.medium = medium
        self.skip = skip  # namespaces whose KV is not a prompt prefix (blend's standalone KV)
        self.held: Counter[int] = Counter()  # block hash -> how many nodes own it

    def stored(self, node: Any) -> None:
        if self.skip is not None and self.skip(node.namespace):
            return
        idx, hashes, before, tokens = owned_blocks(node)
        run: list[tuple[int, int]] = []  # (block index, hash) of consecutive new blocks
        for k, h in zip(idx, hashes, strict=True):
            self.held[h] += 1
            if self.held[h] == 1:
                run.append((k, h))
                continue
            self._stored_run(run, before, tokens)
            run, before = [], h
        self._stored_run(run, before, tokens)

    def _stored_run(self, run: list[tuple[int, int]], parent: int | None, tokens: list[int]) -> None:
        if not run:
            return
        first, last = run[0][0], run[-1][0]
        self._emit({
            "type": "BlockStored", "block_hashes": [h for _, h in run], "parent_block_hash": parent,
            "token_ids": tokens[first * BLOCK_SIZE:(last + 1) * BLOCK_SIZE], "block_size": BLOCK_SIZE,
            "lora_id": None, "medium": self.medium, "lora_name": None, "extra_keys": [None] * len(run),
            "group_idx": 0, "kv_cache_spec_kind": "full_attention",
        })

    def removed(self, node: Any, reason: str) -> None:
        if reason == "replace" or (self.skip is not None and self.skip(node.namespace)):
            return  # "replace": same content, new payload, no block left
        gone = []
        for h in owned_blocks(node)[1]:
            if self.held[h] <= 1:
                self.held.pop(h, None)
                gone.append(h)
            else:
                self.held[h] -= 1
        if gone:
            self._emit({"type": "BlockRemoved", "block_hashes": gone, "medium": self.medium, "group_idx": 0})
            if reason == "purge" and not self.held:
                self.cleared()

    def cleared(self) -> None:
        self.held.clear()
        self._emit({"type": "AllBlocksCleared"})


class KVEventPublisher:
    """Publishes a tree's block events on ZMQ (module docstring), from a thread of its
    own: the engine thread only queues events. ``attach`` the engine's trees, then
    ``close``. ``replay_buffer`` batches are kept for replay."""

    def __init__(self, endpoint: str, replay_endpoint: str | None, topic: str, *, dp_rank: int = 0,
                 replay_buffer: int = 10_000, medium: str = "CPU") -> None:
        self.topic = topic
        self.dp_rank = dp_rank
        self._queue: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self.events = BlockEvents(self._queue.put, medium)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=replay_buffer)
        self._seq = 0
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(endpoint)
        self._replay = None
        if replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
        self._stop = threading.Event()
        self.events.cleared()  # a new publisher holds nothing: consumers forget this pod
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def attach(self, *trees: Any) -> KVEventPublisher:
        """Listen to ``trees`` (``LruTree``s: the segment tree, the radix tail). Call
        before the engine serves, or under its lock."""
        for tree in trees:
            tree.listeners.append(self.events)
        return self

    def attach_engine(self, engine: Any) -> KVEventPublisher:
        """Listen to an ``Engine``'s segment tree and radix tail; its standalone
        (position-independent, CacheBlend) entries are not prompt prefixes and stay out."""
        self.events.skip = standalone_predicate(engine)
        return self.attach(engine.tree, engine.radix)

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=5)
        self._ctx.destroy(linger=0)

    def _run(self) -> None:
        poller = zmq.Poller()
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        while not self._stop.is_set():
            batch = self._drain(timeout=0.02)
            if batch:
                self._publish(batch)
            if self._replay is not None and dict(poller.poll(0)).get(self._replay):
                self._serve_replay()

    def _drain(self, timeout: float) -> list[Event]:
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        batch = [] if first is None else [first]
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                return batch
            if event is not None:
                batch.append(event)

    def _publish(self, events: list[Event]) -> None:
        payload = msgpack.packb([time.time(), events, self.dp_rank], use_bin_type=True)
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        self._pub.send_multipart([self.topic.encode(), seq.to_bytes(8, "big"), payload])

    def _serve_replay(self) -> None:
        frames = self._replay.recv_multipart()
        client, start = frames[0], int.from_bytes(frames[-1], "big")
        for seq, payload in list(self._buffer):
            if seq >= start:
                self._replay.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
        self._replay.send_multipart([client, b"", END_SEQ, b""])


def standalone_predicate(engine: Any) -> Callable[[str], bool]:
    """``ns -> True`` for an engine's standalone (CacheBlend) namespaces, remembered (tree
    callbacks must stay cheap); a "no" is asked again once the tree has a new namespace."""
    known: dict[str, bool] = {}
    roots = [0]  # how many namespaces the tree had when ``known`` was filled

    def standalone(ns: str) -> bool:
        namespaces = engine.tree.namespaces
        if len(namespaces) != roots[0]:  # a new tenant: its standalone namespace may be asked
            roots[0] = len(namespaces)
            for key in [k for k, v in known.items() if not v]:
                del known[key]
        if ns not in known:
            known[ns] = ns in {engine.blender.standalone_namespace(n) for n in namespaces}
        return known[ns]
    return standalone


def replay_endpoint_for(endpoint: str) -> str:
    """vLLM's layout: the replay socket on the next port (``tcp://*:5557`` -> ``:5558``)."""
    head, _, port = endpoint.rpartition(":")
    if not head.startswith("tcp://") or not port.isdigit():
        raise ValueError(f"--kv-events must look like tcp://HOST:PORT, got {endpoint!r}")
    return f"{head}:{int(port) + 1}"


def topic_for(pod: str, model: str) -> str:
    """llm-d's topic: ``kv@<pod>@<model>``."""
    return f"kv@{pod}@{model}"
