"""A deterministic stand-in for ``segcache.engine.engine.Engine``, for server tests.

It honours the engine contract without a model: "tokens" are whitespace words,
the reply echoes the last user message word by word (``on_text`` per word),
and a pretend segment tree keyed by chained digests makes hits and misses real
per tenant. Knobs for tests: ``token_delay_s`` (slow decoding), ``fail_with``
(raise before generating), ``fail_after`` (raise after N words: a mid-stream
error), and ``cancel_seen`` (set when ``is_cancelled()`` answered True).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from segcache.engine.types import (
    ChatRequest,
    ContextOverflowError,
    GenerationResult,
    NotFoundError,
    SamplingParams,
    SegmentInput,
    SegmentMismatchError,
    SegmentUnknownError,
    SegmentUsage,
    WarmResult,
)
from segcache.kv.hashing import chain_digest, namespace_digest, segment_digest

BYTES_PER_TOKEN = 1000


def count_tokens(text: str) -> int:
    return max(1, len(text.split()))


@dataclass
class _Tenant:
    nodes: dict[str, int] = field(default_factory=dict)  # chain -> tokens
    contents: dict[str, str] = field(default_factory=dict)  # segment digest -> text
    registry: dict[str, dict[str, Any]] = field(default_factory=dict)
    hits: int = 0


class FakeEngine:
    model_name = "fake-model"
    fingerprint = "fake-fingerprint-v1"

    def __init__(self, context_window: int = 4096, budget_bytes: int = 10**9) -> None:
        self.context_window = context_window
        self.execution_plan = "fake: no model"
        self.budget_bytes = budget_bytes
        self.token_delay_s = 0.0
        self.fail_with: Exception | None = None
        self.fail_after: int | None = None
        self.cancel_seen = threading.Event()
        self.calls: list[tuple[str, str]] = []  # (method, tenant)
        self.last_chat: ChatRequest | None = None
        self.evictions = 0
        self._tenants: dict[str, _Tenant] = {}
        self._lock = threading.Lock()  # the real engine runs one request at a time too
        # Submitted requests run here (and queue on the lock, as the engine's queue does).
        self._thread = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fake-engine")

    # -- generation -------------------------------------------------------------

    def submit_chat(self, req: ChatRequest, on_text: Callable[[str], None] | None = None,
                    is_cancelled: Callable[[], bool] | None = None) -> Future:
        """``EngineClient``: the request runs on the fake's own engine thread."""
        return self._thread.submit(self.chat, req, on_text, is_cancelled)

    def submit_complete(self, tenant: str, prompt: str, sampling: SamplingParams,
                        on_text: Callable[[str], None] | None = None,
                        is_cancelled: Callable[[], bool] | None = None) -> Future:
        return self._thread.submit(self.complete, tenant, prompt, sampling, on_text, is_cancelled)

    def chat(
        self,
        req: ChatRequest,
        on_text: Callable[[str], None] | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        with self._lock:
            self.calls.append(("chat", req.tenant))
            self.last_chat = req
            self._maybe_fail()
            usage, chain, cached, seg_tokens = self._walk(req.tenant, req.segments)
            msg_tokens = sum(count_tokens(str(m.get("content") or "")) + 1 for m in req.messages)
            users = [m for m in req.messages if m["role"] == "user"]
            reply = "echo: " + (users[-1]["content"] if users else "nothing")
            return self._generate(
                reply, seg_tokens + msg_tokens, cached, chain, usage, req.sampling,
                on_text, is_cancelled,
            )  # fmt: skip

    def complete(
        self,
        tenant: str,
        prompt: str,
        sampling: SamplingParams,
        on_text: Callable[[str], None] | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        with self._lock:
            self.calls.append(("complete", tenant))
            self._maybe_fail()
            reply = "then " + prompt
            root = namespace_digest(tenant, self.fingerprint)
            return self._generate(
                reply, count_tokens(prompt), 0, root, [], sampling, on_text, is_cancelled
            )

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    def _generate(
        self,
        reply: str,
        prompt_tokens: int,
        cached: int,
        chain: str,
        segments: list[SegmentUsage],
        sampling: SamplingParams,
        on_text: Callable[[str], None] | None,
        is_cancelled: Callable[[], bool] | None,
    ) -> GenerationResult:
        if prompt_tokens + sampling.max_tokens > self.context_window:
            raise ContextOverflowError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({sampling.max_tokens}) "
                f"exceeds the context window ({self.context_window})",
                "max_tokens",
            )
        start = time.perf_counter()
        words = reply.split()
        pieces: list[str] = []
        finish = "stop"
        for i, word in enumerate(words):
            if is_cancelled is not None and is_cancelled():
                self.cancel_seen.set()
                finish = "cancelled"
                break
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError("fake engine failure mid-generation")
            if i >= sampling.max_tokens:
                finish = "length"
                break
            piece = word if i == 0 else " " + word
            if any(s in "".join(pieces) + piece for s in sampling.stop):
                break
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
        total = time.perf_counter() - start
        return GenerationResult(
            text="".join(pieces),
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(pieces),
            cached_tokens=cached,
            chain=chain,
            segments=segments,
            ttft_s=total / max(1, len(pieces)),
            total_s=total,
        )

    # -- the pretend segment tree ------------------------------------------------

    def _tenant(self, tenant: str) -> _Tenant:
        return self._tenants.setdefault(tenant, _Tenant())

    def _resolve(self, t: _Tenant, seg: SegmentInput) -> tuple[str, str]:
        if seg.content is not None:
            digest = segment_digest(seg.content)
            if seg.hash is not None and seg.hash != digest:
                raise SegmentMismatchError(
                    f"segment {seg.id!r}: hash {seg.hash} does not match its content ({digest})",
                    "segments",
                )
            t.contents[digest] = seg.content
            return digest, seg.content
        if seg.name is not None:
            entry = t.registry.get(seg.name)
            if entry is None:
                raise NotFoundError(f"no segment is registered under the name {seg.name!r}", "name")
            return entry["hash"], entry["content"]
        if seg.hash in t.contents:
            return seg.hash, t.contents[seg.hash]
        raise SegmentUnknownError(
            f"segment {seg.id!r} was sent without content and the server does not hold "
            f"{seg.hash}; send its content",
            "segments",
        )

    def _walk(
        self, tenant: str, segments: list[SegmentInput]
    ) -> tuple[list[SegmentUsage], str, int, int]:
        t = self._tenant(tenant)
        resolved = [self._resolve(t, s) for s in segments]  # refuse before changing anything
        chain = namespace_digest(tenant, self.fingerprint)
        usage, cached, total, prefix_intact = [], 0, 0, True
        for seg, (digest, content) in zip(segments, resolved, strict=True):
            chain = chain_digest(chain, digest)
            tokens = count_tokens(content)
            hit = prefix_intact and chain in t.nodes
            prefix_intact = hit
            if hit:
                cached += tokens
                t.hits += 1
            t.nodes[chain] = tokens
            total += tokens
            usage.append(SegmentUsage(seg.id, digest, "hit" if hit else "miss", tokens))
        return usage, chain, cached, total

    # -- cache controls -------------------------------------------------------------

    def warm(self, tenant: str, segments: list[SegmentInput]) -> WarmResult:
        with self._lock:
            self.calls.append(("warm", tenant))
            usage, chain, _, _ = self._walk(tenant, segments)
            return WarmResult(cached_segments=len(usage), root_hash=chain, segments=usage)

    def cache_stats(self, tenant: str) -> dict:
        with self._lock:
            self.calls.append(("cache_stats", tenant))
            t = self._tenant(tenant)
            tokens = sum(t.nodes.values())
            return {
                "tenant": tenant,
                "nodes": len(t.nodes),
                "tokens": tokens,
                "bytes": tokens * BYTES_PER_TOKEN,
                "hits": t.hits,
                "budget_bytes": self.budget_bytes,
            }

    def purge(self, tenant: str) -> int:
        with self._lock:
            self.calls.append(("purge", tenant))
            t = self._tenant(tenant)
            removed = len(t.nodes)
            t.nodes.clear()
            t.contents.clear()
            t.registry.clear()
            return removed

    def put_segment(self, tenant: str, name: str, content: str, ttl_s: float | None) -> dict:
        with self._lock:
            self.calls.append(("put_segment", tenant))
            entry = {
                "name": name,
                "hash": segment_digest(content),
                "tokens": count_tokens(content),
                "expires_at": None if ttl_s is None else time.time() + ttl_s,
            }
            self._tenant(tenant).registry[name] = {**entry, "content": content}
            return entry

    def get_segment(self, tenant: str, name: str) -> dict:
        with self._lock:
            entry = self._tenant(tenant).registry.get(name)
            if entry is None:
                raise NotFoundError(f"no segment is registered under the name {name!r}", "name")
            return {k: v for k, v in entry.items() if k != "content"}

    def delete_segment(self, tenant: str, name: str) -> None:
        with self._lock:
            if self._tenant(tenant).registry.pop(name, None) is None:
                raise NotFoundError(f"no segment is registered under the name {name!r}", "name")

    def metrics(self) -> dict:
        with self._lock:
            nodes = sum(len(t.nodes) for t in self._tenants.values())
            tokens = sum(sum(t.nodes.values()) for t in self._tenants.values())
            return {
                "resident_bytes": tokens * BYTES_PER_TOKEN,
                "nodes": nodes,
                "evictions": self.evictions,
                "budget_bytes": self.budget_bytes,
            }

    def close(self, drain: bool = True) -> None:
        self._thread.shutdown(wait=drain)
